"""A small Qwen2.5-VL-compatible tokenizer built locally, and helpers shared with the real one.

The tiny tokenizer is a byte-level BPE (so every string round-trips exactly) trained on a fixed embedded corpus
plus optional task texts, with Qwen2.5-VL's 22 added tokens appended after the learned vocabulary in Qwen's order
and a chat template that renders the same text as Qwen2.5-VL's. It is saved as a Hugging Face tokenizer directory
that `transformers.AutoTokenizer` loads offline, so the tiny model and the real 3B/7B checkpoints go through the
same prompt code.
"""

import json
import os

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer
from transformers.tokenization_utils_tokenizers import TokenizersBackend

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2.5-VL's added tokens in id order (151643 ...). The flag says whether decoding with
# skip_special_tokens drops the token, as in Qwen's tokenizer_config.json.
QWEN_ADDED_TOKENS = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

SPECIAL_TOKENS = {
    "image_pad": "<|image_pad|>",
    "video_pad": "<|video_pad|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "endoftext": "<|endoftext|>",
}

# Same behaviour as Qwen2.5-VL's chat template: a default system turn unless the conversation starts with one;
# string contents verbatim; list contents item by item (images and videos become a vision placeholder, optionally
# numbered with add_vision_id; text items verbatim); and an open assistant turn with add_generation_prompt.
CHAT_TEMPLATE = (
    "{% set seen = namespace(images=0, videos=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "{% set seen.images = seen.images + 1 %}"
    "{% if add_vision_id %}Picture {{ seen.images }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' or 'video' in item %}"
    "{% set seen.videos = seen.videos + 1 %}"
    "{% if add_vision_id %}Video {{ seen.videos }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in item %}"
    "{{ item['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)

# Pre-tokens: a word with at most one leading space, a run of punctuation with at most one leading space, a single
# digit (numbers are spelled digit by digit, as in Qwen), line breaks with the spaces before them, other spaces.
_PRE_TOKEN_PATTERN = r" ?\p{L}+| ?[^\s\p{L}\p{N}]+|\p{N}|[^\S\r\n]*[\r\n]+|\s+(?!\S)|\s+"

# The training corpus: chat scaffolding, the paper's prompt instructions and task suffixes, reasoning traces with
# LaTeX answers, and the vocabulary of the procedurally generated demo tasks.
_CORPUS = """\
system
user
assistant
You are a helpful assistant.
You FIRST think about the reasoning process as an internal monologue and then provide the final answer.
The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE put in \\boxed{}.
You MUST provide the final answer directly.
Answer with the option's letter from the given choices directly.
Answer the question using a single word or phrase.
When the provided information is insufficient, respond with 'Unanswerable'.
Reference OCR token: STOP, EXIT, OPEN, SALE, COFFEE, 2024
Which of the following could the test show? A. yes B. no C. maybe D. none of the above
Question: How many objects are in the image? Options: A. 1 B. 2 C. 3 D. 4
<think> The image shows three red circles and two blue squares, so the number of circles is 3. </think> \\boxed{3}
<think> First count the shapes: 1 + 2 + 4 = 7. Then subtract the 2 green ones: 7 - 2 = 5. </think> \\boxed{5}
<think> The angle sum of a triangle is 180 degrees, so x = 180 - 65 - 45 = 70. </think> The answer is \\boxed{70}.
<think> Let the side be $a$. Then $a^2 = 16$, so $a = 4$. </think> \\boxed{4}
<think> The area is $\\frac{1}{2} \\cdot 4 \\cdot 6 = 12$. </think> \\boxed{12}
<think> By the Pythagorean theorem, $c = \\sqrt{3^2 + 4^2} = \\sqrt{25} = 5$. </think> \\boxed{5}
<think> The ratio is $\\frac{6}{8} = \\frac{3}{4} = 0.75$, which is 75%. </think> \\boxed{\\frac{3}{4}}
<think> The object on the left is a yellow triangle. </think> \\boxed{yellow}
<think> The digit in the top right corner is 8. </think> \\boxed{8}
<think> The largest shape is the purple square in the center. </think> \\boxed{B}
What color is the shape in the top left corner? Answer: red
What shape is at the bottom right of the image? Answer: triangle
Which digit is written in the middle of the image? Answer: 7
Is the circle above or below the square? Answer: above
Is there a green star to the left of the blue circle? Answer: yes
How many triangles are there? Answer: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9
Count the red circles, the blue squares, the green triangles and the yellow stars.
colors: red, green, blue, yellow, orange, purple, black, white, gray, pink, brown, cyan
shapes: circle, square, triangle, star, cross, diamond, rectangle, ellipse, line, dot
positions: top, bottom, left, right, center, middle, corner, above, below, next to, between, inside, outside
sizes: small, large, big, tiny, larger, smaller, largest, smallest, bigger, biggest
numbers: zero, one, two, three, four, five, six, seven, eight, nine, ten, first, second, third, last
The letters are A, B, C, D, E, F, G, H, I, J, K, L, M, N, O, P, Q, R, S, T, U, V, W, X, Y, Z.
the letters are a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p, q, r, s, t, u, v, w, x, y, z.
Find the value of x. Find the area of the triangle. Find the length of the side. Round to the nearest tenth.
Solve for y if 2y + 3 = 11. Compute 12 * 7 - 5 / (1 + 4). What is 45% of 80? Is 17 a prime number?
The answer is \\boxed{42}. The answer is \\boxed{-3.5}.
The answer is \\boxed{x^2 + 1}. The answer is \\boxed{\\pi}.
Describe the image. What is in this picture? What is the man holding? What does the sign say? What time is it?
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
Science, history, physics, chemistry, biology, mathematics, geography, economics, literature, medicine.
People can use the engineering-design process to develop solutions to problems.
Which property do these objects have in common? Which word would you find on a dictionary page?
This is a question about the image. Look at the picture and think step by step before you answer.
The cell nucleus contains DNA. The tissue shows inflammation. Is this a normal finding? yes or no
"""


def _pre_tokenizer():
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(_PRE_TOKEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def build_tiny_tokenizer(out_dir, extra_texts=(), vocab_size=1024):
    """Trains and saves a small byte-level BPE tokenizer with Qwen2.5-VL's special tokens; returns `out_dir`.

    `extra_texts` (e.g. the demo tasks' questions and answers) join the embedded corpus, so their words become
    short token sequences. `vocab_size` bounds the total vocabulary (256 bytes + merges + 22 added tokens); a
    small corpus may stop short of it, so size the model from `len(tokenizer)`. The same inputs always give the
    same files.
    """
    num_added = len(QWEN_ADDED_TOKENS)
    if vocab_size < 256 + num_added:
        raise ValueError(
            f"vocab_size={vocab_size} cannot hold the 256 byte tokens and {num_added} added tokens; "
            f"use at least {256 + num_added}"
        )
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - num_added,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = _CORPUS.splitlines() + [str(text) for text in extra_texts]
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tokenizer.add_tokens(
        [tokenizers.AddedToken(token, special=special, normalized=False) for token, special in QWEN_ADDED_TOKENS]
    )
    hf_tokenizer = TokenizersBackend(
        tokenizer_object=tokenizer,
        eos_token=SPECIAL_TOKENS["im_end"],
        pad_token=SPECIAL_TOKENS["endoftext"],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    os.makedirs(out_dir, exist_ok=True)
    # Keep the chat template inside tokenizer_config.json, where Qwen2.5-VL checkpoints have it.
    hf_tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    return str(out_dir)


def load_tokenizer(tokenizer_dir):
    """Loads a tokenizer directory (built here or from a Qwen2.5-VL checkpoint) with AutoTokenizer, offline.

    When the directory also holds a processor chat template (`chat_template.json`, as Qwen2.5-VL checkpoints do),
    that template wins: it is the one Qwen's processor renders multimodal conversations with.
    """
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json")
    if not os.path.isdir(tokenizer_dir) or not any(
        os.path.isfile(os.path.join(tokenizer_dir, name)) for name in tokenizer_files
    ):
        raise FileNotFoundError(
            f"no tokenizer files ({', '.join(tokenizer_files)}) in {tokenizer_dir!r}; point to a Qwen2.5-VL "
            "checkpoint directory or build a tiny tokenizer there with build_tiny_tokenizer()"
        )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    processor_template = os.path.join(tokenizer_dir, "chat_template.json")
    if os.path.isfile(processor_template):
        with open(processor_template, encoding="utf-8") as f:
            tokenizer.chat_template = json.load(f)["chat_template"]
    return tokenizer


def special_token_ids(tokenizer):
    """Ids of the Qwen2.5-VL special tokens, keyed image_pad, video_pad, vision_start, vision_end, im_start,
    im_end, endoftext and pad (the tokenizer's pad token, else <|endoftext|> as in Qwen's generation config)."""
    ids = {}
    for name, token in SPECIAL_TOKENS.items():
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != token:
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} has no {token} token; use a Qwen2.5-VL tokenizer or one "
                "from build_tiny_tokenizer()"
            )
        ids[name] = token_id
    ids["pad"] = ids["endoftext"] if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    return ids
