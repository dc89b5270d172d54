"""Prompt templates, chat rendering and token encoding for Qwen2.5-VL prompts and SFT examples.

Question texts may hold LLaMA-Factory "<image>" placeholders; each one becomes an image item of the user turn, in
order, so the image sits exactly where the placeholder was (a question without placeholders gets its images
first, as EasyR1 does). The chat template renders one <|image_pad|> per image, which is then expanded to the
image's merged-token count t*h*w // merge_size**2, as Qwen's processor does.
"""

import functools

import jinja2
import numpy as np

from cpt_jax.data.tokenizer import SPECIAL_TOKENS, special_token_ids

IMAGE_PLACEHOLDER = "<image>"

# Task instructions wrapped around the question (`content`), rendered with Jinja like EasyR1's format prompts.
# "cot" is EasyR1's math_format.jinja, the paper's RFT prompt; "no_cot" the ablation without reasoning; "plain"
# leaves the question untouched, as LLaMA-Factory does for the paper's SFT runs.
PROMPT_TEMPLATES = {
    "cot": (
        "{{ content | trim }} You FIRST think about the reasoning process as an internal monologue and then "
        "provide the final answer. The reasoning process MUST BE enclosed within <think> </think> tags. "
        "The final answer MUST BE put in \\boxed{}."
    ),
    "no_cot": "{{ content | trim }} You MUST provide the final answer directly.",
    "plain": "{{ content }}",
}


@functools.lru_cache(maxsize=None)
def _compiled_template(text):
    return jinja2.Template(text)


def format_question(question, template="cot"):
    """The question wrapped in the named template of `PROMPT_TEMPLATES`."""
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; choose one of {sorted(PROMPT_TEMPLATES)}")
    return _compiled_template(PROMPT_TEMPLATES[template]).render(content=question)


def _where(record_id):
    return f"record {record_id!r}" if record_id is not None else "question"


def _user_content(question, num_images, template, record_id):
    """Chat content items for a question whose "<image>" placeholders mark the image positions."""
    num_placeholders = question.count(IMAGE_PLACEHOLDER)
    if num_placeholders == 0:
        question = IMAGE_PLACEHOLDER * num_images + question
    elif num_placeholders != num_images:
        raise ValueError(
            f"{_where(record_id)} has {num_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {num_images} "
            f"image(s); give one placeholder per image, or none to put all images before the text"
        )
    # Placeholders go in before the template is applied, as in EasyR1, so `trim` sees the same text.
    text = format_question(question, template)
    items = []
    for i, segment in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            items.append({"type": "image"})
        if segment:
            items.append({"type": "text", "text": segment})
    return items


def render_prompt(tokenizer, question, num_images, template="cot", system=None, *, record_id=None):
    """The chat text of a one-turn prompt, ending with the opened assistant turn (one <|image_pad|> per image).

    The question is first wrapped in `template`; `system` replaces the chat template's default system prompt.
    `record_id` names the example in errors.
    """
    content = _user_content(question, num_images, template, record_id)
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": content})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def merged_token_counts(grid_thws, merge_size):
    """Merged tokens per image: t*h*w // merge_size**2 for each (t, h, w) row."""
    grid_thws = np.asarray(grid_thws, dtype=np.int64).reshape(-1, 3)
    patches = np.prod(grid_thws, axis=1)
    if np.any(grid_thws[:, 1:] % merge_size):
        raise ValueError(
            f"image grids {grid_thws.tolist()} must have h and w divisible by merge_size={merge_size}; "
            "resize images with smart_resize to multiples of patch_size * merge_size"
        )
    return [int(n) for n in patches // merge_size**2]


def expand_image_pads(text, image_token_counts, tokenizer):
    """`text` with its i-th <|image_pad|> repeated image_token_counts[i] times."""
    pad = tokenizer.convert_ids_to_tokens(special_token_ids(tokenizer)["image_pad"])
    segments = text.split(pad)
    if len(segments) - 1 != len(image_token_counts):
        raise ValueError(
            f"text has {len(segments) - 1} {pad} token(s) but {len(image_token_counts)} image token count(s) "
            "were given; pass one count per image"
        )
    pieces = [segments[0]]
    for count, segment in zip(image_token_counts, segments[1:]):
        pieces.append(pad * count)
        pieces.append(segment)
    return "".join(pieces)


def _encode(tokenizer, text):
    return np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int32)


def encode_prompt(tokenizer, question, grid_thws, merge_size, template="cot", system=None, *, record_id=None):
    """Token ids (int32) of the rendered prompt with every image pad expanded to its merged-token count.

    Equals tokenizing `expand_image_pads(render_prompt(...))`; the expansion is done on ids, which is cheaper
    for large images because <|image_pad|> is always a token of its own.
    """
    counts = merged_token_counts(grid_thws, merge_size)
    text = render_prompt(tokenizer, question, len(counts), template, system, record_id=record_id)
    ids = _encode(tokenizer, text)
    image_pad_id = special_token_ids(tokenizer)["image_pad"]
    is_pad = ids == image_pad_id
    if int(is_pad.sum()) != len(counts):
        raise ValueError(
            f"{_where(record_id)}: the question text itself contains {SPECIAL_TOKENS['image_pad']}; mark image "
            f"positions with {IMAGE_PLACEHOLDER} instead"
        )
    repeats = np.ones_like(ids)
    repeats[is_pad] = counts
    return np.repeat(ids, repeats)


def encode_sft_example(
    tokenizer, question, answer, grid_thws, merge_size, template, system=None, *, record_id=None
):
    """Token ids (int32) of prompt + answer turn, and a loss mask (int32) that is 1 on the answer turn only.

    The answer turn is `answer<|im_end|>\\n`, tokenized apart from the prompt exactly as LLaMA-Factory does for
    Qwen2-VL templates; the mask covers all of it, the trailing newline included (LLaMA-Factory's labels do), so
    the model learns to close its turn. Prompt tokens, image pads included, get 0.
    """
    prompt_ids = encode_prompt(tokenizer, question, grid_thws, merge_size, template, system, record_id=record_id)
    answer_ids = _encode(tokenizer, f"{answer}{SPECIAL_TOKENS['im_end']}\n")
    ids = np.concatenate([prompt_ids, answer_ids])
    loss_mask = np.concatenate([np.zeros_like(prompt_ids), np.ones_like(answer_ids)])
    return ids, loss_mask


def parse_llamafactory_record(record, record_id):
    """(question, answer, image paths) of a one-turn LLaMA-Factory record, checked for consistency.

    A record is {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}],
    "images": [...]} with one "<image>" placeholder in the question per image.
    """
    messages = record.get("messages")
    roles = [m.get("role") for m in messages] if isinstance(messages, list) else None
    if roles != ["user", "assistant"]:
        raise ValueError(
            f"record {record_id!r} must hold messages with roles ['user', 'assistant'], got {roles}; "
            "split multi-turn conversations into one record per turn"
        )
    question, answer = messages[0]["content"], messages[1]["content"]
    images = list(record.get("images", []))
    num_placeholders = question.count(IMAGE_PLACEHOLDER)
    if num_placeholders != len(images):
        raise ValueError(
            f"record {record_id!r} has {num_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in its question but "
            f"{len(images)} image(s); fix the annotation so each image has exactly one placeholder"
        )
    return question, answer, images
