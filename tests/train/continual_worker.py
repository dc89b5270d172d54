"""One process of the two-process continual run test (tests/train/test_continual.py): 2 CPU devices, gloo
collectives, `ContinualRun` on the global mesh; prints a line with checksums of the final parameters."""

import argparse
import json
import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402

RESULT = "WORKER_RESULT "


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    args = parser.parse_args()
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)

    import jax.numpy as jnp

    from cpt_jax.train.cli import load_config
    from cpt_jax.train.continual import ContinualRun

    run = ContinualRun(load_config(args.config, ["distributed=True"]), args.workdir)
    summary = run.run()
    # Global reductions: every process computes the same numbers from its own shards.
    checksums = {"abs_sum": float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(run.final_params))),
                 "moved": float(max(jnp.abs(a - b).max() for a, b in
                                    zip(jax.tree.leaves(run.final_params), jax.tree.leaves(run.base_params))))}
    print(RESULT + json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                               "accuracy_matrix": summary["accuracy_matrix"], **checksums}), flush=True)


if __name__ == "__main__":
    main()
