import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cpt_jax.train.optimizer import make_optimizer, path_str
from cpt_jax.train.state import (TrainState, accumulate_gradients, apply_gradients, cast_floating, check_finite,
                                 create_train_state)


class Toy(nnx.Module):
    """A two-tower regression model: paths visual/{kernel,bias} and language_model/{kernel,bias}."""

    def __init__(self, param_dtype=jnp.float32):
        rngs = nnx.Rngs(0)
        self.visual = nnx.Linear(3, 3, rngs=rngs, param_dtype=param_dtype)
        self.language_model = nnx.Linear(3, 1, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x):
        return self.language_model(jnp.tanh(self.visual(x)))[..., 0]


def make_loss_fn(graphdef):
    def loss_fn(params, batch):
        err = nnx.merge(graphdef, params)(batch["x"]) - batch["y"]
        return jnp.sum(batch["w"] * err**2), jnp.sum(batch["w"])

    return loss_fn


def toy_batch(n, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 3)).astype(np.float32), "y": rng.normal(size=(n,)).astype(np.float32),
            "w": (rng.random(n) < 0.6).astype(np.float32)}


def flat(tree):
    return {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_create_train_state_is_a_pure_pytree_with_master_weights():
    optimizer = make_optimizer(dict(learning_rate=0.1))
    graphdef, state = create_train_state(Toy(param_dtype=jnp.bfloat16), optimizer, 3, param_dtype=jnp.float32)
    assert isinstance(state, TrainState) and isinstance(state.params, nnx.State)
    assert int(state.step) == 0
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert jnp.issubdtype(state.rng.dtype, jax.dtypes.prng_key)
    assert sorted(flat(state.params)) == ["language_model/bias/value", "language_model/kernel/value",
                                          "visual/bias/value", "visual/kernel/value"]
    model = nnx.merge(graphdef, state.params)
    assert model(np.ones((2, 3), np.float32)).shape == (2,)


def test_create_train_state_rejects_non_parameter_state():
    class WithStats(Toy):
        def __init__(self):
            super().__init__()
            self.stats = nnx.BatchStat(jnp.zeros(3))

    with pytest.raises(ValueError, match="Non-exhaustive filters"):
        create_train_state(WithStats(), make_optimizer({}), 0)


def test_cast_floating_leaves_integers():
    cast = cast_floating({"a": jnp.ones(2), "b": jnp.arange(3)}, jnp.bfloat16)
    assert cast["a"].dtype == jnp.bfloat16 and cast["b"].dtype == jnp.int32


def test_micro_batches_accumulate_to_the_full_batch_gradient():
    graphdef, params = nnx.split(Toy(), nnx.Param)
    loss_fn = make_loss_fn(graphdef)
    batch = toy_batch(12)
    full_sum, full_count, full_grads = accumulate_gradients(loss_fn, params, jax.tree.map(lambda x: x[None], batch))
    micro = jax.tree.map(lambda x: x.reshape(3, 4, *x.shape[1:]), batch)
    sum3, count3, grads3 = jax.jit(accumulate_gradients, static_argnums=0)(loss_fn, params, micro)
    assert float(full_count) == batch["w"].sum() == float(count3)
    np.testing.assert_allclose(sum3, full_sum, rtol=1e-6)
    for k, g in flat(full_grads).items():
        np.testing.assert_allclose(flat(grads3)[k], g, rtol=1e-6, atol=1e-7, err_msg=k)
    assert np.abs(flat(full_grads)["visual/kernel/value"]).max() > 0


def test_frozen_parameters_get_zero_gradients():
    graphdef, params = nnx.split(Toy(), nnx.Param)
    frozen = make_optimizer(dict(freeze=(r"visual/.*",))).frozen
    _, _, grads = accumulate_gradients(make_loss_fn(graphdef), params, jax.tree.map(lambda x: x[None], toy_batch(8)),
                                       frozen=frozen)
    grads = flat(grads)
    assert np.all(grads["visual/kernel/value"] == 0) and np.all(grads["visual/bias/value"] == 0)
    assert np.abs(grads["language_model/kernel/value"]).max() > 0


def test_apply_gradients_updates_trainable_and_passes_frozen_through_bitwise():
    optimizer = make_optimizer(dict(learning_rate=0.1, freeze=(r"visual/.*",)))
    _, state = create_train_state(Toy(), optimizer, 0)
    # -0.0 + 0.0 would give +0.0: frozen values must not go through arithmetic at all.
    state = state.replace(params=jax.tree_util.tree_map_with_path(
        lambda kp, p: p.at[0].set(-0.0) if "visual/bias" in path_str(kp) else p, state.params))
    grads = jax.tree.map(jnp.ones_like, state.params)
    new = jax.jit(apply_gradients, static_argnums=2)(state, grads, optimizer)
    before, after = flat(state.params), flat(new.params)
    assert int(new.step) == 1
    for k in before:
        if k.startswith("visual"):
            assert before[k].tobytes() == after[k].tobytes(), k
        else:
            # Adam's first step is lr * sign(g), up to fp32 rounding of the bias corrections.
            np.testing.assert_allclose(after[k], before[k] - 0.1, rtol=1e-5)
    assert np.signbit(after["visual/bias/value"][0])


def test_check_finite_names_step_and_quantity():
    check_finite({"loss": np.float32(1.0), "grad_norm": np.float32(2.0), "finite": np.bool_(True)}, 3)
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(loss=nan\) at step 7"):
        check_finite({"loss": np.float32(np.nan), "grad_norm": np.float32(1.0), "finite": np.bool_(False)}, 7)
    with pytest.raises(FloatingPointError, match=r"non-finite gradient \(grad_norm=inf\) at step 12"):
        check_finite({"loss": jnp.float32(1.0), "grad_norm": jnp.float32(np.inf), "finite": jnp.bool_(False)}, 12)
