"""The Jinja chat template the peer benchmark gives `vllm serve` renders exactly our `internvl2_5` prompts.

Rendered as vLLM renders a chat template (transformers' Jinja environment, the messages' content as parts, images as
`{"type": "image"}`), each `<image>` expanded as vLLM's InternVL processor expands it, and tokenised; against our own
prompt builder's token ids for the same conversation (services.llm.prompt, what the LLM service prefills).
The benchmark also checks `vllm serve`'s own prompt ids against ours on the real server (`test_peer_quick.py`).
"""

from __future__ import annotations

import pytest
from transformers.utils.chat_template_utils import _compile_jinja_template

from bench.peer.chat_template import chat_template
from services.contract import template
from services.contract.conversation import Conversation, ImageRef, Turn
from services.llm.prompt import PromptBuilder
from services.model.checkpoint import open_checkpoint
from services.model.modules import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(open_checkpoint(str(tiny_checkpoint())))


def _vllm_ids(tokenizer, messages: list[dict], tiles: list[int], default_system: str | None) -> list[int]:
    text = _compile_jinja_template(chat_template(default_system)).render(messages=messages,
                                                                          add_generation_prompt=True)
    for n in tiles:
        text = text.replace(template.IMAGE_PLACEHOLDER, template.image_tokens(n), 1)
    assert template.IMAGE_PLACEHOLDER not in text
    return tokenizer(text, add_special_tokens=True).input_ids


def _our_ids(tokenizer, conversation: Conversation, default_system: str | None) -> list[int]:
    return list(PromptBuilder(tokenizer, 256, default_system, 1 << 20).build(conversation).token_ids)


def _image(n: int) -> ImageRef:
    return ImageRef(key=f"k{n}", num_tiles=n)


IMAGE = {"type": "image"}


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


CASES = {
    "text only, default system": (
        [{"role": "user", "content": "Write a haiku."}],
        Conversation(user_parts=("Write a haiku.",))),
    "one image before the question": (
        [{"role": "user", "content": [IMAGE, _text("Describe the image in detail.")]}],
        Conversation(user_parts=(_image(5), "Describe the image in detail."))),
    "two images, another system prompt": (
        [{"role": "system", "content": "You are terse."},
         {"role": "user", "content": [IMAGE, IMAGE, _text("Compare them.")]}],
        Conversation(user_parts=(_image(1), _image(3), "Compare them."), system_message="You are terse.")),
    "system and developer joined, text parts concatenated": (
        [{"role": "system", "content": "One."}, {"role": "developer", "content": [_text("Two.")]},
         {"role": "user", "content": [_text("a "), _text("b")]}],
        Conversation(user_parts=("a ", "b"), system_message="One.\nTwo.")),
    "three turns about an image (stateless history)": (
        [{"role": "user", "content": [IMAGE, _text("Describe the image in detail.")]},
         {"role": "assistant", "content": "A sunset."},
         {"role": "user", "content": "What colours stand out?"},
         {"role": "assistant", "content": [_text("Orange.")]},
         {"role": "user", "content": "Is there any text in it?"}],
        Conversation(user_parts=("Is there any text in it?",), history=(
            Turn((_image(5), "Describe the image in detail."), "A sunset."),
            Turn(("What colours stand out?",), "Orange.")))),
    "a question before the image": (
        [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."},
         {"role": "user", "content": [IMAGE, _text("And this?")]}],
        Conversation(user_parts=(_image(2), "And this?"), history=(Turn(("Hello.",), "Hi."),))),
    "consecutive user messages are one turn": (
        [{"role": "user", "content": [IMAGE]}, {"role": "user", "content": "What is it?"}],
        Conversation(user_parts=(_image(1), "What is it?"))),
}


@pytest.mark.parametrize("default_system", [None, "The checkpoint's own system message."])
@pytest.mark.parametrize("case", sorted(CASES))
def test_template_gives_our_prompt_ids(tokenizer, case, default_system):
    messages, conversation = CASES[case]
    tiles = [image.num_tiles for image in conversation.images()]
    ours = _our_ids(tokenizer, conversation, default_system)
    assert _vllm_ids(tokenizer, messages, tiles, default_system) == ours
    assert ours.count(tokenizer.convert_tokens_to_ids(template.IMG_CONTEXT)) == 256 * sum(tiles)


def test_a_different_system_message_gives_other_ids(tokenizer):
    """The comparison can fail: the default system message is part of what is compared."""
    messages, conversation = CASES["text only, default system"]
    assert _vllm_ids(tokenizer, messages, [], "Another one.") != _our_ids(tokenizer, conversation, None)
