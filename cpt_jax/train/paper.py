"""The paper's experiment as configs: Qwen2.5-VL, the seven tasks in the official order, the official settings.

Each `configs/qwen2_5_vl_<size>_<method>.py` returns `paper_config(method, size)`; see reference settings in the
README (EasyR1 for RFT, LLaMA-Factory for SFT).
"""

from __future__ import annotations

from cpt_jax.train.config import METHODS, default_config

TASKS = ("scienceqa", "textvqa", "vizwiz", "gqa", "geometry3k", "pathvqa", "superclevr")
GENERAL = ("mmmu", "mmlu_pro", "pope")
EPOCHS = (1, 1, 1, 1, 10, 1, 3)
MODELS = {"3b": "Qwen/Qwen2.5-VL-3B-Instruct", "7b": "Qwen/Qwen2.5-VL-7B-Instruct"}


def paper_config(method: str, size: str = "7b"):
    """The paper's run of `method` (one of `config.METHODS`) on Qwen2.5-VL-`size`; paths are set on the command line
    (`--config.model.hf_dir=... --config.data.data_dir=...`)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if size not in MODELS:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(MODELS)}")
    c = default_config()
    c.method = method
    c.model.hf_dir = ""  # a local download of MODELS[size]
    c.model.name = MODELS[size]
    c.data.tasks = TASKS
    c.data.general = GENERAL
    c.schedule.epochs = EPOCHS
    if method.endswith("sft"):
        # LLaMA-Factory examples/mllm_cl: full fine-tune, lr 1e-5, cosine, warmup 0.1, global batch 16, cutoff 7168.
        c.optim.learning_rate = 1e-5
        c.optim.schedule = "cosine"
        c.optim.warmup_ratio = 0.1
        c.optim.weight_decay = 0.0
        c.data.template = "plain"
        c.eval.reward = "no_cot"  # SFT answers directly (LLaMA-Factory data): grade the whole answer
        c.data.length_buckets = (1024, 2048, 4096, 7168)
        c.sft.batch_size = 16
        c.sft.micro_batches = 2
    else:
        # EasyR1: rollout batch 512 prompts, update batch 128 prompts x 8 responses, prompts up to 4096 tokens and
        # responses up to 1024. Micro-batches of 2 prompts (16 sequences of up to 5120 tokens, 4 per chip on a
        # v5p-8) with full rematerialisation are what fits in 95 GiB next to the weights, Adam state and reference
        # (`cpt-jax aot`); accumulation keeps the paper's batch sizes.
        c.rft.prompt_batch_size = 2
        c.rft.rollout_batches = 256
        c.rft.micro_batches_per_update = 64
    if method.startswith("multitask"):
        c.schedule.epochs = (1,) * len(TASKS)  # one pass over the mixture of all seven training sets
    c.model.remat = "full"
    c.eval.max_new_tokens = 1024
    c.aot_topology = "v5p:2x2x1"  # a v5p-8 slice: 4 chips on one host
    return c
