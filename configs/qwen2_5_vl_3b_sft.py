# cpt-jax train --config configs/qwen2_5_vl_3b_sft.py --workdir gs://BUCKET/runs/3b_sft \
#     --config.model.hf_dir=/path/to/Qwen2.5-VL-3B-Instruct --config.data.data_dir=/path/to/tfds
"""The paper's 'sft' run on Qwen2.5-VL-3B-Instruct: seven tasks in the official order, official settings."""

from cpt_jax.train.paper import paper_config


def get_config():
    return paper_config("sft", "3b")
