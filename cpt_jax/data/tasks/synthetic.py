"""The synthetic suite (`cpt_jax.data.synthetic`) as a TFDS dataset: one config per task, no manual dir."""

import dataclasses

import tensorflow_datasets as tfds

from cpt_jax.data import synthetic
from cpt_jax.data.tasks import base

_CHUNK = 256


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
    """A synthetic task with its split sizes, image side and seed; the shipped configs are named after their task.

    A custom config needs a name of its own: `SyntheticConfig(name="count_small", task="count", train_size=64)`.
    """

    task: str = ""
    train_size: int = 2000
    test_size: int = 200
    image_size: int = 56
    seed: int = 0
    layout: synthetic.Layout | None = None  # None: the task's own layout


class CptSynthetic(base.TaskBuilder):
    """Procedurally generated scenes and questions; configs are the task names of `synthetic.TASKS`."""

    name = "cpt_synthetic"
    MANUAL_DOWNLOAD_INSTRUCTIONS = None
    BUILDER_CONFIGS = [
        SyntheticConfig(name=task.name, task=task.name, description=f"{task.kind} task {task.name!r}")
        for task in synthetic.TASKS.values()
    ] + [
        # One shape filling the image: the CPU demo's tasks, which a tiny model reads within minutes.
        SyntheticConfig(name=f"{name}_single", task=name, layout=synthetic.SINGLE,
                        description=f"task {name!r} on scenes of one shape")
        for name in synthetic.SINGLE_TASKS
    ]

    def _split_generators(self, dl_manager):
        config = self.builder_config
        sizes = {"train": config.train_size, "test": config.test_size}
        return {split: self._generate_examples(split, self._records(split, n), self._convert)
                for split, n in sizes.items()}

    def _records(self, split, n):
        config = self.builder_config
        for start in range(0, n, _CHUNK):
            yield from synthetic.generate(config.task, split, min(_CHUNK, n - start), config.seed,
                                          config.image_size, start=start, layout=config.layout)

    def _convert(self, record, example_id):
        images = [] if record["image"] is None else [record["image"]]
        return base.Example(record["id"], record["question"], record["answer"], images)
