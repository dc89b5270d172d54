"""The continual loop's tiny settings, shared by the in-process tests and by the config files their subprocesses
(`cpt-jax train`, the two-process workers) load, plus a stand-in reward those runs can learn from."""

from cpt_jax import demo
from cpt_jax.rl.rewards import register_reward

TASKS = ("synthetic/colour", "synthetic/shape")
GENERAL = ("synthetic/existence",)

# The text of a config file for a subprocess: `tiny_config` with overrides given as dotted keys.
CONFIG_FILE = """
from tests.train.tiny_configs import tiny_config

def get_config():
    return tiny_config({method!r}, {base!r}, {data!r}, {changes!r})
"""


@register_reward("test_length_parity")
def length_parity(predictions, ground_truths):
    """A stand-in verifier a random model passes about half the time, so RIF and GRPO see mixed groups."""
    return [{"overall": float(len(p) % 2 == 0), "format": 1.0, "accuracy": float(len(p) % 2 == 0)}
            for p in predictions]


def tiny_config(method: str, base: str, data: str, changes: dict | None = None):
    """Two synthetic tasks, a handful of examples and steps on the tiny base; `changes` maps dotted keys (e.g.
    "mesh.num_devices") to values."""
    c = demo.demo_config(method, quick=True)
    c.model.hf_dir = base
    c.data.data_dir = data
    c.data.tasks = TASKS
    c.data.general = GENERAL
    # The loop's tests were written against these settings; the demo's own (plain prompt, epochs per method) are
    # tuned for its tasks and may change.
    c.data.template = c.data.sft_template = "cot"
    c.data.length_buckets = (128, 160, 192)
    c.optim.learning_rate = 1e-3
    c.schedule.epochs = ()
    c.data.min_pixels = c.data.max_pixels = 56 * 56
    c.data.patch_buckets = (32, 64, 128)
    c.data.max_train_examples = 8
    c.data.max_eval_examples = 4
    c.sft.batch_size = 4
    c.rft.prompt_batch_size = 2
    c.rft.rollout_batches = 2
    c.rft.num_samples = 2
    c.rft.max_new_tokens = 4
    c.rft.micro_batches_per_update = 1
    c.rif.num_samples = 2
    c.eval.max_new_tokens = 4
    c.eval.batch_size = 4
    c.schedule.max_steps_per_task = 2
    c.diagnostics.gradient_every = 2
    c.diagnostics.num_groups = 1
    c.diagnostics.fisher_examples = 1
    c.mesh.num_devices = 1
    c.update_from_flattened_dict(changes or {})
    return c
