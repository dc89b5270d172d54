"""The continual post-training experiment: learn tasks in sequence with SFT or RFT, evaluate after each, measure
forgetting.

Per task (a "stage"): (RIF filtering for rif_rft) -> training from the previous stage's weights with a fresh
optimizer -> generation-based evaluation of every task learned so far -> checkpoint. The general benchmarks are
evaluated on the initial model and after the last stage, the sequence's tasks on the initial model too (where
each task starts). Multi-task baselines have one stage on the mixture of all tasks; their accuracy matrix repeats
that single evaluation in every row, so their FM is 0 by construction.

Resume order: the latest checkpoint in WORKDIR (exactly where it stopped: stage, step, params, optimizer, rng, data
iterator, RIF kept ids, accuracy matrix), else the initial model of the config. Running the same command on the same
workdir resumes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from cpt_jax import sharding
from cpt_jax.data.pipeline import Buckets, Loader
from cpt_jax.data.processor import ImageProcessor
from cpt_jax.data.tasks import Subset, load_split
from cpt_jax.data.tokenizer import load_tokenizer, special_token_ids
from cpt_jax.eval.evaluate import decode_completions, evaluate, generate_for_batch, prompt_attention_mask
from cpt_jax.eval.metrics import summarize
from cpt_jax.models.qwen2_5_vl import load_hf_checkpoint
from cpt_jax.rl import diagnostics as diag
from cpt_jax.rl.filtering import rif_filter
from cpt_jax.rl.rewards import get_reward_fn
from cpt_jax.train.checkpoint import Checkpointer
from cpt_jax.train.config import METHODS
from cpt_jax.train.logging import MetricLogger
from cpt_jax.train.optimizer import OptimizerConfig, make_optimizer
from cpt_jax.train.rft import RFTConfig, RFTLearner, rollout_metrics
from cpt_jax.train.sft import make_sft_step, sft_loss, stack_micro_batches
from cpt_jax.train.state import TrainState, cast_floating, check_finite, create_train_state

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Method:
    """How a method name maps onto the training machinery."""

    kind: str  # "sft" or "rft"
    multitask: bool = False
    rif: bool = False
    rft_overrides: tuple[tuple[str, Any], ...] = ()
    template: str | None = None  # overrides data.template


METHOD_TABLE = {
    "sft": Method("sft"),
    "rft": Method("rft"),
    "rif_rft": Method("rft", rif=True),
    "multitask_sft": Method("sft", multitask=True),
    "multitask_rft": Method("rft", multitask=True),
    "rft_no_kl": Method("rft", rft_overrides=(("use_kl", False),)),
    "rft_no_cot": Method("rft", rft_overrides=(("reward", "no_cot"),), template="no_cot"),
    "rloo": Method("rft", rft_overrides=(("advantage", "rloo"),)),
    "reinforce": Method("rft", rft_overrides=(("advantage", "reinforce"),)),
}
assert set(METHOD_TABLE) == set(METHODS)


def _as_dict(batch_struct) -> dict:
    return {f.name: getattr(batch_struct, f.name) for f in dataclasses.fields(batch_struct)}


def _to_jsonable(x):
    return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def example_key(rng, example_id: str):
    """`rng` folded with an example id: the same in every process and every run (crc32, not Python's `hash`,
    which is salted per process), so RIF's rollouts and kept ids reproduce."""
    return jax.random.fold_in(rng, zlib.crc32(example_id.encode()) % (2**31))


class ContinualRun:
    """One method's continual run in `workdir` (results in `workdir/results/summary.json`)."""

    def __init__(self, config, workdir: str | os.PathLike):
        sharding.maybe_initialize_distributed(config.distributed)
        if config.method not in METHOD_TABLE:
            raise ValueError(f"unknown method {config.method!r}; choose one of {sorted(METHOD_TABLE)}")
        if not config.model.hf_dir:
            raise ValueError("config.model.hf_dir is empty: point it at the initial model's HF checkpoint directory")
        if not config.data.tasks:
            raise ValueError("config.data.tasks is empty: list the task sequence")
        self.config = config
        self.method = METHOD_TABLE[config.method]
        self.workdir = os.path.abspath(os.fspath(workdir))
        os.makedirs(self.workdir, exist_ok=True)
        self.tasks = list(config.data.tasks)
        self.general = list(config.data.general)
        epochs = list(config.schedule.epochs) or [1] * len(self.tasks)
        if len(epochs) != len(self.tasks):
            raise ValueError(f"schedule.epochs has {len(epochs)} entries for {len(self.tasks)} tasks")
        self.epochs = epochs
        self.stages = [("all", max(epochs))] if self.method.multitask else list(zip(self.tasks, epochs))
        self.template = self.method.template or config.data.template
        rft_items = dict(config.rft.items())
        rft_items.pop("prompt_batch_size"), rft_items.pop("rollout_batches"), rft_items.pop("reference")
        rft_items.update(dict(self.method.rft_overrides))
        self.rft_config = RFTConfig.from_config(rft_items)
        self.reward_fn = get_reward_fn(self.rft_config.reward)
        self.eval_reward_fn = get_reward_fn(config.eval.reward) if config.eval.reward else self.reward_fn

        self.tokenizer = load_tokenizer(config.tokenizer_dir or config.model.hf_dir)
        special = special_token_ids(self.tokenizer)
        self.eos_ids = (special["im_end"], special["endoftext"])
        self.pad_id = special["pad"]
        if jax.process_count() > 1 and (self.method.rif or (config.diagnostics.enabled and
                                                            config.diagnostics.gradient_every)):
            raise ValueError("RIF filtering and the gradient diagnostics run on a single process; on several "
                             "processes use another method or set --config.diagnostics.gradient_every=0")
        self.layout = sharding.Layout(sharding.mesh_from_config(config.mesh))
        self.compute_dtype = DTYPES[config.model.dtype]
        model = load_hf_checkpoint(config.model.hf_dir, dtype=DTYPES[config.model.param_dtype], mesh=self.layout.mesh,
                                   compute_dtype=self.compute_dtype, attention=config.model.attention,
                                   remat=config.model.remat)
        self.model_config = model.config
        self.graphdef, self.base_params = nnx.split(model, nnx.Param)
        vc = self.model_config.vision
        self.processor = ImageProcessor(min_pixels=config.data.min_pixels, max_pixels=config.data.max_pixels,
                                        patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size,
                                        merge_size=vc.spatial_merge_size)
        self.buckets = Buckets(lengths=tuple(config.data.length_buckets), patches=tuple(config.data.patch_buckets))
        self.checkpointer = Checkpointer(os.path.join(self.workdir, "checkpoints"), keep=config.checkpoint.keep)
        self.logger = MetricLogger(os.path.join(self.workdir, "tb"))
        self.diagnostics = diag.DiagnosticsWriter(os.path.join(self.workdir, "results", "diagnostics.jsonl"),
                                                  enabled=config.diagnostics.enabled and jax.process_index() == 0)
        self._sources: dict[tuple[str, str], Any] = {}
        self._fisher_cache: dict[tuple, list] = {}
        # Built once so every stage reuses the compiled programs.
        self.learner = RFTLearner(self.graphdef, self.rft_config, max_response_length=self.rft_config.max_new_tokens,
                                  layout=self.layout)
        graphdef = self.graphdef

        def sft_mean(params, batch):
            total, count = sft_loss(graphdef, params, batch)
            return total / jnp.maximum(count, 1.0)

        self._nll_grad = jax.jit(jax.grad(lambda params, example: sft_loss(graphdef, params, example)[0]))
        self._sft_grad = jax.jit(jax.grad(sft_mean))

    # --- data ------------------------------------------------------------------------------------------------

    def source(self, task: str, split: str):
        key = (task, split)
        if key not in self._sources:
            src = load_split(task, split, self.config.data.data_dir)
            cap = self.config.data.max_train_examples if split == self.config.data.train_split else \
                self.config.data.max_eval_examples
            self._sources[key] = Subset(src, range(min(cap, len(src)))) if cap else src
        return self._sources[key]

    def train_sources(self, stage_task: str, rif_ids: list[str] | None = None) -> dict:
        split = self.config.data.train_split
        if stage_task == "all":
            return {t: self.source(t, split) for t in self.tasks}
        src = self.source(stage_task, split)
        if rif_ids is not None:
            keep = set(rif_ids)
            src = Subset(src, [i for i, item_id in enumerate(src.ids()) if item_id in keep])
        return {stage_task: src}

    def loader(self, sources: dict, *, mode: str, batch_size: int, seed: int, num_epochs: int | None,
               shuffle: bool = True, template: str | None = None) -> Loader:
        if mode == "sft":
            template = template or self.config.data.sft_template
        weights = {t: len(s) for t, s in sources.items()} if len(sources) > 1 else None
        per_process = max(1, batch_size // jax.process_count())
        return Loader(sources, mode=mode, tokenizer=self.tokenizer, config=self.model_config, batch_size=per_process,
                      buckets=self.buckets, processor=self.processor, template=template or self.template,
                      weights=weights, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                      strict=self.config.data.strict, num_threads=2, target_format=self.config.data.sft_target)

    # --- evaluation ------------------------------------------------------------------------------------------

    def sampler_model(self, params):
        """The model rollouts and evaluation run: `params` cast to the compute dtype and moved to the sampler
        layout (by default whole along 'fsdp', so decoding gathers no weights)."""
        params = cast_floating(params, self.compute_dtype)
        return nnx.merge(self.graphdef, sharding.reshard(params, self.layout.shardings("params", params,
                                                                                       sampler=True)))

    def evaluate_tasks(self, params, tasks: list[str], seed: int) -> dict[str, float]:
        model = self.sampler_model(params)
        cfg = self.config.eval
        out = {}
        for i, task in enumerate(tasks):
            loader = self.loader({task: self.source(task, self.config.data.eval_split)}, mode="prompt",
                                 batch_size=cfg.batch_size, seed=0, num_epochs=1, shuffle=False)
            result = evaluate(model, map(loader.align, iter(loader)), self.tokenizer, self.eval_reward_fn,
                              rng=jax.random.key(seed * 1009 + i), max_new_tokens=cfg.max_new_tokens,
                              temperature=cfg.temperature, eos_token_ids=self.eos_ids, pad_token_id=self.pad_id,
                              desc=f"eval {task}", total=loader.num_batches,
                              length_buckets=self.buckets.lengths, patch_buckets=self.buckets.patches or (4,),
                              layout=self.layout)
            out[task] = result.accuracy
        return out

    # --- training stages -------------------------------------------------------------------------------------

    def _optimizer(self, total_steps: int):
        items = dict(self.config.optim.items())
        items["total_steps"] = max(total_steps, 1)
        items["freeze"] = tuple(items["freeze"])
        items["lr_scales"] = tuple(tuple(x) for x in items["lr_scales"])
        items["weight_decay_exclude"] = tuple(items["weight_decay_exclude"])
        return make_optimizer(OptimizerConfig.from_config(items))

    def _cap(self, steps: int) -> int:
        cap = self.config.schedule.max_steps_per_task
        return min(steps, cap) if cap else steps

    @property
    def _saves_reference(self) -> bool:
        # A fixed base reference is rebuilt from the config; a previous-task reference must be checkpointed.
        return self.method.kind == "rft" and self.config.rft.reference == "previous"

    def _save(self, state: TrainState, loop: dict, ref_params):
        loop["save_index"] = loop.get("save_index", 0) + 1
        extra = {"ref": ref_params} if self._saves_reference else None
        self.checkpointer.save(loop["save_index"], state, _to_jsonable(loop), extra=extra)

    def _resume(self):
        """(params, reference params, state to continue a stage with or None, loop) from the latest checkpoint."""
        like = self._fresh_state(self.base_params, self._optimizer(1), 0)
        extra_like = {"ref": self.base_params} if self._saves_reference else None
        state, loop, extra = self.checkpointer.restore(like, extra_like=extra_like)
        log.info("resuming from checkpoint %d: stage %d, step %d", self.checkpointer.latest_step(), loop["stage"],
                 loop["step_in_stage"])
        ref = extra.get("ref", self.base_params)
        return state.params, ref, (state if loop["in_stage"] else None), loop

    def _fresh_state(self, params, optimizer, rng) -> TrainState:
        # A copy: the jitted steps donate the state, and `params` may be the base or reference weights.
        return create_train_state(nnx.merge(self.graphdef, jax.tree.map(jnp.copy, params)), optimizer, rng,
                                  layout=self.layout)[1]

    def _start_stage(self, stage: int, params, optimizer, loader, loop: dict, resume_state):
        """(state, data iterator, first step) of a stage: fresh, or where the checkpoint left it."""
        iterator = iter(loader)
        if resume_state is None:
            rng = jax.random.fold_in(jax.random.key(self.config.seed), stage)
            return self._fresh_state(params, optimizer, rng), iterator, 0
        iterator.set_state(loop["iterator"])
        return resume_state, iterator, loop["step_in_stage"]

    def train_sft(self, stage: int, task: str, epochs: int, params, ref_params, loop: dict, resume_state):
        cfg = self.config
        k = cfg.sft.micro_batches
        micro = max(1, cfg.sft.batch_size // k)
        loader = self.loader(self.train_sources(task), mode="sft", batch_size=micro, seed=cfg.seed + 7919 * stage,
                             num_epochs=epochs, template=cfg.data.sft_template)
        total = self._cap(loader.num_batches // k)
        optimizer = self._optimizer(total)
        state, iterator, start = self._start_stage(stage, params, optimizer, loader, loop, resume_state)
        step_fn = make_sft_step(self.graphdef, optimizer, layout=self.layout)
        pending = []
        for step in tqdm(range(start, total), desc=f"sft {task}", initial=start, total=total, unit="step"):
            # Aligned, every process's micro-batches have the same shapes, so the maxima below agree too.
            batches = [loader.align(next(iterator)) for _ in range(k)]
            length = max(b.device.input_ids.shape[1] for b in batches)
            patches = max((b.device.vision.pixel_values.shape[0] if b.device.vision is not None else 0)
                          for b in batches)
            if k > 1:
                batches = [loader.pad(b, length, patches) for b in batches]
            batch = stack_micro_batches([_as_dict(b.device) for b in batches]) if k > 1 else \
                _as_dict(batches[0].device)
            state, metrics = step_fn(state, sharding.global_batch(batch, self.layout))
            pending.append((loop["global_step"], metrics))
            loop["global_step"] += 1
            if len(pending) >= cfg.log_every or step + 1 == total:
                self._flush(pending, "train")
                pending = []
            if cfg.checkpoint.every_steps and (step + 1) % cfg.checkpoint.every_steps == 0 and step + 1 < total:
                self._flush(pending, "train")
                pending = []
                loop.update(step_in_stage=step + 1, iterator=iterator.get_state())
                self._save(state, loop, ref_params)
        return state

    def _flush(self, pending, prefix: str):
        for step, metrics in jax.device_get(pending):
            check_finite(metrics, step)
            self.logger.write(prefix, step, {k: float(v) for k, v in metrics.items() if k != "finite"})
        if pending:
            self.logger.console(prefix, pending[-1][0], jax.device_get(pending[-1][1]))

    def train_rft(self, stage: int, task: str, epochs: int, params, ref_params, loop: dict, resume_state):
        cfg, rc = self.config, self.rft_config
        rif_ids = None
        if self.method.rif:
            result = self.rif_pass(stage, task, params)
            rif_ids = result.kept_ids
            loop.setdefault("rif_kept_fraction", {})[task] = result.kept_fraction
            if not rif_ids:
                log.warning("RIF kept no item of task %r: the model never answered it correctly in %d rollouts, so "
                            "RFT has no signal on it; the stage trains nothing", task, cfg.rif.num_samples)
                return self._fresh_state(params, self._optimizer(1), 0)
        loader = self.loader(self.train_sources(task, rif_ids), mode="prompt", batch_size=cfg.rft.prompt_batch_size,
                             seed=cfg.seed + 7919 * stage, num_epochs=epochs)
        iterations = self._cap(math.ceil(loader.num_batches / cfg.rft.rollout_batches))
        updates_per_iteration = rc.ppo_epochs * math.ceil(cfg.rft.rollout_batches / rc.micro_batches_per_update)
        optimizer = self._optimizer(iterations * updates_per_iteration)
        state, iterator, start = self._start_stage(stage, params, optimizer, loader, loop, resume_state)
        learner = self.learner
        # One update per rollout batch and one PPO epoch: every micro-batch is used by the parameters that sampled it.
        on_policy = rc.ppo_epochs == 1 and rc.micro_batches_per_update >= cfg.rft.rollout_batches
        for it in tqdm(range(start, iterations), desc=f"rft {task}", initial=start, total=iterations, unit="iter"):
            batches = []
            for _ in range(cfg.rft.rollout_batches):
                try:
                    batches.append(next(iterator))
                except StopIteration:
                    break
            if not batches:
                break
            rng, sample_rng = jax.random.split(state.rng)
            state = state.replace(rng=rng)
            micro, scores_all, accuracies, overall, lengths = [], [], [], [], []
            model = self.sampler_model(state.params)
            for j, batch in enumerate(batches):
                batch = loader.align(batch)
                out = generate_for_batch(model, batch, rng=jax.random.fold_in(sample_rng, j),
                                         max_new_tokens=rc.max_new_tokens, temperature=rc.temperature,
                                         top_p=rc.top_p, top_k=rc.top_k, num_samples=rc.num_samples,
                                         eos_token_ids=self.eos_ids, pad_token_id=self.pad_id,
                                         length_buckets=self.buckets.lengths,
                                         patch_buckets=self.buckets.patches or (4,), layout=self.layout)
                texts = decode_completions(self.tokenizer, out.tokens, out.lengths)
                valid = np.repeat(np.asarray(batch.device.valid), rc.num_samples)
                answers = np.repeat(np.asarray(batch.host.answers, dtype=object), rc.num_samples)
                scores = self.reward_fn(texts, list(answers))
                rewards = np.array([s["overall"] for s in scores], np.float32) * valid
                prompts = _as_dict(batch.device)
                prompts.pop("valid")
                prompts["attention_mask"] = prompt_attention_mask(batch)
                # The update reports the sampler-vs-trainer gap from the sampler's log-probs (left on device).
                mb = learner.prepare(state.params, ref_params, prompts, out.tokens, out.lengths, rewards,
                                     on_policy=on_policy, sampler_logprobs=out.logprobs)
                if j == 0:
                    first_rewards = rewards
                mb["row_weight"] = sharding.global_batch({"row_weight": valid.astype(np.float32)},
                                                         self.layout)["row_weight"]
                micro.append(mb)
                keep = np.flatnonzero(valid)
                scores_all += [scores[i] for i in keep]
                accuracies.append(np.array([scores[i]["accuracy"] for i in keep]))
                overall.append(rewards[keep])
                lengths.append(np.asarray(out.lengths)[keep])
            group = diag.group_reward_stats(np.concatenate(overall), np.concatenate(accuracies), rc.num_samples)
            rollout = rollout_metrics(scores_all, np.concatenate(lengths))
            if cfg.diagnostics.enabled and cfg.diagnostics.gradient_every and \
                    it % cfg.diagnostics.gradient_every == 0:
                group.update(self.gradient_diagnostics(learner, state.params, micro[0], first_rewards, batches[0],
                                                       task, stage, group["reward_var"]))
            for epoch in range(rc.ppo_epochs):
                for c in range(0, len(micro), rc.micro_batches_per_update):
                    state, metrics = learner.update(state, micro[c:c + rc.micro_batches_per_update], optimizer)
                    check_finite(jax.device_get(metrics), loop["global_step"])
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
                    self.logger.write("train", loop["global_step"], {**metrics, **rollout})
                    loop["global_step"] += 1
            self._record_diagnostics(loop, task, group)
            if (it + 1) % max(1, cfg.log_every // max(updates_per_iteration, 1)) == 0 or it + 1 == iterations:
                self.logger.console("train", loop["global_step"], {**metrics, **rollout,
                                                                   "reward_var": group["reward_var"]})
            if cfg.checkpoint.every_steps and (it + 1) % cfg.checkpoint.every_steps == 0 and it + 1 < iterations:
                loop.update(step_in_stage=it + 1, iterator=iterator.get_state())
                self._save(state, loop, ref_params)
        return state

    def _record_diagnostics(self, loop, task, group):
        record = {k: v for k, v in group.items() if k not in ("group_mean", "group_var")}
        record["task"] = task
        self.diagnostics.write(loop["global_step"], record)
        series = loop.setdefault("diag_series", {"reward_var": [], "zero_var_frac": [], "risk_ratio": []})
        series["reward_var"].append(group["reward_var"])
        series["zero_var_frac"].append(group["zero_var_frac"])
        series["risk_ratio"].append(group.get("risk_ratio"))
        self.logger.write("diagnostics", loop["global_step"],
                          {k: v for k, v in record.items() if isinstance(v, float) and math.isfinite(v)})

    def gradient_diagnostics(self, learner: RFTLearner, params, mb, rewards, batch, task, stage,
                             reward_var) -> dict:
        """Per-group gradient contributions vs reward variance, and the forgetting risk of the RFT update vs an
        SFT gradient on the same prompts (Fisher from held-out examples of earlier tasks)."""
        cfg = self.config.diagnostics
        g = self.rft_config.num_samples
        num_rows = mb["response"].shape[0]
        groups = [i for i in range(num_rows // g) if np.asarray(mb["row_weight"])[i * g] > 0][:cfg.num_groups]
        norms = diag.group_contributions(lambda p, w: learner.row_grad(p, mb, w), params, num_rows, g, groups)
        out = {"contrib_norm": norms.tolist(),
               "contrib_reward_var": [float(np.var(rewards[i * g:(i + 1) * g])) for i in groups]}
        earlier = self.tasks[:stage]
        if not earlier or not cfg.fisher_examples:
            return out
        fisher = diag.diagonal_fisher(self._nll_grad, params, self._fisher_examples(earlier, cfg.fisher_examples))
        (_, (rft_count, _)), rft_grad = learner.grad(params, mb)
        rft_grad = jax.tree.map(lambda x: x / jnp.maximum(rft_count, 1.0), rft_grad)
        sft_grad = self._sft_grad(params, self._sft_batch_for(task, batch))
        out.update(diag.risk_summary(fisher, rft_grad, sft_grad, reward_var))
        return out

    def _fisher_examples(self, tasks, n):
        key = (tuple(tasks), n)  # the same held-out examples at every diagnostic step of a stage
        if key not in self._fisher_cache:
            self._fisher_cache[key] = self._load_fisher_examples(tasks, n)
        return self._fisher_cache[key]

    def _load_fisher_examples(self, tasks, n):
        per = max(1, n // len(tasks))
        sources = {t: Subset(self.source(t, self.config.data.eval_split),
                             range(min(per, len(self.source(t, self.config.data.eval_split))))) for t in tasks}
        loader = self.loader(sources, mode="sft", batch_size=1, seed=0, num_epochs=1, shuffle=False,
                             template=self.config.data.sft_template)
        return [_as_dict(b.device) for b in iter(loader) if bool(np.asarray(b.device.valid)[0])][:n]

    def _sft_batch_for(self, task, batch):
        ids = [i for i in batch.host.ids if i]
        src = self.source(task, self.config.data.train_split)
        index = {item_id: k for k, item_id in enumerate(src.ids())}
        subset = Subset(src, [index[i] for i in ids if i in index])
        loader = self.loader({task: subset}, mode="sft", batch_size=len(subset), seed=0, num_epochs=1, shuffle=False,
                             template=self.config.data.sft_template)
        return _as_dict(next(iter(loader)).device)

    def rif_pass(self, stage: int, task: str, params):
        cfg = self.config
        loader = self.loader(self.train_sources(task), mode="prompt", batch_size=cfg.rft.prompt_batch_size, seed=0,
                             num_epochs=1, shuffle=False)
        model = self.sampler_model(params)
        rng = jax.random.fold_in(jax.random.key(cfg.seed + 31), stage)
        n = cfg.rif.num_samples

        def batches():
            for batch in iter(loader):
                ids = [i if v else None for i, v in zip(batch.host.ids, np.asarray(batch.device.valid))]
                yield ids, batch.host.answers, batch

        def rollout(batch):
            out = generate_for_batch(model, batch, rng=example_key(rng, batch.host.ids[0]),
                                     max_new_tokens=self.rft_config.max_new_tokens, temperature=cfg.rif.temperature,
                                     top_p=self.rft_config.top_p, num_samples=n, eos_token_ids=self.eos_ids,
                                     pad_token_id=self.pad_id, length_buckets=self.buckets.lengths,
                                     patch_buckets=self.buckets.patches or (4,), layout=self.layout)
            texts = decode_completions(self.tokenizer, out.tokens, out.lengths)
            return [texts[i * n:(i + 1) * n] for i in range(len(texts) // n)]

        result = rif_filter(batches(), rollout, self.reward_fn, num_samples=n,
                            drop_always_correct=cfg.rif.drop_always_correct,
                            state_path=os.path.join(self.workdir, "rif", f"stage{stage}_{task.replace('/', '_')}.json"),
                            key=f"{task}/seed{cfg.seed}/stage{stage}",
                            total=len(self.source(task, cfg.data.train_split)))
        log.info(result.summary())
        return result

    def latest_params(self):
        """Parameters of the latest checkpoint in the workdir."""
        params, _, _, _ = self._resume()
        return params

    # --- the loop --------------------------------------------------------------------------------------------

    def run(self) -> dict:
        """Runs (or resumes) every stage and returns the summary (also written to `workdir/results`)."""
        with sharding.compilation_cache(self.config.compilation_cache_dir):
            return self._run()

    def _run(self) -> dict:
        cfg = self.config
        loop = {"stage": 0, "step_in_stage": 0, "global_step": 0, "accuracy_matrix": [], "general_before": None,
                "general_after": None, "initial": None, "iterator": None, "in_stage": False}
        params, ref_params = self.base_params, self.base_params
        resume_state = None
        if self.checkpointer.latest_step() is not None:
            params, ref_params, resume_state, loop = self._resume()
        if loop["general_before"] is None and self.general:
            loop["general_before"] = self.evaluate_tasks(params, self.general, seed=cfg.seed + 1)
        if loop.get("initial") is None:
            # Where each task starts, so plasticity reads as what a method learned rather than what it kept.
            loop["initial"] = self.evaluate_tasks(self.base_params, self.tasks, seed=cfg.seed + 3)
        for stage in range(loop["stage"], len(self.stages)):
            task, epochs = self.stages[stage]
            loop["stage"] = stage
            if not loop["in_stage"]:
                loop.update(in_stage=True, step_in_stage=0, iterator=None)
                ref_params = self.base_params if cfg.rft.reference == "base" else params
            started = time.time()
            if self.method.kind == "sft":
                state = self.train_sft(stage, task, epochs, params, ref_params, loop, resume_state)
            else:
                state = self.train_rft(stage, task, epochs, params, ref_params, loop, resume_state)
            resume_state = None
            params = state.params
            learned = self.tasks if self.method.multitask else self.tasks[:stage + 1]
            accuracies = self.evaluate_tasks(params, learned, seed=cfg.seed + 100 + stage)
            row = [accuracies.get(t) for t in self.tasks]
            if self.method.multitask:
                loop["accuracy_matrix"] = [row] * len(self.tasks)
            else:
                loop["accuracy_matrix"].append(row)
            self.logger.write("eval", loop["global_step"], {f"acc/{t}": a for t, a in accuracies.items()})
            log.info("stage %d (%s) done in %.0fs: %s", stage, task, time.time() - started,
                     ", ".join(f"{t} {a:.3f}" for t, a in accuracies.items()))
            loop.update(stage=stage + 1, in_stage=False, step_in_stage=0, iterator=None)
            self._save(state, loop, ref_params)
        if loop["general_after"] is None and self.general:
            loop["general_after"] = self.evaluate_tasks(params, self.general, seed=cfg.seed + 2)
        diagnostics = dict(loop.get("diag_series", {}))
        if "rif_kept_fraction" in loop:
            diagnostics["rif_kept_fraction"] = loop["rif_kept_fraction"]
        summary = summarize(cfg.method, self.tasks, loop["accuracy_matrix"], loop["general_before"],
                            loop["general_after"], diagnostics, initial=loop["initial"])
        if sharding.is_main_process():
            results = os.path.join(self.workdir, "results")
            os.makedirs(results, exist_ok=True)
            with open(os.path.join(results, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
        self.final_params = params
        self.logger.close()
        return summary
