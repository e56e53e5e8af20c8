"""The `internvl2_5` conversation template and `<image>` expansion, exactly as the original `chat()` renders them.

Template (separator style MPT): `<|im_start|>system\\n{system}<|im_end|>\\n`, then for every message
`<|im_start|>{role}\\n{text}<|im_end|>\\n`, and the open `<|im_start|>assistant\\n` the model completes.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.contract.errors import InvalidArgumentError

DEFAULT_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
SYSTEM_TEMPLATE = "<|im_start|>system\n{system_message}"
USER_ROLE = "<|im_start|>user\n"
ASSISTANT_ROLE = "<|im_start|>assistant\n"
SEP = "<|im_end|>\n"
STOP_TOKEN = SEP.strip()  # `<|im_end|>`: the original overrides eos_token_id with it

IMAGE_PLACEHOLDER = "<image>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"

# Stands for an image while the LLM service renders a prompt (then becomes `<img></img>`), so a caller may not send
# it; nor `<IMG_CONTEXT>`, whose runs are where embeddings go. A literal `<img>` or `</img>` in text is accepted, as
# the original accepts it: it tokenises to the same special token and is told apart from image markers by position.
IMAGE_SENTINEL = "\ue000"
RESERVED_MARKUP = (IMG_CONTEXT, IMAGE_SENTINEL)

History = Sequence[tuple[str, str]]


def check_text(text: str, where: str) -> None:
    """Refuses caller text holding `RESERVED_MARKUP`; gateway and LLM service accept exactly the same texts."""
    for markup in RESERVED_MARKUP:
        if markup in text:
            raise InvalidArgumentError(f"{where}: the text contains {markup!r}, which only the server writes; "
                                       "send images as image parts (with <image> placeholders if you like)")


def render(question: str, history: History = (), system_message: str | None = None) -> str:
    """The prompt text before image expansion: system, (question, answer) pairs of history, the new question."""
    system = DEFAULT_SYSTEM_MESSAGE if system_message is None else system_message
    parts = [SYSTEM_TEMPLATE.format(system_message=system), SEP]
    for old_question, old_answer in history:
        parts += [USER_ROLE, old_question, SEP] if old_question else [USER_ROLE]
        parts += [ASSISTANT_ROLE, old_answer, SEP] if old_answer else [ASSISTANT_ROLE]
    parts += [USER_ROLE, question, SEP] if question else [USER_ROLE]
    parts.append(ASSISTANT_ROLE)
    return "".join(parts)


def image_tokens(num_tiles: int, tokens_per_tile: int = 256) -> str:
    """`<img>` + 256 `<IMG_CONTEXT>` per tile + `</img>`: the slots the vision embeddings are spliced into."""
    return IMG_START + IMG_CONTEXT * (tokens_per_tile * num_tiles) + IMG_END


def expand_images(prompt: str, num_patches_list: Sequence[int], tokens_per_tile: int = 256) -> str:
    """Replaces each `<image>` in order, once per entry of `num_patches_list` (tiles of that image).

    As in the original, extra `<image>` markers beyond the list stay literal text; callers that want a strict count
    check it with `count_placeholders` first.
    """
    for num_tiles in num_patches_list:
        prompt = prompt.replace(IMAGE_PLACEHOLDER, image_tokens(num_tiles, tokens_per_tile), 1)
    return prompt


def count_placeholders(text: str) -> int:
    return text.count(IMAGE_PLACEHOLDER)


def video_prefix(num_frames: int) -> str:
    """`Frame1: <image>\\nFrame2: <image>\\n...`, the original's video prompt prefix (one image per frame)."""
    return "".join(f"Frame{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(num_frames))


def multi_image_prefix(num_images: int) -> str:
    """`Image-1: <image>\\nImage-2: <image>\\n...`, the original's separate-images prompt prefix."""
    return "".join(f"Image-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(num_images))


def first_turn_question(question: str, has_images: bool, has_history: bool) -> str:
    """The original prepends `<image>\\n` only on a first turn with pixels and no placeholder in the question."""
    if has_images and not has_history and IMAGE_PLACEHOLDER not in question:
        return IMAGE_PLACEHOLDER + "\n" + question
    return question


def clean_response(text: str) -> str:
    """The stored answer: decoded text cut at `<|im_end|>` and stripped, as the original appends to history."""
    return text.split(STOP_TOKEN)[0].strip()
