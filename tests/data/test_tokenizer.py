"""The tiny Qwen2.5-VL-compatible tokenizer: loading, round trips, special tokens, determinism."""

import json
import os
import shutil
import string

import pytest
import tokenizers
from transformers import AutoTokenizer
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from cpt_jax.data.tokenizer import (
    CHAT_TEMPLATE,
    QWEN_ADDED_TOKENS,
    build_tiny_tokenizer,
    load_tokenizer,
    special_token_ids,
)

TRICKY_STRINGS = [
    "",
    " ",
    "  leading and trailing spaces  ",
    "\\boxed{\\frac{3}{4}} and \\boxed{-3.5} and $\\sqrt{x^2+1}$",
    "<think>\nLet a < b and b > c; then a/b </think>\n\n\\boxed{B}",
    "0123456789 3.14159 -42 1e-5 100%",
    "tabs\tand\r\nwindows line ends\n\n\nand blank lines",
    string.printable,
    "Reference OCR token:DAKOTA,DIGITAL,Single-Use\nAnswer the question using a single word or phrase.",
    "unicode: café, 中文, 🙂",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def test_auto_tokenizer_loads_the_built_directory(tokenizer_dir):
    assert sorted(os.listdir(tokenizer_dir)) == ["tokenizer.json", "tokenizer_config.json"]
    with open(os.path.join(tokenizer_dir, "tokenizer_config.json")) as f:
        config = json.load(f)
    assert config["chat_template"] == CHAT_TEMPLATE
    assert config["eos_token"] == "<|im_end|>"
    assert config["pad_token"] == "<|endoftext|>"

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    assert 256 + len(QWEN_ADDED_TOKENS) < len(tokenizer) <= 1024
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("text", TRICKY_STRINGS)
def test_round_trip_is_exact(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < len(tokenizer) for i in ids)


def test_common_words_are_compressed_and_digits_split(tokenizer):
    assert len(tokenizer.encode(" reasoning", add_special_tokens=False)) == 1
    digits = tokenizer.encode("2024", add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in digits] == ["2", "0", "2", "4"]


def test_added_tokens_are_single_tokens_in_qwen_order(tokenizer):
    ids = [tokenizer.encode(token, add_special_tokens=False) for token, _ in QWEN_ADDED_TOKENS]
    assert all(len(token_ids) == 1 for token_ids in ids)
    first = ids[0][0]
    # After the learned vocabulary, consecutive, in Qwen's order (151643, 151644, ...).
    assert [token_ids[0] for token_ids in ids] == list(range(first, first + len(QWEN_ADDED_TOKENS)))
    assert first + len(QWEN_ADDED_TOKENS) == len(tokenizer)

    special = special_token_ids(tokenizer)
    expected_offsets = {"endoftext": 0, "im_start": 1, "im_end": 2, "vision_start": 9, "vision_end": 10,
                        "image_pad": 12, "video_pad": 13, "pad": 0}
    assert special == {name: first + offset for name, offset in expected_offsets.items()}


def test_special_tokens_inside_text_are_split_out(tokenizer):
    special = special_token_ids(tokenizer)
    ids = tokenizer.encode("a<|image_pad|><|image_pad|>b<|im_end|>", add_special_tokens=False)
    assert ids[1:3] == [special["image_pad"]] * 2
    assert ids[-1] == special["im_end"]


def test_skip_special_tokens_drops_qwens_special_tokens_only(tokenizer):
    ids = tokenizer.encode("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<tool_call><|im_end|>",
                           add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi<tool_call>"


def test_build_is_deterministic_and_uses_extra_texts(tmp_path):
    extra = ["The zorblax quuxifies the wibblewump."] * 4
    first = build_tiny_tokenizer(tmp_path / "a", extra_texts=extra)
    second = build_tiny_tokenizer(tmp_path / "b", extra_texts=extra)
    plain = build_tiny_tokenizer(tmp_path / "c")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(first, name), "rb") as f1, open(os.path.join(second, name), "rb") as f2:
            assert f1.read() == f2.read()

    def num_tokens(directory):
        return len(load_tokenizer(directory).encode(" zorblax wibblewump", add_special_tokens=False))

    assert num_tokens(first) == 2
    assert num_tokens(plain) > 6


def test_vocab_size_bounds_the_vocabulary(tmp_path):
    assert len(load_tokenizer(build_tiny_tokenizer(tmp_path / "small", vocab_size=300))) == 300
    with pytest.raises(ValueError, match="vocab_size=200"):
        build_tiny_tokenizer(tmp_path / "too_small", vocab_size=200)


def test_load_tokenizer_needs_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer files.*build_tiny_tokenizer"):
        load_tokenizer(str(tmp_path))


def test_processor_chat_template_wins(tokenizer_dir, tmp_path):
    checkpoint = shutil.copytree(tokenizer_dir, tmp_path / "checkpoint")
    with open(checkpoint / "chat_template.json", "w") as f:
        json.dump({"chat_template": "[{{ messages[0]['content'] }}]"}, f)
    tokenizer = load_tokenizer(str(checkpoint))
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "[x]"


def test_special_token_ids_rejects_a_tokenizer_without_vision_tokens():
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tokenizer = TokenizersBackend(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(ValueError, match=r"no <\|image_pad\|> token"):
        special_token_ids(tokenizer)
