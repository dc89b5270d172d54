# cpt-jax train --config configs/qwen2_5_vl_7b_rft_no_cot.py --workdir gs://BUCKET/runs/7b_rft_no_cot \
#     --config.model.hf_dir=/path/to/Qwen2.5-VL-7B-Instruct --config.data.data_dir=/path/to/tfds
"""The paper's 'rft_no_cot' run on Qwen2.5-VL-7B-Instruct: seven tasks in the official order, official settings."""

from cpt_jax.train.paper import paper_config


def get_config():
    return paper_config("rft_no_cot", "7b")
