"""Generation-based evaluation: sample an answer per test question, score it with the task's reward.

The paper's setting is one sample per question at temperature 0.5, accuracy = mean of the reward's accuracy part;
greedy decoding is an option (`temperature=0`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from cpt_jax import sharding
from cpt_jax.rl.sampling import generate

RewardFn = Callable[[Sequence[str], Sequence[str]], list[dict[str, float]]]


@dataclasses.dataclass
class EvalResult:
    accuracy: float
    num_examples: int
    records: list[dict[str, Any]]  # per example: id, answer, prediction, accuracy


def prompt_attention_mask(batch) -> np.ndarray:
    """The attention mask of a pipeline prompt batch with one attended (last) token in each dummy row, so that
    sampling and scoring those rows stay finite; their outputs are ignored."""
    mask = np.array(batch.device.attention_mask)
    mask[~np.asarray(batch.device.valid), -1] = 1
    return mask


def generate_for_batch(model, batch, *, rng, max_new_tokens: int, temperature: float, top_p: float = 1.0,
                       top_k: int = 0, num_samples: int = 1, eos_token_ids=(), pad_token_id: int = 0,
                       length_buckets=None, patch_buckets=None, layout=None):
    """`generate` on a pipeline prompt batch; dummy rows (valid False, all padding) decode harmlessly
    (`prompt_attention_mask`) and their outputs must be ignored by the caller.

    With `layout` (`cpt_jax.sharding.Layout`; `model` in its sampler layout), the prompts of every process form one
    global batch and each process gets its own rows back as host arrays.
    """
    device = batch.device
    mask = prompt_attention_mask(batch)
    kwargs = {}
    if length_buckets is not None:
        kwargs["length_buckets"] = length_buckets
    if patch_buckets is not None:
        kwargs["patch_buckets"] = patch_buckets
    out = generate(model, device.input_ids, mask, position_ids=device.position_ids, vision=device.vision,
                   max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                   num_samples=num_samples, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, rng=rng,
                   layout=layout, **kwargs)
    return out if layout is None else sharding.local_batch(out)


def decode_completions(tokenizer, tokens, lengths) -> list[str]:
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    return tokenizer.batch_decode([row[:n].tolist() for row, n in zip(tokens, lengths)], skip_special_tokens=True)


def evaluate(model, batches: Iterable, tokenizer, reward_fn: RewardFn, *, rng, max_new_tokens: int,
             temperature: float = 0.5, eos_token_ids=(), pad_token_id: int = 0, desc: str = "eval",
             total: int | None = None, **generate_kwargs) -> EvalResult:
    """Accuracy of `model` over prompt batches (a finite, unshuffled pass of a "prompt" pipeline).

    On several processes each passes its shard's batches (aligned: `Loader.align`) and the `layout`; the accuracy
    and count are over all processes, the records this process's.
    """
    records = []
    for i, batch in enumerate(tqdm(batches, desc=desc, total=total, unit="batch", leave=False)):
        out = generate_for_batch(model, batch, rng=jax.random.fold_in(rng, i), max_new_tokens=max_new_tokens,
                                 temperature=temperature, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
                                 **generate_kwargs)
        texts = decode_completions(tokenizer, out.tokens, out.lengths)
        valid = np.asarray(batch.device.valid)
        keep = [j for j in range(len(texts)) if valid[j]]
        answers = [batch.host.answers[j] for j in keep]
        scores = reward_fn([texts[j] for j in keep], answers)
        for j, answer, score in zip(keep, answers, scores):
            records.append({"id": batch.host.ids[j], "answer": answer, "prediction": texts[j],
                            "accuracy": float(score["accuracy"])})
    # Each process scored its own shard of the split; the accuracy is over all of them.
    sums = np.array([sum(r["accuracy"] for r in records), len(records)], np.float64)
    if jax.process_count() > 1:
        sums = multihost_utils.process_allgather(sums).sum(axis=0)
    if not sums[1]:
        raise ValueError(f"{desc}: no valid examples to evaluate; check the test split and the buckets")
    return EvalResult(float(sums[0] / sums[1]), int(sums[1]), records)
