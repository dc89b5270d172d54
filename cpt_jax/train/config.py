"""The experiment configuration: every key declared here with its default; config files override values.

A config file in `configs/` is a Python file with `get_config()` that starts from `default_config()`, sets what
differs, and returns it; `ConfigDict` is locked so a misspelt key is an error, not a silent new setting. The
command line overrides any key with `--config.a.b=value`.
"""

from __future__ import annotations

import ml_collections

METHODS = ("sft", "rft", "rif_rft", "multitask_sft", "multitask_rft", "rft_no_kl", "rft_no_cot", "rloo",
           "reinforce")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "rft"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.hf_dir = ""  # a transformers checkpoint directory (config.json + safetensors)
    c.model.name = ""  # its published name (models/qwen2_5_vl/published.py): shapes for `cpt-jax aot` without it
    c.model.dtype = "bfloat16"  # compute dtype
    c.model.param_dtype = "float32"  # master weights
    c.model.attention = "xla"
    c.model.remat = "dots"

    c.tokenizer_dir = ""  # defaults to model.hf_dir

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = ""  # TFDS data dir written by `cpt-jax data prepare`
    c.data.tasks = ()  # the task sequence, e.g. ("scienceqa", "textvqa", ...)
    c.data.general = ()  # general benchmarks evaluated before and after the sequence
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.template = "cot"  # prompt template for RFT and evaluation ("cot", "no_cot", "plain")
    c.data.sft_template = "plain"  # the paper's SFT data keeps the task's own instruction text
    c.data.sft_target = "{answer}"  # SFT target text from the reference answer (pipeline target_format)
    c.data.min_pixels = 200704
    c.data.max_pixels = 1003520
    c.data.length_buckets = (512, 1024, 2048, 4096)
    c.data.patch_buckets = (4096, 16384)
    c.data.max_eval_examples = 0  # 0 = the whole test split
    c.data.max_train_examples = 0  # 0 = the whole train split
    c.data.strict = False

    # The paper's RFT optimizer (EasyR1); SFT configs set learning_rate 1e-5, cosine, warmup_ratio 0.1.
    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-6
    c.optim.schedule = "constant"
    c.optim.warmup_ratio = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 1e-2
    c.optim.max_grad_norm = 1.0
    c.optim.freeze = ()
    c.optim.lr_scales = ()
    c.optim.weight_decay_exclude = ()

    c.sft = ml_collections.ConfigDict()
    c.sft.batch_size = 16  # global batch (rows)
    c.sft.micro_batches = 1

    c.rft = ml_collections.ConfigDict()
    c.rft.prompt_batch_size = 64  # prompts per micro-batch (rollout and update)
    c.rft.rollout_batches = 8  # micro-batches per rollout batch (512 prompts at the defaults)
    c.rft.num_samples = 8
    c.rft.temperature = 1.0
    c.rft.top_p = 0.99
    c.rft.top_k = 0
    c.rft.max_new_tokens = 1024
    c.rft.reward = "math"
    c.rft.advantage = "grpo"
    c.rft.advantage_options = ()
    c.rft.clip_low = 0.2
    c.rft.clip_high = 0.3
    c.rft.dual_clip = 3.0
    c.rft.log_ratio_clamp = 20.0
    c.rft.loss_agg = "token-mean"
    c.rft.use_kl = True
    c.rft.kl_coef = 0.01
    c.rft.kl_estimator = "low_var_kl"
    c.rft.ppo_epochs = 1
    c.rft.micro_batches_per_update = 2  # 128 prompts x 8 samples per update at the defaults
    c.rft.reference = "base"  # "base" (fixed initial model) or "previous" (the previous task's weights)

    c.schedule = ml_collections.ConfigDict()
    c.schedule.epochs = ()  # per task, e.g. (1, 1, 1, 1, 10, 1, 3); empty = 1 each
    c.schedule.max_steps_per_task = 0  # 0 = no cap (epochs decide)

    c.rif = ml_collections.ConfigDict()
    c.rif.num_samples = 8
    c.rif.temperature = 1.0
    c.rif.drop_always_correct = False

    c.eval = ml_collections.ConfigDict()
    c.eval.temperature = 0.5  # 0 = greedy
    c.eval.reward = ""  # accuracy from this reward; "" = rft.reward
    c.eval.max_new_tokens = 1024
    c.eval.batch_size = 64

    c.diagnostics = ml_collections.ConfigDict()
    c.diagnostics.enabled = True
    c.diagnostics.every = 1  # group statistics every step; gradient diagnostics every `gradient_every` steps
    c.diagnostics.gradient_every = 10
    c.diagnostics.num_groups = 4  # groups whose gradient contribution is measured
    c.diagnostics.fisher_examples = 16  # held-out examples of earlier tasks for the diagonal Fisher

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 50
    c.checkpoint.keep = 2

    # Mesh sizes within a slice (-1 takes the remaining devices); dcn_data > 1 replicates over that many slices.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.mesh.dcn_data = 1
    c.mesh.num_devices = 0  # 0: every device; n > 0: the first n (one process)
    c.distributed = False  # jax.distributed.initialize() at start (multi-host; automatic on Cloud TPU VMs)

    c.log_every = 10
    c.compilation_cache_dir = ""  # XLA's persistent compilation cache ("" = off); reruns load compiled steps
    c.aot_topology = ""  # the smallest TPU slice this config fits on, e.g. "v5p:2x2x1" (`cpt-jax aot`)
    c.lock()
    return c
