import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from cpt_jax.train.optimizer import SCHEDULES, OptimizerConfig, make_optimizer, path_str


class Toy(nnx.Module):
    """Parameter paths: visual/{kernel,bias}, language_model/{kernel,bias}, lm_head."""

    def __init__(self):
        rngs = nnx.Rngs(0)
        self.visual = nnx.Linear(3, 2, rngs=rngs)
        self.language_model = nnx.Linear(2, 4, rngs=rngs)
        self.lm_head = nnx.Param(jax.random.normal(jax.random.key(1), (4, 5)))


def toy_params():
    _, params = nnx.split(Toy(), nnx.Param)
    return params


def toy_grads(params, seed=0, scale=1.0):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def flat(tree):
    return {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def first_update(config, params, grads):
    tx = make_optimizer(config).tx
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    return flat(updates)


def adamw_first_update(g, p, *, lr, wd=0.0, eps=1e-8):
    # Bias-corrected first Adam step: m_hat = g, v_hat = g**2.
    return -lr * (g / (np.abs(g) + eps) + wd * p)


def test_schedules_match_hf_formulas():
    # 10 updates, warmup ceil(0.15 * 10) = 2: lr 0 at the first update, the peak at update 2.
    cosine = SCHEDULES["cosine"](2.0, 2, 10)
    progress = lambda s: (s - 2) / 8
    expected = [0.0, 1.0] + [2.0 * 0.5 * (1 + math.cos(math.pi * progress(s))) for s in range(2, 11)]
    np.testing.assert_allclose([float(cosine(s)) for s in range(11)], expected, rtol=1e-6, atol=1e-7)
    assert float(cosine(6)) == pytest.approx(1.0)
    assert float(cosine(10)) == pytest.approx(0.0, abs=1e-7)

    constant = SCHEDULES["constant"](2.0, 4, 10)
    np.testing.assert_allclose([float(constant(s)) for s in range(7)], [0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0])
    assert float(SCHEDULES["constant"](3.0, 0, 0)(0)) == 3.0

    config = OptimizerConfig(learning_rate=2.0, schedule="cosine", warmup_ratio=0.15, total_steps=10)
    assert config.warmup_steps == 2
    schedule = make_optimizer(config).learning_rate
    np.testing.assert_allclose([float(schedule(s)) for s in range(11)], expected, rtol=1e-6, atol=1e-7)


def test_adamw_first_step_with_weight_decay_and_exclusion():
    params = toy_params()
    grads = toy_grads(params, scale=1e-2)
    config = dict(learning_rate=0.1, weight_decay=0.5, max_grad_norm=0.0, weight_decay_exclude=(r".*bias",))
    got = first_update(config, params, grads)
    p, g = flat(params), flat(grads)
    for path in p:
        wd = 0.0 if path.endswith("bias") else 0.5
        np.testing.assert_allclose(got[path], adamw_first_update(g[path], p[path], lr=0.1, wd=wd), rtol=1e-5, atol=1e-6,
                                   err_msg=path)


def test_clipping_uses_the_global_norm_of_trainable_gradients_only():
    params = toy_params()
    grads = toy_grads(params, scale=3.0)
    # Huge frozen gradients must not shrink the trainable ones.
    grads = jax.tree_util.tree_map_with_path(lambda kp, g: g * 1e6 if path_str(kp).startswith("visual") else g,
                                             grads)
    eps = 1.0  # large, so the Adam step depends on the gradient's size and clipping shows
    config = dict(learning_rate=1.0, eps=eps, max_grad_norm=0.5, freeze=(r"visual/.*",))
    got = first_update(config, params, grads)
    g = flat(grads)
    trainable = [k for k in g if not k.startswith("visual")]
    norm = np.sqrt(sum(np.sum(g[k].astype(np.float64) ** 2) for k in trainable))
    assert norm > 0.5
    for k in trainable:
        np.testing.assert_allclose(got[k], adamw_first_update(g[k] * 0.5 / norm, 0.0, lr=1.0, eps=eps), rtol=1e-5)
        unclipped = adamw_first_update(g[k], 0.0, lr=1.0, eps=eps)
        assert not np.allclose(got[k], unclipped, rtol=1e-2)
    for k in g:
        if k.startswith("visual"):
            np.testing.assert_array_equal(got[k], 0.0)


def test_freezing_keeps_no_state_and_zero_update():
    params = toy_params()
    optimizer = make_optimizer(dict(learning_rate=0.1, freeze=(r"visual/.*",)))
    state = optimizer.tx.init(params)
    n_trainable = sum(x.size for k, x in flat(params).items() if not k.startswith("visual"))
    # Adam keeps mu and nu for trainable parameters only.
    assert sum(x.size for x in jax.tree.leaves(state) if x.ndim) == 2 * n_trainable
    updates, _ = optimizer.tx.update(toy_grads(params), state, params)
    for k, u in flat(updates).items():
        assert np.all(u == 0) == k.startswith("visual"), k
    assert optimizer.frozen(("visual", "kernel"), None)
    assert not optimizer.frozen(("language_model", "kernel"), None)


def test_lr_scale_group_halves_the_update():
    params = toy_params()
    grads = toy_grads(params)
    base = first_update(dict(learning_rate=0.1, weight_decay=0.1), params, grads)
    scaled = first_update(dict(learning_rate=0.1, weight_decay=0.1, lr_scales=((r"language_model/.*", 0.5),)),
                          params, grads)
    for k in base:
        factor = 0.5 if k.startswith("language_model") else 1.0
        np.testing.assert_allclose(scaled[k], factor * base[k], rtol=1e-7, err_msg=k)


def test_unmatched_patterns_raise():
    params = toy_params()
    with pytest.raises(ValueError, match=r"freeze pattern 'vision/\.\*' matches no parameter.*visual/kernel"):
        make_optimizer(dict(freeze=(r"vision/.*",))).tx.init(params)
    with pytest.raises(ValueError, match="lr_scales pattern 'head' matches no parameter"):
        make_optimizer(dict(lr_scales=(("head", 0.1),))).tx.init(params)
    with pytest.raises(ValueError, match=r"weight_decay_exclude pattern '\.\*norm' matches no parameter"):
        make_optimizer(dict(weight_decay_exclude=(".*norm",))).tx.init(params)


def test_config_from_config_dict_and_validation():
    config = ml_collections.ConfigDict(dict(learning_rate=1e-6, b2=0.99, weight_decay=1e-2, freeze=[r"visual/.*"],
                                            lr_scales=[(r"lm_head", 2)], schedule="constant"))
    parsed = OptimizerConfig.from_config(config)
    assert parsed.freeze == (r"visual/.*",) and parsed.lr_scales == ((r"lm_head", 2.0),) and parsed.b2 == 0.99
    with pytest.raises(ValueError, match=r"unknown optimizer config keys \['beta1'\]"):
        OptimizerConfig.from_config(dict(beta1=0.9))
    with pytest.raises(ValueError, match="needs the number of updates: set total_steps"):
        OptimizerConfig(schedule="cosine")
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        OptimizerConfig(schedule="linear")


def test_update_is_jittable_and_keeps_dtypes():
    params = toy_params()
    optimizer = make_optimizer(dict(learning_rate=0.1, freeze=(r"visual/.*",), lr_scales=((r"lm_head", 0.5),)))
    state = optimizer.tx.init(params)
    updates, new_state = jax.jit(optimizer.tx.update)(toy_grads(params), state, params)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(updates))
    assert isinstance(optax.apply_updates(params, updates), nnx.State)
