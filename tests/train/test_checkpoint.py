import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpt_jax.train.checkpoint import Checkpointer
from cpt_jax.train.optimizer import OptimizerConfig, make_optimizer
from cpt_jax.train.state import apply_gradients, create_train_state


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (3, 4)))
        self.b = nnx.Param(jnp.zeros(4))


def _state(seed):
    opt = make_optimizer(OptimizerConfig(learning_rate=0.1))
    _, state = create_train_state(Tiny(nnx.Rngs(seed)), opt, seed)
    return apply_gradients(state, jax.tree.map(jnp.ones_like, state.params), opt)


def test_round_trip_restores_params_optimizer_rng_and_loop(tmp_path):
    ck = Checkpointer(tmp_path / "ckpt", keep=2)
    state = _state(0)
    loop = {"task_index": 1, "accuracy_matrix": [[0.5, None]], "iterator": {"a": [1, 2]}}
    ck.save(7, state, loop, extra={"ref": state.params})
    restored, loop2, extra = Checkpointer(tmp_path / "ckpt").restore(_state(1), extra_like={"ref": state.params})
    assert loop2 == loop
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        if jnp.issubdtype(getattr(a, "dtype", None), jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(extra["ref"]), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(restored.step) == 1


def test_keeps_the_last_k(tmp_path):
    ck = Checkpointer(tmp_path / "ckpt", keep=2)
    state = _state(0)
    for step in (1, 2, 3):
        ck.save(step, state, {"s": step})
    assert ck.latest_step() == 3
    assert sorted(ck.manager.all_steps()) == [2, 3]
