"""A procedurally generated multimodal task suite: the embedded stand-in for the paper's benchmark.

The suite's scene is a white canvas cut into a 3x3 grid, one black digit in one cell and one to four coloured
shapes (circle, square, triangle, cross; small or large) in other cells, each (colour, shape) pair at most once.
The skills ask different questions about the same kind of scene, so training them one after another makes a model
overwrite what it learned before: forgetting is measurable. The "general" tasks are held out of the sequence and
stand in for MMLU-Pro (text-only arithmetic and parity) and for MMMU / POPE (multiple choice and yes/no about a
scene). Every task can also be drawn on other layouts (`Layout`), e.g. one shape filling the image (`SINGLE`).

The rule tasks (warm, primary, dark, fills) ask about the only shape of a `SINGLE` scene whether its colour or size
falls in a category, each answer half of the time: what they test is a mapping from a colour or size that a model
may already read (the "colour" and "size" tasks) to a category it has to learn.

Answers are a single word, number or letter that `mathruler.grader.grade_answer` accepts against itself, and
every example is a pure function of (task, split, seed, index).
"""

import dataclasses
import zlib
from collections.abc import Callable

import numpy as np

GRID = 3
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (30, 50, 180),
    "yellow": (230, 190, 20),
    "purple": (110, 30, 150),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
# Colour categories the rule tasks ask about. Blue and purple are the dark ones by luminance (0.3 R + 0.59 G +
# 0.11 B: 58 and 67, against 94 for red, 119 for green, 183 for yellow).
WARM = ("red", "yellow")
PRIMARY = ("red", "yellow", "blue")
DARK = ("blue", "purple")
COLUMNS = ("left", "middle", "right")
MIN_IMAGE_SIZE = 8 * GRID
MAX_SHAPES = 4

_BACKGROUND = 255
_INK = (0, 0, 0)
# Half-extent of a shape as a fraction of the cell side.
_HALF_EXTENT = {"small": 0.22, "large": 0.42}
_MAX_RESAMPLES = 100

# A 5-wide, 7-tall bitmap font for the digits; "#" is ink.
_FONT_ROWS = {
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("####.", "....#", "....#", ".###.", "....#", "....#", "####."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
}
FONT = {char: np.array([[c == "#" for c in row] for row in rows]) for char, rows in _FONT_ROWS.items()}


@dataclasses.dataclass(frozen=True)
class Shape:
    """A coloured shape of a scene, in grid cell (row, col)."""

    kind: str
    colour: str
    size: str
    row: int
    col: int

    @property
    def name(self):
        """How questions refer to it, e.g. "red circle"."""
        return f"{self.colour} {self.kind}"


@dataclasses.dataclass(frozen=True)
class Scene:
    """What an image shows: coloured shapes and at most one digit, each in its own cell (row, col) of a
    `grid` x `grid` layout; `digit` is None in scenes drawn without one."""

    shapes: tuple[Shape, ...]
    digit: int | None
    digit_cell: tuple[int, int] | None
    grid: int = GRID


@dataclasses.dataclass(frozen=True)
class Layout:
    """How scenes are drawn: a `grid` x `grid` layout holding 1 to `max_shapes` shapes, plus a digit if `digit`.

    The default is the suite's scene; `Layout(grid=1, max_shapes=1, digit=False)` draws one shape filling the
    image, which a tiny model learns to read within a few hundred steps (the CPU demo's tasks).
    """

    grid: int = GRID
    max_shapes: int = MAX_SHAPES
    digit: bool = True

    def __post_init__(self):
        if self.grid < 1 or not 1 <= self.max_shapes <= min(len(COLOURS) * len(SHAPES), self.grid**2 - self.digit):
            raise ValueError(f"{self} cannot be drawn: it needs grid >= 1 and 1 <= max_shapes <= the free cells "
                             f"({self.grid}x{self.grid}{' less one for the digit' if self.digit else ''})")


SINGLE = Layout(grid=1, max_shapes=1, digit=False)


@dataclasses.dataclass(frozen=True)
class SyntheticTask:
    """One task of the suite.

    `ask(scene, rng)` returns (question, answer), or None when the scene cannot pose the question unambiguously
    (the generator then draws another scene); text-only tasks get `scene=None`. `instruction` is appended to
    every question, as the benchmark's prompt suffixes are.
    """

    name: str
    kind: str
    instruction: str
    ask: Callable[[Scene | None, np.random.Generator], tuple[str, str] | None]
    multimodal: bool = True
    # What the question reads from a scene: "digit", "columns" (a 3-wide grid), "one" (the only shape).
    needs: tuple[str, ...] = ()
    layout: Layout = Layout()  # how its scenes are drawn unless `generate` is given another layout

    def check(self, layout: Layout):
        """Raises if scenes drawn with `layout` cannot pose this task's question."""
        if "digit" in self.needs and not layout.digit:
            raise ValueError(f"task {self.name!r} asks about the digit; it needs a layout with digit=True")
        if "columns" in self.needs and layout.grid != len(COLUMNS):
            raise ValueError(f"task {self.name!r} asks left/middle/right; it needs a layout with grid={len(COLUMNS)}")
        if "one" in self.needs and layout.max_shapes != 1:
            raise ValueError(f"task {self.name!r} asks about the only shape; it needs a layout with max_shapes=1")

    def __post_init__(self):
        if self.kind not in ("skill", "general"):
            raise ValueError(f"task {self.name!r} has kind {self.kind!r}; expected 'skill' or 'general'")


_NUMBER = "Answer with a single number."
_WORD = "Answer with a single word."
_LETTER = "Answer with the option's letter from the given choices directly."
_YES_NO = "Answer yes or no."


def _unique_by(shapes, attribute):
    """The shapes whose `attribute` value no other shape in the scene shares."""
    values = [getattr(s, attribute) for s in shapes]
    return [s for s, v in zip(shapes, values) if values.count(v) == 1]


def _ask_count(scene, rng):
    return "How many coloured shapes are in the image?", str(len(scene.shapes))


def _ask_colour(scene, rng):
    candidates = _unique_by(scene.shapes, "kind")
    if not candidates:
        return None
    target = candidates[rng.integers(len(candidates))]
    return f"What colour is the {target.kind}?", target.colour


def _ask_shape(scene, rng):
    candidates = _unique_by(scene.shapes, "colour")
    if not candidates:
        return None
    target = candidates[rng.integers(len(candidates))]
    return f"What shape is the {target.colour} object?", target.kind


def _ask_position(scene, rng):
    target = scene.shapes[rng.integers(len(scene.shapes))]
    return f"Is the {target.name} on the left, in the middle or on the right?", COLUMNS[target.col]


def _ask_size(scene, rng):
    target = scene.shapes[rng.integers(len(scene.shapes))]
    return f"Is the {target.name} small or large?", target.size


def _ask_digit(scene, rng):
    return "Which digit is written in the image?", str(scene.digit)


def _ask_sum(scene, rng):
    question = "What is the digit in the image plus the number of coloured shapes?"
    return question, str(scene.digit + len(scene.shapes))


def _absent_names(scene):
    present = {s.name for s in scene.shapes}
    return [f"{c} {k}" for c in COLOURS for k in SHAPES if f"{c} {k}" not in present]


def _ask_existence(scene, rng):
    if rng.integers(2):
        return f"Is there a {scene.shapes[rng.integers(len(scene.shapes))].name} in the image?", "yes"
    absent = _absent_names(scene)
    return f"Is there a {absent[rng.integers(len(absent))]} in the image?", "no"


def _ask_choice(scene, rng):
    present = scene.shapes[rng.integers(len(scene.shapes))].name
    absent = _absent_names(scene)
    options = [present] + [absent[i] for i in rng.choice(len(absent), size=3, replace=False)]
    order = rng.permutation(len(options))
    letters = "ABCD"
    lines = [f"{letters[i]}. {options[j]}" for i, j in enumerate(order)]
    answer = letters[int(np.flatnonzero(order == 0)[0])]
    return "Which of these objects is in the image?\n" + "\n".join(lines), answer


def _balanced(rng, inside, share):
    """Whether to keep a scene so that kept scenes are `inside` half of the time, when a drawn scene is `inside` with
    probability `share` (False: draw another)."""
    keep = min(1.0, (1 - share) / share) if inside else min(1.0, share / (1 - share))
    return rng.random() < keep


def _ask_rule(question, subset, attribute, answers=("yes", "no")):
    """`ask` for a rule: whether the only shape's `attribute` is in `subset`, answered answers[0] if it is and
    answers[1] if not, each half of the time, so always giving one answer scores exactly chance."""
    values = {"colour": tuple(COLOURS), "size": SIZES}[attribute]

    def ask(scene, rng):
        (shape,) = scene.shapes
        inside = getattr(shape, attribute) in subset
        if not _balanced(rng, inside, len(subset) / len(values)):
            return None
        return question, answers[0] if inside else answers[1]

    return ask


def _ask_parity(scene, rng):
    n = int(rng.integers(0, 100))
    return f"Is {n} an even number?", "yes" if n % 2 == 0 else "no"


def _ask_arithmetic(scene, rng):
    a, b = (int(x) for x in rng.integers(0, 10, size=2))
    op = ("+", "-", "*")[rng.integers(3)]
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"What is {a} {op} {b}?", str(value)


TASKS = {
    task.name: task
    for task in (
        SyntheticTask("count", "skill", _NUMBER, _ask_count),
        SyntheticTask("colour", "skill", _WORD, _ask_colour),
        SyntheticTask("shape", "skill", _WORD, _ask_shape),
        SyntheticTask("position", "skill", _WORD, _ask_position, needs=("columns",)),
        SyntheticTask("size", "skill", _WORD, _ask_size),
        SyntheticTask("digit", "skill", _NUMBER, _ask_digit, needs=("digit",)),
        SyntheticTask("sum", "skill", _NUMBER, _ask_sum, needs=("digit",)),
        SyntheticTask("arithmetic", "general", _NUMBER, _ask_arithmetic, multimodal=False),
        SyntheticTask("existence", "general", _YES_NO, _ask_existence),
        SyntheticTask("choice", "general", _LETTER, _ask_choice),
        SyntheticTask("warm", "skill", _WORD,
                      _ask_rule("Is the colour of the shape warm or cool?", WARM, "colour", ("warm", "cool")),
                      needs=("one",), layout=SINGLE),
        SyntheticTask("primary", "skill", _YES_NO,
                      _ask_rule("Is the colour of the shape a primary colour?", PRIMARY, "colour"),
                      needs=("one",), layout=SINGLE),
        SyntheticTask("dark", "skill", _WORD,
                      _ask_rule("Is the colour of the shape dark or light?", DARK, "colour", ("dark", "light")),
                      needs=("one",), layout=SINGLE),
        SyntheticTask("fills", "skill", _YES_NO,
                      _ask_rule("Does the shape fill most of the image?", ("large",), "size"),
                      needs=("one",), layout=SINGLE),
        SyntheticTask("parity", "general", _YES_NO, _ask_parity, multimodal=False),
    )
}
SKILLS = tuple(name for name, task in TASKS.items() if task.kind == "skill")
# One shape filling the image, and the tasks that still ask something of it (a count would always be 1).
SINGLE_TASKS = ("colour", "shape", "size", "existence", "choice")
GENERAL = tuple(name for name, task in TASKS.items() if task.kind == "general")


def get_task(task):
    """The `SyntheticTask` named `task` (a task passes through)."""
    if isinstance(task, SyntheticTask):
        return task
    if task not in TASKS:
        raise KeyError(f"unknown synthetic task {task!r}; choose one of {sorted(TASKS)}")
    return TASKS[task]


def sample_scene(rng, layout=Layout()):
    """A random scene: 1 to `layout.max_shapes` shapes and the digit (if any) in distinct cells, no (colour,
    shape) pair twice."""
    grid = layout.grid
    num_shapes = int(rng.integers(1, layout.max_shapes + 1))
    cells = rng.permutation(grid * grid)[: num_shapes + layout.digit]
    pairs = [(colour, kind) for colour in COLOURS for kind in SHAPES]
    chosen = rng.choice(len(pairs), size=num_shapes, replace=False)
    shapes = tuple(
        Shape(kind=pairs[p][1], colour=pairs[p][0], size=SIZES[rng.integers(len(SIZES))],
              row=int(cell // grid), col=int(cell % grid))
        for p, cell in zip(chosen, cells[layout.digit:])
    )
    if not layout.digit:
        return Scene(shapes=shapes, digit=None, digit_cell=None, grid=grid)
    digit_cell = (int(cells[0] // grid), int(cells[0] % grid))
    return Scene(shapes=shapes, digit=int(rng.integers(10)), digit_cell=digit_cell, grid=grid)


def _shape_mask(kind, dy_HxW, dx_HxW, half):
    if kind == "circle":
        return dy_HxW**2 + dx_HxW**2 <= half**2
    if kind == "square":
        return (np.abs(dy_HxW) <= half) & (np.abs(dx_HxW) <= half)
    if kind == "triangle":
        # Apex up: the half-width grows linearly from 0 at the top edge to `half` at the bottom edge.
        inside_rows = np.abs(dy_HxW) <= half
        return inside_rows & (np.abs(dx_HxW) <= (dy_HxW + half) / 2)
    if kind == "cross":
        arm = half / 3
        in_box = (np.abs(dy_HxW) <= half) & (np.abs(dx_HxW) <= half)
        return in_box & ((np.abs(dy_HxW) <= arm) | (np.abs(dx_HxW) <= arm))
    raise ValueError(f"unknown shape {kind!r}; choose one of {SHAPES}")


def render(scene, image_size, rng):
    """Draws `scene` as a uint8 (image_size, image_size, 3) image; `rng` jitters positions inside cells."""
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size={image_size} is too small; use at least {MIN_IMAGE_SIZE} pixels")
    cell = image_size / scene.grid
    image_HxWx3 = np.full((image_size, image_size, 3), _BACKGROUND, np.uint8)
    ys, xs = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
    for shape in scene.shapes:
        half = _HALF_EXTENT[shape.size] * cell
        slack = max(0.0, cell / 2 - half - 1)
        cy, cx = (np.array([shape.row, shape.col]) + 0.5) * cell + rng.uniform(-slack, slack, size=2)
        image_HxWx3[_shape_mask(shape.kind, ys - cy, xs - cx, half)] = COLOURS[shape.colour]
    if scene.digit is None:
        return image_HxWx3
    glyph = FONT[str(scene.digit)]
    scale = max(1, int(0.8 * cell) // glyph.shape[0])
    glyph = np.kron(glyph, np.ones((scale, scale), bool))
    gh, gw = glyph.shape
    row, col = scene.digit_cell
    top = int(row * cell + (cell - gh) / 2 + rng.integers(-1, 2))
    left = int(col * cell + (cell - gw) / 2 + rng.integers(-1, 2))
    top, left = np.clip(top, 0, image_size - gh), np.clip(left, 0, image_size - gw)
    image_HxWx3[top : top + gh, left : left + gw][glyph] = _INK
    return image_HxWx3


def _rng(task, split, seed, index):
    # crc32 rather than hash(): Python salts str hashes per process.
    key = [zlib.crc32(task.encode()), zlib.crc32(split.encode()), seed, index]
    return np.random.default_rng(np.random.SeedSequence(key))


def generate(task, split="train", n=100, seed=0, image_size=56, start=0, layout=None):
    """Examples `start … start+n-1` of `task` for `split`, each a function of (task, split, seed, index, layout).

    Returns dicts {"id", "question", "answer", "image"}: image tasks put one "<image>" placeholder in the
    question and give a uint8 (image_size, image_size, 3) image; text tasks give `image=None`.
    """
    task = get_task(task)
    layout = task.layout if layout is None else layout
    if task.multimodal:
        task.check(layout)
    if n < 0 or start < 0:
        raise ValueError(f"n={n} and start={start} must be non-negative")
    records = []
    for index in range(start, start + n):
        rng = _rng(task.name, split, seed, index)
        image = None
        if task.multimodal:
            for _ in range(_MAX_RESAMPLES):
                scene = sample_scene(rng, layout)
                qa = task.ask(scene, rng)
                if qa is not None:
                    break
            else:
                raise RuntimeError(f"task {task.name!r} found no usable scene in {_MAX_RESAMPLES} draws")
            image = render(scene, image_size, rng)
            question = f"<image>\n{qa[0]}\n{task.instruction}"
        else:
            qa = task.ask(None, rng)
            question = f"{qa[0]}\n{task.instruction}"
        records.append({
            "id": f"{task.name}-{split}-{seed}-{index}",
            "question": question,
            "answer": qa[1],
            "image": image,
        })
    return records
