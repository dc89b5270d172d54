# cpt-jax demo --workdir /tmp/cpt_demo            (runs this config for every demo method)
# cpt-jax train --config configs/demo.py --workdir /tmp/cpt_demo/rft --config.method=rft \
#     --config.model.hf_dir=/tmp/cpt_demo/base --config.data.data_dir=/tmp/cpt_demo/data
"""The embedded CPU demo: a tiny Qwen2.5-VL (same code path as 7B) learning synthetic tasks in sequence.

`cpt-jax demo` builds the synthetic suite and a tokenizer, pretrains the tiny base model (cached in the workdir)
and fills in `model.hf_dir` and `data.data_dir`; the settings live in `cpt_jax.demo.demo_config`.
"""

from cpt_jax.demo import demo_config


def get_config():
    return demo_config("sft")
