"""`cpt-jax report --workdir DIR`: renders DIR/report.md and its plots from the results summaries in DIR."""


def register(subparsers):
    """Adds the `report` subcommand."""
    parser = subparsers.add_parser("report", help="tables and plots from the results in a workdir")
    parser.add_argument(
        "--workdir", required=True, help="directory holding results/summary.json or per-method runs"
    )
    parser.set_defaults(func=_run)


def _run(args):
    # Imported here so `cpt-jax --help` does not pay for matplotlib.
    from cpt_jax.eval.report import write_report

    print(write_report(args.workdir))
    return 0
