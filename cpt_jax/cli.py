"""The `cpt-jax` command line: a thin dispatcher; each subcommand lives next to the code it drives."""

import argparse
import importlib
import sys

# subcommand -> module exposing `register(subparsers)`, which adds the parser and sets `func`.
# Modules are imported lazily so `cpt-jax --help` stays fast and `aot` can set JAX flags first.
_COMMANDS = {
    "aot": "cpt_jax.aot",
    "data": "cpt_jax.data.cli",
    "demo": "cpt_jax.demo",
    "report": "cpt_jax.eval.report_cli",
    "train": "cpt_jax.train.cli",
}


def build_parser():
    parser = argparse.ArgumentParser(prog="cpt-jax", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in _COMMANDS.values():
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv=None):
    from cpt_jax.train.cli import split_overrides

    argv, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.overrides = overrides
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
