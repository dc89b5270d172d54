"""Prompt templates, Qwen2.5-VL chat rendering, image pad expansion and SFT loss masks."""

import numpy as np
import pytest

from cpt_jax.data.prompts import (
    PROMPT_TEMPLATES,
    encode_prompt,
    encode_sft_example,
    expand_image_pads,
    format_question,
    merged_token_counts,
    parse_llamafactory_record,
    render_prompt,
)
from cpt_jax.data.tokenizer import build_tiny_tokenizer, load_tokenizer, special_token_ids

# The paper's prompts (EasyR1 format prompts; the CoT one is examples/format_prompt/math_format.jinja).
PAPER_COT_SUFFIX = (
    " You FIRST think about the reasoning process as an internal monologue and then provide the final answer."
    " The reasoning process MUST BE enclosed within <think> </think> tags."
    " The final answer MUST BE put in \\boxed{}."
)
PAPER_NO_COT_SUFFIX = " You MUST provide the final answer directly."

SYSTEM_TURN = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"

# Records as they appear in the official LLaMA-Factory annotations (path-vqa_test.json, TextVQA_test.json).
PATHVQA_RECORD = {
    "images": ["path-vqa/test_0.png"],
    "messages": [
        {
            "content": "<image>what are positively charged, thus allowing the compaction of the negatively "
            "charged dna?\nAnswer the question using a single word or phrase.",
            "role": "user",
        },
        {"content": "the histone subunits", "role": "assistant"},
    ],
}
TEXTVQA_RECORD = {
    "images": ["TextVQA/train_images/003a8ae2ef43b901.jpg"],
    "messages": [
        {
            "role": "user",
            "content": "<image>\nwhat is the brand of this camera?\nReference OCR token:DAKOTA,DIGITAL,Single-Use,"
            "Camera,Pire,digitat\nAnswer the question using a single word or phrase.",
        },
        {"role": "assistant", "content": "dakota"},
    ],
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer")))


def test_templates_are_the_papers():
    assert PROMPT_TEMPLATES["cot"] == "{{ content | trim }}" + PAPER_COT_SUFFIX
    assert PROMPT_TEMPLATES["no_cot"] == "{{ content | trim }}" + PAPER_NO_COT_SUFFIX
    assert format_question("What is 2+2?", "cot") == "What is 2+2?" + PAPER_COT_SUFFIX
    assert format_question("  What is 2+2?\n", "no_cot") == "What is 2+2?" + PAPER_NO_COT_SUFFIX
    assert format_question("  {{ raw }}\n", "plain") == "  {{ raw }}\n"
    with pytest.raises(ValueError, match="unknown prompt template 'cott'.*'cot'"):
        format_question("q", "cott")


def test_render_without_images(tokenizer):
    expected = (
        SYSTEM_TURN + "<|im_start|>user\nHow many sides does a square have?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_prompt(tokenizer, "How many sides does a square have?", 0, template="plain") == expected


def test_render_one_image_with_cot(tokenizer):
    expected = (
        SYSTEM_TURN + "<|im_start|>user\n" + IMAGE + "\nWhat color is the circle?" + PAPER_COT_SUFFIX
        + "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_prompt(tokenizer, "<image>\nWhat color is the circle?", 1) == expected


def test_render_two_images_at_their_placeholders(tokenizer):
    expected = (
        SYSTEM_TURN + "<|im_start|>user\nCompare " + IMAGE + " with " + IMAGE + ". Same count?"
        + PAPER_NO_COT_SUFFIX + "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_prompt(tokenizer, "Compare <image> with <image>. Same count?", 2, template="no_cot") == expected


def test_render_puts_images_first_without_placeholders_and_takes_a_system_prompt(tokenizer):
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n" + IMAGE + IMAGE + "Which is larger?"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_prompt(tokenizer, "Which is larger?", 2, template="plain", system="Be brief.") == expected
    # As in EasyR1 the image goes in before the template trims the text, so leading spaces stay after the image.
    expected_cot = SYSTEM_TURN + "<|im_start|>user\n" + IMAGE + "  Which?" + PAPER_COT_SUFFIX
    assert render_prompt(tokenizer, "  Which?\n", 1).startswith(expected_cot + "<|im_end|>\n")


def test_llamafactory_record_renders_like_llamafactory(tokenizer):
    question, answer, images = parse_llamafactory_record(PATHVQA_RECORD, "path-vqa_test[0]")
    assert (answer, images) == ("the histone subunits", ["path-vqa/test_0.png"])
    # LLaMA-Factory's qwen2_vl template: "<image>" replaced in place, default system turn.
    expected = (
        SYSTEM_TURN + "<|im_start|>user\n" + question.replace("<image>", IMAGE)
        + "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_prompt(tokenizer, question, len(images), template="plain") == expected


def test_placeholder_count_mismatch_names_the_record(tokenizer):
    question = TEXTVQA_RECORD["messages"][0]["content"]
    with pytest.raises(ValueError, match=r"record 'TextVQA_test\[7\]' has 1 <image> placeholder\(s\) but 2 image"):
        render_prompt(tokenizer, question, 2, record_id="TextVQA_test[7]")
    bad_record = dict(TEXTVQA_RECORD, images=TEXTVQA_RECORD["images"] * 2)
    with pytest.raises(ValueError, match=r"record 'TextVQA_test\[7\]' has 1 <image> placeholder"):
        parse_llamafactory_record(bad_record, "TextVQA_test[7]")
    one_turn = dict(TEXTVQA_RECORD, messages=TEXTVQA_RECORD["messages"][:1])
    with pytest.raises(ValueError, match=r"record 'TextVQA_test\[7\]' must hold messages with roles"):
        parse_llamafactory_record(one_turn, "TextVQA_test[7]")


def test_merged_token_counts():
    assert merged_token_counts([[1, 4, 4], [2, 6, 8], [1, 12, 20]], 2) == [4, 24, 60]
    assert merged_token_counts([1, 6, 6], 3) == [4]
    with pytest.raises(ValueError, match="divisible by merge_size=2"):
        merged_token_counts([[1, 5, 4]], 2)


def test_expand_image_pads(tokenizer):
    text = "a" + IMAGE + "b" + IMAGE + "c"
    expanded = expand_image_pads(text, [4, 6], tokenizer)
    pad = "<|image_pad|>"
    assert expanded == (
        "a<|vision_start|>" + pad * 4 + "<|vision_end|>b<|vision_start|>" + pad * 6 + "<|vision_end|>c"
    )
    with pytest.raises(ValueError, match="2 <\\|image_pad\\|> token\\(s\\) but 1 image token count"):
        expand_image_pads(text, [4], tokenizer)


def _runs(mask):
    """(start, length) of each run of True."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    starts = np.flatnonzero(np.diff(padded) == 1)
    ends = np.flatnonzero(np.diff(padded) == -1)
    return list(zip(starts.tolist(), (ends - starts).tolist()))


def test_encode_prompt_expands_each_image_in_order(tokenizer):
    special = special_token_ids(tokenizer)
    question = "Compare <image> with <image>."
    grid_thws = np.array([[1, 4, 4], [1, 4, 6]])
    ids = encode_prompt(tokenizer, question, grid_thws, 2)
    assert ids.dtype == np.int32
    text = expand_image_pads(render_prompt(tokenizer, question, 2), [4, 6], tokenizer)
    np.testing.assert_array_equal(ids, tokenizer.encode(text, add_special_tokens=False))
    runs = _runs(ids == special["image_pad"])
    assert [length for _, length in runs] == [4, 6]
    for start, length in runs:
        assert ids[start - 1] == special["vision_start"]
        assert ids[start + length] == special["vision_end"]


def test_encode_prompt_rejects_literal_image_pads_in_the_question(tokenizer):
    with pytest.raises(ValueError, match="record 'x'.*mark image positions with <image>"):
        encode_prompt(tokenizer, "<image> and <|image_pad|>", [[1, 2, 2]], 2, record_id="x")


def test_sft_loss_mask_covers_exactly_the_answer_turn(tokenizer):
    special = special_token_ids(tokenizer)
    question, answer, _ = parse_llamafactory_record(TEXTVQA_RECORD, "TextVQA_test[0]")
    answer = "<think> The label reads DAKOTA. </think> \\boxed{dakota}"
    grid_thws = [[1, 6, 8]]
    ids, loss_mask = encode_sft_example(tokenizer, question, answer, grid_thws, 2, "cot")
    prompt_ids = encode_prompt(tokenizer, question, grid_thws, 2, "cot")
    answer_ids = tokenizer.encode(answer, add_special_tokens=False)
    newline_ids = tokenizer.encode("\n", add_special_tokens=False)

    assert ids.dtype == np.int32 and loss_mask.dtype == np.int32
    assert ids.shape == loss_mask.shape == (len(prompt_ids) + len(answer_ids) + 2,)
    np.testing.assert_array_equal(ids[: len(prompt_ids)], prompt_ids)
    np.testing.assert_array_equal(ids[len(prompt_ids):], answer_ids + [special["im_end"]] + newline_ids)
    np.testing.assert_array_equal(loss_mask, [0] * len(prompt_ids) + [1] * (len(answer_ids) + 2))
    assert tokenizer.decode(ids[loss_mask == 1]) == answer + "<|im_end|>\n"
    assert int((ids[loss_mask == 0] == special["image_pad"]).sum()) == 12
