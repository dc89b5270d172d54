import numpy as np
import pytest
from mathruler.grader import extract_boxed_content, grade_answer

from cpt_jax.data import synthetic

N = 40


@pytest.fixture(scope="module")
def examples():
    return {name: synthetic.generate(name, "train", N, seed=3) for name in synthetic.TASKS}


def test_suite_has_enough_skills_and_general_tasks():
    assert len(synthetic.SKILLS) >= 6
    general = [synthetic.TASKS[name] for name in synthetic.GENERAL]
    assert any(not task.multimodal for task in general)
    assert any(task.multimodal for task in general)
    assert all(synthetic.TASKS[name].multimodal for name in synthetic.SKILLS)


def test_same_seed_same_examples_other_seed_other_examples():
    first = synthetic.generate("size", "train", 5, seed=7)
    again = synthetic.generate("size", "train", 5, seed=7)
    other = synthetic.generate("size", "train", 5, seed=8)
    for a, b in zip(first, again):
        assert (a["id"], a["question"], a["answer"]) == (b["id"], b["question"], b["answer"])
        np.testing.assert_array_equal(a["image"], b["image"])
    assert not all(np.array_equal(a["image"], c["image"]) for a, c in zip(first, other))


def test_examples_depend_on_index_only_not_on_batch():
    whole = synthetic.generate("colour", "test", 8, seed=1)
    tail = synthetic.generate("colour", "test", 3, seed=1, start=5)
    assert [e["id"] for e in tail] == ["colour-test-1-5", "colour-test-1-6", "colour-test-1-7"]
    for a, b in zip(whole[5:], tail):
        assert (a["question"], a["answer"]) == (b["question"], b["answer"])
        np.testing.assert_array_equal(a["image"], b["image"])


def test_splits_differ():
    train = synthetic.generate("digit", "train", 5)
    test = synthetic.generate("digit", "test", 5)
    assert not any(np.array_equal(a["image"], b["image"]) for a, b in zip(train, test))


@pytest.mark.parametrize("name", sorted(synthetic.TASKS))
def test_answers_are_short_and_score_one_when_boxed(examples, name):
    for example in examples[name]:
        answer = example["answer"]
        assert answer and " " not in answer
        assert grade_answer(answer, answer)
        assert grade_answer(extract_boxed_content(f"so the answer is \\boxed{{{answer}}}"), answer)


@pytest.mark.parametrize("name", sorted(synthetic.TASKS))
def test_image_tasks_have_one_placeholder_and_an_image(examples, name):
    task = synthetic.TASKS[name]
    for example in examples[name]:
        assert example["question"].count("<image>") == (1 if task.multimodal else 0)
        assert example["question"].endswith(task.instruction)
        if task.multimodal:
            assert example["image"].dtype == np.uint8
            assert example["image"].shape == (56, 56, 3)
        else:
            assert example["image"] is None


def test_image_size_is_configurable():
    (example,) = synthetic.generate("count", "train", 1, image_size=84)
    assert example["image"].shape == (84, 84, 3)
    with pytest.raises(ValueError, match="image_size=10"):
        synthetic.generate("count", "train", 1, image_size=10)


def test_unknown_task_is_named():
    with pytest.raises(KeyError, match="'nope'"):
        synthetic.generate("nope", "train", 1)


def test_distinct_skills_ask_distinct_questions(examples):
    questions = {name: {e["question"] for e in examples[name]} for name in synthetic.TASKS}
    names = sorted(questions)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not questions[a] & questions[b], (a, b)


def test_skills_of_the_suite_layout_share_the_scene_distribution(examples):
    # Same renderer, same scene sampler: the fraction of ink-free (white) pixels is alike across the skills drawn
    # on the suite's 3x3 scenes (the rule tasks draw one shape and balance their answers: tested below).
    suite = [name for name in synthetic.SKILLS if synthetic.TASKS[name].layout == synthetic.Layout()]
    assert len(suite) >= 6 and len(suite) < len(synthetic.SKILLS)
    white = {name: np.mean([(e["image"] == 255).all(-1).mean() for e in examples[name]]) for name in suite}
    assert max(white.values()) - min(white.values()) < 0.05


def test_answers_cover_their_range(examples):
    assert {e["answer"] for e in examples["position"]} == {"left", "middle", "right"}
    assert {e["answer"] for e in examples["size"]} == {"small", "large"}
    assert {e["answer"] for e in examples["choice"]} == {"A", "B", "C", "D"}
    assert 0.25 < np.mean([e["answer"] == "yes" for e in examples["existence"]]) < 0.75
    assert set(e["answer"] for e in examples["count"]) <= {"1", "2", "3", "4"}


def test_digit_image_shows_the_answer(examples):
    for example in examples["digit"]:
        ink = (example["image"] == 0).all(-1)
        rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
        glyph = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        scale = glyph.shape[0] // 7
        font = synthetic.FONT[example["answer"]]
        # Crop the font the same way (some digits leave blank font columns at the edges).
        font = font[:, np.flatnonzero(font.any(0))[0] : np.flatnonzero(font.any(0))[-1] + 1]
        np.testing.assert_array_equal(glyph[::scale, ::scale], font)


def test_colour_answer_is_drawn(examples):
    for example in examples["colour"]:
        rgb = np.array(synthetic.COLOURS[example["answer"]], np.uint8)
        assert (example["image"] == rgb).all(-1).sum() > 10


def test_arithmetic_answer_is_the_value():
    for example in synthetic.generate("arithmetic", "test", 20):
        expression = example["question"].removeprefix("What is ").split("?")[0]
        assert int(example["answer"]) == eval(expression)  # noqa: S307 (digits and one operator)


def test_single_shape_layout_draws_one_shape_and_no_digit():
    examples = synthetic.generate("colour", "train", 20, seed=2, layout=synthetic.SINGLE)
    for example in examples:
        image = example["image"]
        ink = (image == 0).all(axis=-1)
        assert not ink.any()  # no digit
        coloured = ~(image == 255).all(axis=-1)
        rgb = {tuple(int(c) for c in px) for px in image[coloured]}
        assert rgb == {synthetic.COLOURS[example["answer"]]}
    # One shape filling the image covers far more of it than a 3x3-grid shape does.
    single = np.mean([(~(e["image"] == 255).all(-1)).mean() for e in examples])
    grid = np.mean([(~(e["image"] == 255).all(-1)).mean() for e in
                    synthetic.generate("colour", "train", 20, seed=2)])
    assert single > 2 * grid


def test_layout_validates_and_tasks_refuse_layouts_they_cannot_ask_about():
    with pytest.raises(ValueError, match="max_shapes"):
        synthetic.Layout(grid=1, max_shapes=1, digit=True)  # the digit takes the only cell
    with pytest.raises(ValueError, match="max_shapes"):
        synthetic.Layout(grid=2, max_shapes=0)
    with pytest.raises(ValueError, match="digit=True"):
        synthetic.generate("digit", "train", 1, layout=synthetic.SINGLE)
    with pytest.raises(ValueError, match="grid=3"):
        synthetic.generate("position", "train", 1, layout=synthetic.SINGLE)
    # The default layout is the suite's 3x3 scene with a digit.
    for example in synthetic.generate("sum", "test", 3, seed=4):
        assert (example["image"] == 0).all(axis=-1).any()


@pytest.mark.parametrize("name", synthetic.SINGLE_TASKS)
def test_single_tasks_pose_their_questions(name):
    for example in synthetic.generate(name, "test", 10, seed=5, layout=synthetic.SINGLE):
        assert grade_answer(example["answer"], example["answer"])


def _drawn_colour(image):
    coloured = image[~(image == 255).all(-1)]
    (rgb,) = {tuple(int(c) for c in px) for px in coloured}
    return next(name for name, value in synthetic.COLOURS.items() if value == rgb)


@pytest.mark.parametrize("name, category, answers", [
    ("warm", synthetic.WARM, ("warm", "cool")),
    ("primary", synthetic.PRIMARY, ("yes", "no")),
    ("dark", synthetic.DARK, ("dark", "light")),
])
def test_colour_rules_answer_by_the_drawn_colour_half_of_the_time(name, category, answers):
    examples = synthetic.generate(name, "train", 200, seed=6)
    for example in examples:
        assert example["answer"] == (answers[0] if _drawn_colour(example["image"]) in category else answers[1])
    assert 0.4 < np.mean([e["answer"] == answers[0] for e in examples]) < 0.6
    # Every colour is asked about, on each side of the rule.
    assert {_drawn_colour(e["image"]) for e in examples} == set(synthetic.COLOURS)


def test_fills_answers_whether_the_shape_is_large():
    examples = synthetic.generate("fills", "train", 200, seed=6)
    covered = np.array([(~(e["image"] == 255).all(-1)).mean() for e in examples])
    yes = np.array([e["answer"] == "yes" for e in examples])
    assert 0.4 < yes.mean() < 0.6
    assert covered[yes].min() > covered[~yes].max()  # every large shape covers more than any small one


def test_rule_tasks_draw_one_shape_by_default_and_refuse_busier_layouts():
    for example in synthetic.generate("warm", "test", 10, seed=1):
        _drawn_colour(example["image"])  # exactly one colour: one shape, no digit
        assert not (example["image"] == 0).all(-1).any()
    with pytest.raises(ValueError, match="max_shapes=1"):
        synthetic.generate("warm", "test", 1, layout=synthetic.Layout())


def test_dark_colours_are_the_darkest():
    luminance = {name: 0.3 * r + 0.59 * g + 0.11 * b for name, (r, g, b) in synthetic.COLOURS.items()}
    assert max(luminance[c] for c in synthetic.DARK) < min(v for c, v in luminance.items() if c not in synthetic.DARK)


def test_parity_answer_is_the_parity():
    for example in synthetic.generate("parity", "test", 20):
        number = int(example["question"].removeprefix("Is ").split(" ")[0])
        assert example["answer"] == ("yes" if number % 2 == 0 else "no")
