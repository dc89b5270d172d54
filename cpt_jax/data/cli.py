"""`cpt-jax data`: prepare a dataset's array_record shards from a manual dir, and show a few decoded examples.

    cpt-jax data prepare --dataset scienceqa --manual-dir ~/raw/scienceqa --data-dir ~/tfds
    cpt-jax data prepare --dataset synthetic --data-dir ~/tfds          # every synthetic task
    cpt-jax data show --dataset scienceqa --data-dir ~/tfds --split test -n 3
"""

import itertools


def register(subparsers):
    parser = subparsers.add_parser("data", help="prepare and inspect datasets", description=__doc__)
    commands = parser.add_subparsers(dest="data_command", required=True)

    prepare = commands.add_parser("prepare", help="write a dataset's array_record shards")
    prepare.add_argument("--dataset", required=True,
                         help="cpt_<name> or <name>, e.g. scienceqa, synthetic/count (synthetic: all tasks)")
    prepare.add_argument("--manual-dir", help="<split>.json (LLaMA-Factory) or <split>-*.parquet files")
    prepare.add_argument("--data-dir", required=True, help="where TFDS writes the dataset")
    prepare.add_argument("--strict", action="store_true", help="stop at the first bad example instead of skipping")
    prepare.add_argument("--overwrite", action="store_true", help="rebuild a dataset that is already prepared")
    prepare.add_argument("--max-prompt-chars", type=int, help="skip longer questions (default 16384)")
    prepare.add_argument("--max-prompt-tokens", type=int, help="skip longer questions; needs --tokenizer")
    prepare.add_argument("--tokenizer", help="Hugging Face tokenizer directory that counts --max-prompt-tokens")
    prepare.set_defaults(func=_reporting_errors(_prepare))

    show = commands.add_parser("show", help="print a few decoded examples of a prepared split")
    show.add_argument("--dataset", required=True)
    show.add_argument("--data-dir", required=True)
    show.add_argument("--split", default="test")
    show.add_argument("-n", type=int, default=3, help="how many examples")
    show.set_defaults(func=_reporting_errors(_show))


def _reporting_errors(command):
    """`command` with bad names, missing files and bad examples reported as a one-line error, not a traceback."""

    def run(args):
        try:
            return command(args)
        except (KeyError, FileNotFoundError, ValueError) as error:
            raise SystemExit(f"error: {error.args[0] if error.args else error}") from None

    return run


def _limits(args):
    from cpt_jax.data import tasks

    overrides = {}
    if args.max_prompt_chars is not None:
        overrides["max_prompt_chars"] = args.max_prompt_chars
    if args.max_prompt_tokens is not None:
        if not args.tokenizer:
            raise SystemExit("--max-prompt-tokens needs --tokenizer DIR to count tokens")
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
        overrides["max_prompt_tokens"] = args.max_prompt_tokens
        overrides["count_tokens"] = lambda text: len(tokenizer(text)["input_ids"])
    return tasks.Limits(**overrides)


def _prepare(args):
    from cpt_jax.data import tasks

    limits = _limits(args)
    for name in tasks.expand(args.dataset):
        if args.manual_dir is None and tasks.get_builder(name, args.data_dir).MANUAL_DOWNLOAD_INSTRUCTIONS:
            raise SystemExit(f"{name} is read from files you provide: pass --manual-dir DIR")
        reports = tasks.prepare(name, args.data_dir, args.manual_dir, strict=args.strict, limits=limits,
                                overwrite=args.overwrite)
        if not reports:
            print(f"{name}: already prepared in {args.data_dir}; pass --overwrite to rebuild it")
        for report in reports.values():
            print(f"{name} {report.summary()}")
    return 0


def _show(args):
    from cpt_jax.data import tasks

    examples = tasks.load_split(args.dataset, args.split, args.data_dir)
    recorded = tasks.get_builder(args.dataset, args.data_dir).info.metadata.get(args.split)
    header = f"{args.dataset} {args.split}: {len(examples)} examples"
    if recorded:
        header += f" ({tasks.SplitReport.from_dict(args.split, recorded).summary()})"
    print(header)
    for example in itertools.islice(examples, args.n):
        shapes = ", ".join("x".join(map(str, image.shape)) for image in example["images"]) or "none"
        print(f"\nid: {example['id']}\nquestion: {example['question']}\nanswer: {example['answer']}\n"
              f"images: {shapes}")
    return 0
