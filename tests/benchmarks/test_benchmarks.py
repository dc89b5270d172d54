"""The benchmarks stay runnable (tiny size, in-process) and training compiles nothing new after warm-up."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import bench_rollout, bench_train, common
from cpt_jax.models.qwen2_5_vl import vision_inputs
from cpt_jax.rl import sampling
from cpt_jax.train.optimizer import make_optimizer
from cpt_jax.train.sft import make_sft_step
from cpt_jax.train.state import create_train_state

FIELDS = ("jax_tokens_per_s", "reference_tokens_per_s", "ratio", "size", "batch", "max_new_tokens", "versions",
          "command")
TINY = common.SIZES["tiny"]


def check_common_fields(result, path, script):
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    assert set(FIELDS) <= set(result)
    assert result["size"] == "tiny" and result["batch"] == TINY.batch
    assert result["max_new_tokens"] == TINY.max_new_tokens
    assert result["command"].startswith(f"python benchmarks/{script} --size tiny")
    assert {"jax", "torch", "transformers"} <= set(result["versions"])
    assert result["jax_tokens_per_s"] > 0 and result["reference_tokens_per_s"] > 0
    assert math.isclose(result["ratio"], result["jax_tokens_per_s"] / result["reference_tokens_per_s"], rel_tol=1e-9)
    assert result["ratio_best"] > 0
    assert result["limits"]["matmul_peak_flops"] > 1e8
    assert result["limits"]["memory_bandwidth_bytes_per_s"] > 1e8


def test_benchmarks_run_and_write_their_fields(tmp_path):
    rollout = bench_rollout.main(["--size", "tiny", "--json", str(tmp_path / "rollout.json")])
    check_common_fields(rollout, tmp_path / "rollout.json", "bench_rollout.py")
    limits = rollout["limits"]
    assert 0 < limits["jax_fraction_of_decode_bound"] < 1
    assert 0 < rollout["jax_prefill_s"] < np.median(rollout["jax_call_s"]) and rollout["jax_decode_step_s"] > 0
    assert math.isclose(limits["ratio_bound"], limits["decode_bound_tokens_per_s"] / rollout["reference_tokens_per_s"])
    # The decode floor streams every text kernel and the lm_head once, fp32.
    model = common.build_model(common.model_config(TINY))
    shapes = common.param_shapes(model)
    weights = int(np.prod(shapes["lm_head/value"])) + sum(
        int(np.prod(v)) for k, v in shapes.items() if k.startswith("language_model") and k.endswith("kernel/value"))
    assert limits["decode_weight_bytes"] == 4 * weights

    train = bench_train.main(["--size", "tiny", "--json", str(tmp_path / "train.json")])
    check_common_fields(train, tmp_path / "train.json", "bench_train.py")
    # Same weights and batch on both sides: the first losses agree, so the two steps compute the same thing.
    np.testing.assert_allclose(train["jax_first_loss"], train["reference_first_loss"], rtol=1e-5)
    assert train["limits"]["model_flops_per_step"] > 6 * train["params"]["text"] * TINY.batch * TINY.sft_length / 2
    assert 0 < train["limits"]["jax_mfu"] < 1 and train["rft_update_median_s"] > 0
    # The matmuls timed alone are the step's text matmuls: 3 per weight and token (x W, dy W^T, x^T dy), 2 FLOPs each.
    assert train["limits"]["matmul_flops"] == 6.0 * weights * TINY.batch * TINY.sft_length
    assert train["limits"]["jax_matmul_s"] > 0 and train["limits"]["torch_matmul_s"] > 0
    # The RFT update runs each prompt once for its samples: fewer FLOPs than as many full [prompt, response] rows.
    rows = train["rft_prompts"] * train["rft_samples"]
    full_rows = 3 * common.forward_flops(model, rows, train["rft_prompt_length"] + train["rft_response"],
                                         train["rft_prompts"], TINY.grid)
    assert 0 < train["rft_model_flops"] < full_rows


class CountTraces:
    """Counts jit traces (each a compilation, or a persistent-cache lookup) while active."""

    def __init__(self):
        self.count = 0

    def _listen(self, event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_trace_duration":
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


def test_compilations_stay_constant_after_warm_up():
    config = common.model_config(TINY)
    model = common.build_model(config)
    ids, mask, pixel_values, grid = bench_rollout.prompts(TINY, config.vision.patch_dim)

    def rollout(trim, seed):
        # Dropping leading columns shortens every prompt; all lengths stay in the same bucket (16 < L <= 32).
        return sampling.generate(model, ids[:, trim:], mask[:, trim:], pixel_values, grid, max_new_tokens=4,
                                 temperature=1.0, top_p=0.99, rng=jax.random.key(seed)).tokens

    with CountTraces() as warm_up:
        rollout(0, 0)
    compiled = sampling.compile_count()
    with CountTraces() as later:
        for trim, seed in ((1, 1), (2, 2), (0, 3)):
            rollout(trim, seed)
    assert warm_up.count >= 2  # prefill and decode were traced once each
    assert sampling.compile_count() == compiled and later.count == 0

    optimizer = make_optimizer({"learning_rate": 1e-3})
    graphdef, state = create_train_state(model, optimizer, 0)
    step = make_sft_step(graphdef, optimizer)

    def device_batch(seed):
        batch = bench_train.sft_batch(TINY, config, seed=seed)
        vision = vision_inputs(batch.pop("pixel_values"), batch.pop("image_grid_thw"), config.vision)
        return {**{k: jnp.asarray(v) for k, v in batch.items()}, "vision": jax.tree.map(jnp.asarray, vision)}

    with CountTraces() as warm_up:
        state, _ = step(state, device_batch(0))
    losses = []
    with CountTraces() as later:
        for seed in (1, 2, 3):
            state, metrics = step(state, device_batch(seed))
            losses.append(float(metrics["loss"]))
    assert warm_up.count >= 1
    assert later.count == 0
    assert int(state.step) == 4 and all(map(np.isfinite, losses))
