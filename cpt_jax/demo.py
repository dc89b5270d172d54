"""`cpt-jax demo`: the continual post-training experiment end to end on a laptop CPU, in minutes.

Builds the embedded synthetic suite and a small tokenizer, pretrains a tiny Qwen2.5-VL base model (same code path
as 7B; cached in the workdir) on the general tasks plus a little of every new task, so it knows the answer format
and the answers' words without the new skills, then runs SFT, RFT, RIF-RFT and multi-task SFT over a sequence of
new tasks, evaluates, and writes `DIR/summary.json` and `DIR/report.md` with plots.

The images show one shape filling a 56-pixel image (`synthetic.SINGLE`, four merged vision tokens; on the suite's
3x3 scenes the 2-layer model stays at chance for thousands of steps). The base model learns to name the shape's
colour and size as general skills, beside text-only arithmetic and parity. The four new tasks are rules on top of
what it reads: is the colour warm or cool, does the shape fill most of the image, is the colour a primary colour,
is it dark or light. The base sees a few examples of each (`NEW_TASK_WEIGHT`), enough to answer in the task's words,
mostly too few to learn the rule (on the default base warm, primary and dark start near chance; fills, which is the
size the base names, at 87%), and both methods learn each within a stage. Without the general colour naming the base
confuses colours: both methods then learn slowly, and RFT settles on one answer per confused colour before it learns
the rule (measured; see the README).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from cpt_jax import sharding
from cpt_jax.data import synthetic, tasks
from cpt_jax.data.pipeline import Buckets, Loader
from cpt_jax.data.processor import ImageProcessor
from cpt_jax.data.prompts import format_question
from cpt_jax.data.tokenizer import build_tiny_tokenizer, load_tokenizer, special_token_ids
from cpt_jax.eval.report import write_report
from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig, save_hf_checkpoint
from cpt_jax.train.config import default_config
from cpt_jax.train.continual import METHOD_TABLE, ContinualRun
from cpt_jax.train.optimizer import OptimizerConfig, make_optimizer
from cpt_jax.train.sft import make_sft_step
from cpt_jax.train.state import check_finite, create_train_state

log = logging.getLogger(__name__)

DEMO_METHODS = ("sft", "rft", "rif_rft", "multitask_sft")
# The pair whose forgetting the demo compares, rerun with training seeds 1 .. N-1 by `--seeds N`: one run's verdict
# moves with the seed by more than the gap between the methods (see the README).
SEED_METHODS = ("sft", "rft")
TASKS = ("warm", "fills", "primary", "dark")
GENERAL = ("arithmetic", "parity", "colour_single", "size_single")
# How often the pretraining mixture draws a new task relative to a general one: enough to answer in its words,
# too little to learn its rule, so each new task starts low as the paper's tasks do.
NEW_TASK_WEIGHT = 0.02
# SFT learns the answer layout the reward reads (the paper's RFT format), so both methods are scored alike. The
# answer appears once: with "the answer is X" before the box, the base's box often disagreed with its X, two
# decisions for RFT to credit where the reward reads one.
COT_TARGET = "<think> I read the question. </think> \\boxed{{{answer}}}"
# At 2e-3, two of three bases tried kept parity at chance (50-58%); at 1e-3 it reached 62-100% over three pretraining
# seeds (100% with the default seed).
PRETRAIN_LR = 1e-3
SFT_EPOCHS, RFT_EPOCHS = 3, 4
IMAGE_SIZE = 56  # the synthetic images' own size: 4x4 patches, 4 merged tokens


def demo_config(method: str = "sft", quick: bool = False):
    """The demo's settings for one method; `cpt-jax demo` fills in model.hf_dir and data.data_dir."""
    c = default_config()
    c.method = method
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.remat = "none"
    c.data.tasks = tuple(f"synthetic/{t}" for t in TASKS)
    c.data.general = tuple(f"synthetic/{t}" for t in GENERAL)
    c.data.template = "plain"
    c.data.sft_template = "plain"
    c.data.sft_target = COT_TARGET
    c.data.min_pixels = c.data.max_pixels = IMAGE_SIZE * IMAGE_SIZE
    c.data.length_buckets = (56, 72)  # prompts 43-54 tokens, SFT examples 61-72
    c.data.patch_buckets = (128, 256, 512, 1024)  # 16 patches per image: 8 to 64 images
    c.data.max_train_examples = 128 if quick else 256
    c.data.max_eval_examples = 32 if quick else 128
    c.optim.weight_decay = 0.0
    # One rate for both methods; RFT's epochs are passes of rollouts over each task's data. SFT_EPOCHS is the setting
    # whose mean gain over the sequence came closest to RFT's on the default base (SFT 1 / 2 / 3 epochs: 18.3 / 23.0 /
    # 29.7 points; RFT 4 epochs: 29.5).
    sft = METHOD_TABLE[method].kind == "sft"
    c.optim.learning_rate = 1e-4
    c.optim.schedule = "constant"
    # --quick trades RFT's epochs and the gradient diagnostics (their programs' compilation alone is ~15 s) for its
    # 3-minute budget; the group reward statistics stay.
    c.schedule.epochs = (SFT_EPOCHS if sft else (1 if quick else RFT_EPOCHS),) * len(TASKS)
    c.sft.batch_size = 16
    c.rft.prompt_batch_size = 8
    c.rft.rollout_batches = 2
    c.rft.num_samples = 4
    c.rft.top_p = 1.0
    c.rft.max_new_tokens = 20
    c.rft.micro_batches_per_update = 2
    c.rif.num_samples = 4
    c.eval.temperature = 0.5  # the paper's evaluation: one sample per question at T=0.5
    c.eval.max_new_tokens = 20
    c.eval.batch_size = 32 if quick else 64
    # Each gradient diagnostic (per-group gradients, a Fisher over earlier tasks, the RFT-vs-SFT risk) costs several
    # update steps: every 16 iterations gives 8 points per RFT stage (every 4 cost RFT a tenth more time).
    c.diagnostics.gradient_every = 0 if quick else 16
    c.diagnostics.num_groups = 2
    c.diagnostics.fisher_examples = 4
    c.checkpoint.every_steps = 0
    c.checkpoint.keep = 1
    return c


def tiny_model_config(tokenizer) -> Qwen2_5_VLConfig:
    """A tiny Qwen2.5-VL sized to the demo tokenizer (vocab rounded up to a multiple of 64)."""
    ids = special_token_ids(tokenizer)
    vocab = -(-len(tokenizer) // 64) * 64
    return Qwen2_5_VLConfig.from_hf({
        "image_token_id": ids["image_pad"], "video_token_id": ids["video_pad"],
        "vision_start_token_id": ids["vision_start"], "vision_end_token_id": ids["vision_end"],
        "tie_word_embeddings": True,
        "text_config": {"vocab_size": vocab, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                            "mrope_section": [4, 6, 6]},
                        "bos_token_id": ids["endoftext"], "eos_token_id": ids["im_end"]},
        "vision_config": {"depth": 2, "hidden_size": 64, "num_heads": 2, "intermediate_size": 128,
                          "out_hidden_size": 128, "fullatt_block_indexes": [1]},
    })


def build_assets(workdir: str) -> tuple[str, str]:
    """The synthetic suite (TFDS, array_record) and a tokenizer trained on its texts; both cached."""
    tok_dir, data_dir = os.path.join(workdir, "tokenizer"), os.path.join(workdir, "data")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        texts = [format_question("x", "cot"), COT_TARGET]
        for config in tasks.CptSynthetic.BUILDER_CONFIGS:
            for ex in synthetic.generate(config.task, "train", n=40, seed=1, layout=config.layout):
                texts += [ex["question"], COT_TARGET.format(answer=ex["answer"])]
        build_tiny_tokenizer(tok_dir, extra_texts=texts)
    for name in (*TASKS, *GENERAL):
        tasks.prepare(f"synthetic/{name}", data_dir)
    return tok_dir, data_dir


def pretrain_base(workdir: str, tok_dir: str, data_dir: str, *, steps: int, seed: int = 0) -> str:
    """SFT of a freshly initialised tiny model on a mixture of every synthetic task; saved as an HF checkpoint."""
    base_dir = os.path.join(workdir, "base")
    if os.path.exists(os.path.join(base_dir, "config.json")):
        return base_dir
    tokenizer = load_tokenizer(tok_dir)
    config = tiny_model_config(tokenizer)
    model = Qwen2_5_VL(config, rngs=nnx.Rngs(seed))
    cfg = demo_config()
    # The new tasks' training splits are the continual stages' data too, so the base sees other examples of them.
    sources = {name: tasks.Subset(src, range(max(0, len(src) - 512), len(src))) for name in (*GENERAL, *TASKS)
               for src in [tasks.load_split(f"synthetic/{name}", "train", data_dir)]}
    weights = {name: NEW_TASK_WEIGHT if name in TASKS else 1.0 for name in sources}
    loader = Loader(sources, mode="sft", tokenizer=tokenizer, config=config, batch_size=cfg.sft.batch_size,
                    buckets=Buckets(cfg.data.length_buckets, cfg.data.patch_buckets),
                    processor=ImageProcessor(min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels),
                    template=cfg.data.sft_template, target_format=COT_TARGET, weights=weights, seed=seed,
                    num_threads=2)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=PRETRAIN_LR, schedule="cosine", warmup_ratio=0.05,
                                               total_steps=steps, weight_decay=0.0))
    graphdef, state = create_train_state(model, optimizer, seed)
    step_fn = make_sft_step(graphdef, optimizer)
    iterator = iter(loader)
    with tqdm(range(steps), desc="pretraining the tiny base model", unit="step") as bar:
        for step in bar:
            batch = next(iterator).device
            state, metrics = step_fn(state, {f: getattr(batch, f) for f in
                                             ("input_ids", "attention_mask", "position_ids", "loss_mask", "vision")})
            if (step + 1) % 25 == 0 or step + 1 == steps:
                metrics = jax.device_get(metrics)
                check_finite(metrics, step)
                bar.set_postfix(loss=f"{float(metrics['loss']):.3f}")
    tmp = base_dir + ".tmp"
    save_hf_checkpoint(nnx.merge(graphdef, state.params), tmp)
    for name in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, name), tmp)
    os.replace(tmp, base_dir)
    return base_dir


def run(workdir: str, quick: bool = False, methods=DEMO_METHODS, *, seeds: int = 1,
        pretrain_steps: int | None = None, adjust=None) -> dict:
    """Runs the demo and returns {method: summary}; `seeds` > 1 reruns `SEED_METHODS` with training seeds
    1 .. seeds-1 in `DIR/seeds/<seed>/<method>` from the same base model. `pretrain_steps` and `adjust(config)`
    (edits each method's config) shrink it for tests."""
    if seeds < 1:
        raise ValueError(f"seeds={seeds} must be at least 1 (the number of training seeds per compared method)")
    started = time.time()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    # The four methods build the same evaluation, sampling and update programs: compiled once, then loaded.
    cache_dir = os.path.join(workdir, "jax_cache")
    with sharding.compilation_cache(cache_dir):
        tok_dir, data_dir = build_assets(workdir)
        steps = pretrain_steps if pretrain_steps is not None else (150 if quick else 800)
        base_dir = pretrain_base(workdir, tok_dir, data_dir, steps=steps)

        def run_method(method, seed, method_dir):
            config = demo_config(method, quick)
            config.seed = seed
            config.model.hf_dir = base_dir
            config.data.data_dir = data_dir
            config.compilation_cache_dir = cache_dir
            if adjust is not None:
                adjust(config)
            return ContinualRun(config, method_dir).run()

        summaries = {method: run_method(method, 0, os.path.join(workdir, method)) for method in methods}
        repeats = {str(seed): {method: run_method(method, seed, os.path.join(workdir, "seeds", str(seed), method))
                               for method in SEED_METHODS if method in methods}
                   for seed in range(1, seeds)}
    combined = {"methods": summaries}
    if repeats:
        combined["seeds"] = repeats
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(combined, f, indent=2)
    report = write_report(workdir)
    print(f"\ncpt-jax demo finished in {time.time() - started:.0f}s")
    print(f"  summary: {os.path.join(workdir, 'summary.json')}")
    print(f"  report:  {report}")
    return summaries


def register(subparsers):
    parser = subparsers.add_parser("demo", help="synthetic tasks + tiny model on CPU: SFT vs RFT forgetting")
    parser.add_argument("--workdir", default="cpt_demo", help="where data, the base model and results go")
    parser.add_argument("--quick", action="store_true", help="smaller data and fewer steps")
    parser.add_argument("--seeds", type=int, default=1,
                        help="training seeds for SFT and RFT (each extra seed adds ~3 min); the report averages them")
    parser.set_defaults(func=lambda args: run(args.workdir, args.quick, seeds=args.seeds) and 0)
