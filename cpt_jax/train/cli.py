"""`cpt-jax train | eval | convert`: config files with `--config.a.b=value` overrides."""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import os

import ml_collections


def load_config(path: str, overrides=()) -> ml_collections.ConfigDict:
    """`get_config()` of a Python config file, then `a.b=value` overrides (values parsed as Python literals)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"cpt_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} has no get_config() function")
    config = module.get_config()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like --config.a.b=value")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node, *_ = [config]
        *parents, leaf = key.split(".")
        for name in parents:
            if name not in node:
                raise KeyError(f"override {key!r}: config has no key {name!r}")
            node = node[name]
        if leaf not in node:
            raise KeyError(f"override {key!r}: config has no key {leaf!r} (known: {sorted(node.keys())})")
        if isinstance(node[leaf], tuple) and isinstance(value, list):
            value = tuple(value)
        if isinstance(node[leaf], float) and isinstance(value, int):
            value = float(value)
        node[leaf] = value
    return config


def split_overrides(argv):
    """(other arguments, ["a.b=v", ...]) from argv: argparse cannot declare open-ended `--config.*` keys."""
    args, overrides = [], []
    for a in argv:
        if a.startswith("--config."):
            overrides.append(a[len("--config."):])
        else:
            args.append(a)
    return args, overrides


def _logging():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("absl", "jax", "orbax", "grain", "tensorflow_datasets", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _train(args):
    from cpt_jax.train.continual import ContinualRun

    _logging()
    config = load_config(args.config, args.overrides)
    summary = ContinualRun(config, args.workdir).run()
    print(json.dumps({k: summary[k] for k in ("method", "AA", "FM", "FM_max", "BWT")}, indent=2))
    return 0


def _eval(args):
    from cpt_jax import sharding
    from cpt_jax.train.continual import ContinualRun

    config = load_config(args.config, args.overrides)
    run = ContinualRun(config, args.workdir)
    params = run.latest_params()
    with sharding.compilation_cache(config.compilation_cache_dir):
        accuracies = run.evaluate_tasks(params, run.tasks + run.general, seed=config.seed + 3)
    print(json.dumps(accuracies, indent=2))
    return 0


def _convert(args):
    from flax import nnx

    from cpt_jax.models.qwen2_5_vl import save_hf_checkpoint
    from cpt_jax.train.continual import ContinualRun

    config = load_config(args.config, args.overrides)
    run = ContinualRun(config, args.workdir)
    save_hf_checkpoint(nnx.merge(run.graphdef, run.latest_params()), args.out)
    print(f"wrote {args.out}")
    return 0


def register(subparsers):
    for name, fn, doc in (("train", _train, "run (or resume) the continual experiment of a config"),
                          ("eval", _eval, "evaluate the latest checkpoint on every task and general benchmark"),
                          ("convert", _convert, "export the latest checkpoint's weights as a HF checkpoint")):
        parser = subparsers.add_parser(name, help=doc, description=doc + "; override keys with --config.a.b=value")
        parser.add_argument("--config", required=True, help="a Python config file with get_config()")
        parser.add_argument("--workdir", required=True)
        if name == "convert":
            parser.add_argument("--out", required=True, help="output directory for the HF checkpoint")
        parser.set_defaults(func=fn)
