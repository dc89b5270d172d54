"""Peak host memory of `load_hf_checkpoint` for a large synthetic checkpoint, onto an 8-device mesh and unsharded.

    python benchmarks/bench_load.py --layers 4 --out benchmarks/results/load_3b_widths.json

The checkpoint has the published Qwen2.5-VL-3B widths (151936-token vocabulary, hidden 2048, vision 1280) with
`--layers` decoder layers and vision blocks, random fp32 weights, sharded safetensors files; a separate process
writes it. Each load then runs in a fresh process on 8 host CPU devices and samples its anonymous resident memory
(`AnonPeak`). On CPU the devices' buffers are host memory, so the loaded parameters themselves are part of the
peak; the figure that tells whether loading materialises more than the shards is the overhead: peak anonymous
memory - before the load - bytes of the loaded parameters.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

GiB = 1024**3


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class AnonPeak:
    """Samples the process's anonymous resident memory every millisecond in a thread and keeps the maximum.

    Anonymous memory is what the process allocated; the resident pages of the memory-mapped safetensors files are
    page cache the kernel drops under pressure, so they are reported separately (`peak_rss`, from ru_maxrss).
    """

    def __init__(self):
        self.peak = _status_bytes("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _status_bytes("RssAnon"))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_bytes("RssAnon"))


def write_checkpoint(out_dir: str, layers: int) -> None:
    """Random fp32 weights of the 3B widths with `layers` layers, drawn with numpy (no per-shape compilation)."""
    import numpy as np
    from flax import nnx

    from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig, save_hf_checkpoint
    from cpt_jax.models.qwen2_5_vl.published import PUBLISHED

    hf = copy.deepcopy(PUBLISHED["Qwen/Qwen2.5-VL-3B-Instruct"])
    hf["num_hidden_layers"] = layers
    hf["vision_config"].update(depth=layers, fullatt_block_indexes=[layers - 1])
    config = Qwen2_5_VLConfig.from_hf(hf)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen2_5_VL(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    state = nnx.State.from_flat_path({
        path: leaf.replace(rng.standard_normal(leaf.value.shape, np.float32) * 0.02)
        for path, leaf in nnx.to_flat_state(state)})
    save_hf_checkpoint(nnx.merge(graphdef, state), out_dir, max_shard_bytes=GiB)


def measure_load(ckpt_dir: str, sharded: bool) -> dict:
    """Loads the checkpoint (onto an fsdp=8 mesh when `sharded`) and returns the memory figures of this process."""
    import resource

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from cpt_jax import sharding
    from cpt_jax.models.qwen2_5_vl import load_hf_checkpoint

    mesh = sharding.make_mesh(fsdp=-1) if sharded else None
    before = _status_bytes("RssAnon")
    start = time.perf_counter()
    with AnonPeak() as anon:
        model = load_hf_checkpoint(ckpt_dir, dtype=jnp.float32, mesh=mesh)
        leaves = jax.block_until_ready(jax.tree.leaves(nnx.state(model, nnx.Param)))
    seconds = time.perf_counter() - start
    param_bytes = sum(x.nbytes for x in leaves)
    largest_shard = max(max(s.data.nbytes for s in x.addressable_shards) for x in leaves)
    return {"sharded": sharded, "devices": len(jax.devices()), "load_s": seconds, "anon_before": before,
            "anon_peak": anon.peak, "param_bytes": param_bytes, "overhead_bytes": anon.peak - before - param_bytes,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "largest_device_buffer_bytes": largest_shard}


def _child(args: list[str]) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run([sys.executable, __file__, *args], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", help="write the result JSON here")
    parser.add_argument("--_write", help=argparse.SUPPRESS)
    parser.add_argument("--_load", help=argparse.SUPPRESS)
    parser.add_argument("--_sharded", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._write:
        write_checkpoint(args._write, args.layers)
        print(json.dumps({}))
        return
    if args._load:
        print(json.dumps(measure_load(args._load, args._sharded)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        _child(["--_write", tmp, "--layers", str(args.layers)])
        files = [f for f in os.listdir(tmp) if f.endswith(".safetensors")]
        checkpoint_bytes = sum(os.path.getsize(os.path.join(tmp, f)) for f in files)
        runs = [_child(["--_load", tmp, *(["--_sharded"] if sharded else [])]) for sharded in (True, False)]
    result = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "layers": args.layers,
              "checkpoint_bytes": checkpoint_bytes, "safetensors_files": len(files), "runs": runs}
    for run in runs:
        print(f"{'mesh fsdp=8' if run['sharded'] else 'unsharded  '}: checkpoint {checkpoint_bytes / GiB:.2f} GiB, "
              f"params {run['param_bytes'] / GiB:.2f} GiB, peak anonymous memory {run['anon_peak'] / GiB:.2f} GiB "
              f"(before load {run['anon_before'] / GiB:.2f}), overhead {run['overhead_bytes'] / GiB:+.2f} GiB, "
              f"peak RSS with mapped files {run['peak_rss'] / GiB:.2f} GiB, "
              f"largest device buffer {run['largest_device_buffer_bytes'] / GiB:.3f} GiB, {run['load_s']:.1f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
