"""The `cpt-jax` command line."""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="cpt-jax", description=__doc__)
    parser.add_subparsers(dest="command", required=True)
    args = parser.parse_args(argv)
    return args


if __name__ == "__main__":
    sys.exit(main())
