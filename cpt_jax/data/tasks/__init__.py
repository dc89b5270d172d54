"""TFDS builders (`cpt_<name>`) of the paper's benchmarks and the synthetic suite, and the reader for pipelines.

    prepare("scienceqa", data_dir, manual_dir)        # array_record shards under data_dir/cpt_scienceqa/1.0.0
    for example in load_split("scienceqa", "test", data_dir): ...

Names may drop the "cpt_" prefix; a builder with configs is named "<builder>/<config>" (e.g. "synthetic/count").
"""

import tensorflow_datasets as tfds

from cpt_jax.data.tasks.base import BadExampleError, ExampleSource, Limits, SplitReport, Subset, TaskBuilder
from cpt_jax.data.tasks.geometry3k import CptGeometry3k
from cpt_jax.data.tasks.gqa import CptGqa
from cpt_jax.data.tasks.mmlu_pro import CptMmluPro
from cpt_jax.data.tasks.mmmu import CptMmmu
from cpt_jax.data.tasks.pathvqa import CptPathvqa
from cpt_jax.data.tasks.pope import CptPope
from cpt_jax.data.tasks.scienceqa import CptScienceqa
from cpt_jax.data.tasks.superclevr import CptSuperclevr
from cpt_jax.data.tasks.synthetic import CptSynthetic, SyntheticConfig
from cpt_jax.data.tasks.textvqa import CptTextvqa
from cpt_jax.data.tasks.vizwiz import CptVizwiz

__all__ = [
    "BUILDERS", "BadExampleError", "ExampleSource", "Limits", "SplitReport", "Subset", "SyntheticConfig", "TaskBuilder",
    "expand", "get_builder", "load_split", "prepare",
]

# The paper's sequence, then its general benchmarks, then the embedded suite.
BUILDERS = {
    cls.name: cls
    for cls in (CptScienceqa, CptTextvqa, CptVizwiz, CptGqa, CptGeometry3k, CptPathvqa, CptSuperclevr,
                CptMmmu, CptMmluPro, CptPope, CptSynthetic)
}


def _parse(name, config_object=None):
    builder, _, config = name.partition("/")
    if not builder.startswith("cpt_"):
        builder = f"cpt_{builder}"
    if builder not in BUILDERS:
        raise KeyError(f"unknown dataset {name!r}; choose one of {sorted(BUILDERS)}")
    if config_object is not None:
        if config:
            raise ValueError(f"dataset {name!r} names a config and another was passed; give only one")
        return builder, config_object
    configs = [c.name for c in BUILDERS[builder].BUILDER_CONFIGS]
    if config and config not in configs:
        raise KeyError(f"dataset {builder!r} has no config {config!r}; choose one of {configs}")
    if configs and not config:
        raise KeyError(f"dataset {builder!r} needs a config ('{builder}/<config>'); choose one of {configs}")
    return builder, config or None


def expand(name):
    """Full names (`cpt_x` or `cpt_x/config`) that `name` stands for: every config of a builder named bare."""
    builder = name if name.startswith("cpt_") else f"cpt_{name}"
    if "/" not in name and builder in BUILDERS and BUILDERS[builder].BUILDER_CONFIGS:
        return [f"{builder}/{config.name}" for config in BUILDERS[builder].BUILDER_CONFIGS]
    builder, config = _parse(name)
    return [builder if config is None else f"{builder}/{config}"]


def get_builder(name, data_dir, config=None, **kwargs):
    """The builder `name` stands for, over `data_dir`; kwargs (strict, limits) go to its constructor.

    `config` is a custom `BuilderConfig` (e.g. a `SyntheticConfig` with other sizes) for a bare builder name.
    """
    builder, config = _parse(name, config)
    return BUILDERS[builder](data_dir=data_dir, config=config, **kwargs)


def prepare(name, data_dir, manual_dir=None, *, config=None, strict=False, limits=Limits(), overwrite=False):
    """Writes dataset `name` to `data_dir` from the files in `manual_dir`; returns {split: SplitReport}.

    An already prepared dataset is kept (empty result) unless `overwrite`. Bad examples are skipped and counted,
    or raise `BadExampleError` when `strict`.
    """
    builder = get_builder(name, data_dir, config, strict=strict, limits=limits)
    mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    if overwrite:
        mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
    config = tfds.download.DownloadConfig(manual_dir=None if manual_dir is None else str(manual_dir),
                                          download_mode=mode)
    builder.download_and_prepare(download_config=config)
    return builder.reports


def load_split(name, split, data_dir, config=None):
    """Split `split` of prepared dataset `name` as a sequence of {"id", "question", "answer", "images"}."""
    builder = get_builder(name, data_dir, config)
    if not builder.is_prepared():
        manual = " --manual-dir DIR" if builder.MANUAL_DOWNLOAD_INSTRUCTIONS else ""
        raise FileNotFoundError(
            f"dataset {name!r} is not prepared in {data_dir}; run "
            f"`cpt-jax data prepare --dataset {name}{manual} --data-dir {data_dir}` first"
        )
    if split not in builder.info.splits:
        raise KeyError(f"dataset {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}")
    return ExampleSource(builder.as_data_source(split=split))
