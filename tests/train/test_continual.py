"""The continual loop end to end on tiny settings: every method, summaries, kill-and-resume, the demo."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cpt_jax import demo
from cpt_jax.data import tasks
from cpt_jax.data.tokenizer import build_tiny_tokenizer, load_tokenizer
from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, save_hf_checkpoint
from cpt_jax.train.config import METHODS
from cpt_jax.train.continual import ContinualRun
from cpt_jax.train.optimizer import path_str
from tests.train import tiny_configs
from tests.train.tiny_configs import CONFIG_FILE, GENERAL, TASKS


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("continual")
    tok_dir = build_tiny_tokenizer(root / "tokenizer", extra_texts=[demo.COT_TARGET])
    data_dir = root / "data"
    for name in TASKS + GENERAL:
        tasks.prepare(name, data_dir, config=None)
    tokenizer = load_tokenizer(tok_dir)
    config = demo.tiny_model_config(tokenizer)
    abstract = nnx.eval_shape(lambda: Qwen2_5_VL(config, rngs=nnx.Rngs(0)))
    graphdef, shapes = nnx.split(abstract, nnx.Param)
    rng = np.random.default_rng(0)

    def draw(path, x):  # numpy init: JAX random init compiles one program per shape
        noise = rng.standard_normal(x.shape).astype(np.float32)
        return jnp.asarray(1.0 + 0.1 * noise if path_str(path).endswith("scale/value") else 0.1 * noise)

    base = root / "base"
    save_hf_checkpoint(nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, shapes)), base)
    for name in os.listdir(tok_dir):
        (base / name).write_bytes((tok_dir / name).read_bytes() if hasattr(tok_dir, "read_bytes")
                                  else open(os.path.join(tok_dir, name), "rb").read())
    return {"base": str(base), "data": str(data_dir)}


def tiny_config(method, assets, changes=None):
    return tiny_configs.tiny_config(method, assets["base"], assets["data"], changes)


def write_config(path, method, assets, changes):
    """A config file for a subprocess, holding the same settings as `tiny_config(method, assets, changes)`."""
    path.write_text(CONFIG_FILE.format(method=method, base=assets["base"], data=assets["data"], changes=changes))
    return path


def with_repo_on_path(environ):
    """`environ` with the repository on PYTHONPATH, so subprocesses import `tests.train.tiny_configs`."""
    env = dict(environ)
    env["PYTHONPATH"] = os.pathsep.join([str(pathlib.Path(__file__).parents[2]), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_a_two_task_sequence(method, assets, tmp_path):
    config = tiny_config(method, assets)
    if method == "rif_rft":
        config.rft.reward = "test_length_parity"
    run = ContinualRun(config, tmp_path)
    summary = run.run()
    written = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert summary["method"] == method and summary["tasks"] == list(TASKS)
    if method == "sft":  # where each task starts: the initial model's accuracy, evaluated as the stages are
        assert summary["initial"] == run.evaluate_tasks(run.base_params, run.tasks, seed=config.seed + 3)
    assert set(summary["initial"]) == set(TASKS)
    matrix = np.array(summary["accuracy_matrix"], dtype=float)
    assert matrix.shape == (2, 2)
    assert np.all((matrix[np.tril_indices(2)] >= 0) & (matrix[np.tril_indices(2)] <= 1))
    assert set(summary["general"]["before"]) == set(summary["general"]["after"]) == set(GENERAL)
    assert summary["AA"] == pytest.approx(matrix[1].mean())
    if method.startswith("multitask"):
        assert summary["FM"] == 0.0
    if method == "rif_rft":
        kept = [json.loads(p.read_text()) for p in (tmp_path / "rif").iterdir()]
        assert len(kept) == 2 and all(0 < len(k["kept_ids"]) <= 8 for k in kept)
    if "rft" in method or method in ("rloo", "reinforce"):
        diag = [json.loads(line) for line in (tmp_path / "results" / "diagnostics.jsonl").read_text().splitlines()]
        assert diag and all(0.0 <= d["zero_var_frac"] <= 1.0 for d in diag)
    assert (tmp_path / "tb" / "train").is_dir()


@pytest.mark.parametrize("method", ["sft", "rft"])
def test_a_run_on_a_mesh_matches_one_device(method, assets, tmp_path):
    runs = {}
    for name, mesh in (("one", {"num_devices": 1}), ("mesh", {"num_devices": 8, "data": 2, "fsdp": 2, "tensor": 2})):
        config = tiny_config(method, assets)
        config.data.general = ()
        config.diagnostics.gradient_every = 0
        # Adam turns a gradient of ~1e-9 (a rarely seen embedding row) into a full lr-sized step whose sign follows
        # summation order; a large eps keeps the update proportional to the gradient so 1e-5 compares the sharding
        # (and a large lr makes the steps count).
        config.optim.eps = 1.0
        config.optim.learning_rate = 0.1
        config.rft.reward = "test_length_parity"  # mixed groups, so RFT has advantages to follow
        config.mesh.update(mesh)
        run = ContinualRun(config, tmp_path / name)
        runs[name] = (run.run(), run.final_params)
        moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                    for a, b in zip(jax.tree.leaves(run.final_params), jax.tree.leaves(run.base_params)))
        assert moved > 1e-3
    (one, one_params), (sharded, sharded_params) = runs["one"], runs["mesh"]
    assert sharded["accuracy_matrix"] == one["accuracy_matrix"]
    specs = [leaf.sharding.spec for leaf in jax.tree.leaves(sharded_params)]
    assert any("fsdp" in jax.tree.leaves(tuple(spec)) for spec in specs)
    assert any("tensor" in jax.tree.leaves(tuple(spec)) for spec in specs)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(one_params)[0], jax.tree.leaves(sharded_params)):
        assert len(b.sharding.device_set) == 8
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5, err_msg=path_str(path))


def _train_cmd(config_path, workdir):
    return [sys.executable, "-m", "cpt_jax.cli", "train", "--config", str(config_path), "--workdir", str(workdir)]


def _final(workdir, config_path):
    from cpt_jax.train.cli import load_config

    run = ContinualRun(load_config(str(config_path)), workdir)
    params = {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(run.latest_params())[0]}
    return params, json.loads((workdir / "results" / "summary.json").read_text())


def test_a_run_killed_mid_task_resumes_to_the_same_result(assets, tmp_path):
    # A sharded state (4 devices, tensor 2): the checkpoint restores onto the mesh.
    config_path = write_config(tmp_path / "tiny_rft.py", "rft", assets, {
        "data.max_train_examples": 12, "schedule.max_steps_per_task": 3, "diagnostics.gradient_every": 0,
        "checkpoint.every_steps": 1, "checkpoint.keep": 2, "mesh.num_devices": 4, "mesh.tensor": 2})
    env = with_repo_on_path(os.environ)
    subprocess.run(_train_cmd(config_path, tmp_path / "straight"), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(config_path, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # Save 2 is the second mid-task checkpoint of the first task: the run is inside a task when it dies.
    while not (killed / "checkpoints" / "2").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "results" / "summary.json").exists()
    subprocess.run(_train_cmd(config_path, killed), check=True, env=env, capture_output=True)

    straight_params, straight_summary = _final(tmp_path / "straight", config_path)
    killed_params, killed_summary = _final(killed, config_path)
    assert killed_summary == straight_summary
    for path, value in straight_params.items():
        np.testing.assert_array_equal(killed_params[path], value, err_msg=path)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "rft"])
def test_two_processes_run_the_loop_on_one_global_mesh(method, assets, tmp_path):
    """2 CPU processes x 2 devices (gloo): each reads its own shard of every batch, the steps run on the global
    4-device mesh, both end with the same global parameters and accuracies, and only process 0 writes results."""
    from tests.test_sharding import _free_port

    config_path = write_config(tmp_path / "tiny.py", method, assets, {
        "data.general": (), "rft.prompt_batch_size": 4,  # 2 prompts per process: one per data-parallel device
        "rft.rollout_batches": 1, "rft.reward": "test_length_parity", "diagnostics.gradient_every": 0,
        "checkpoint.every_steps": 1, "optim.learning_rate": 0.1, "mesh.num_devices": 0})
    env = with_repo_on_path({k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    coordinator = f"localhost:{_free_port()}"
    workers = [subprocess.Popen([sys.executable, "-m", "tests.train.continual_worker", "--config", str(config_path),
                                 "--workdir", str(tmp_path / "run"), "--coordinator", coordinator,
                                 "--process-id", str(i), "--num-processes", "2"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    for w, (_, err) in zip(workers, outputs):
        assert w.returncode == 0, err[-3000:]
    results = [json.loads(line[len("WORKER_RESULT "):]) for out, _ in outputs for line in out.splitlines()
               if line.startswith("WORKER_RESULT ")]
    assert [r["process"] for r in results] == [0, 1] and all(r["devices"] == 4 for r in results)
    assert results[0]["accuracy_matrix"] == results[1]["accuracy_matrix"]
    assert results[0]["abs_sum"] == results[1]["abs_sum"]
    assert results[0]["moved"] > 1e-3
    summary = json.loads((tmp_path / "run" / "results" / "summary.json").read_text())
    assert summary["accuracy_matrix"] == results[0]["accuracy_matrix"]
    assert (tmp_path / "run" / "checkpoints").is_dir()


def test_rif_rollout_keys_do_not_depend_on_the_process_hash_salt():
    # RIF's rollouts are keyed by example id; Python salts str hashes per process, so a hash-based key made each
    # run keep different items. Two interpreters with different salts must derive the same key.
    code = ("import jax; from cpt_jax.train.continual import example_key; "
            "print(jax.random.key_data(example_key(jax.random.key(3), 'colour_single-train-0-17')).tolist())")
    keys = [subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": salt,
                                                                "JAX_PLATFORMS": "cpu"},
                           capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            for salt in ("1", "2")]
    assert keys[0] == keys[1]
    from cpt_jax.train.continual import example_key
    a, b = (jax.random.key_data(example_key(jax.random.key(3), i)) for i in ("x-0", "x-1"))
    assert not np.array_equal(a, b)

