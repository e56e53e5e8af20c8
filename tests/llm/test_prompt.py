"""Prompt assembly: the conversation becomes exactly the string (and ids) the original chat() builds."""

from __future__ import annotations

import pytest

from services.contract.conversation import Conversation, ImageRef, Turn, VideoRef
from services.contract.errors import ContextTooLongError, InvalidArgumentError
from services.contract.template import (
    DEFAULT_SYSTEM_MESSAGE,
    expand_images,
    multi_image_prefix,
    render,
    video_prefix,
)
from services.llm.prompt import PromptBuilder

A, B = ImageRef("key-a", 1), ImageRef("key-b", 2)
FRAMES = VideoRef((ImageRef("f1", 1), ImageRef("f2", 1), ImageRef("f3", 1)))


@pytest.fixture(scope="module")
def chat(reference):
    return reference("qwen2")


@pytest.fixture(scope="module")
def builder(chat):
    return PromptBuilder(chat.tokenizer, 256, chat.checkpoint.spec.system_message, max_context_tokens=32768)


# (user parts, history as Turns, the original's question, the original's history pairs, tiles in placeholder order)
CASES = {
    "text": (("Hello there.",), (), "Hello there.", None, []),
    "one-image-first-turn": ((A, "Describe."), (), "<image>\nDescribe.", None, [1]),
    "image-after-text": (("Describe.", A), (), "<image>\nDescribe.", None, [1]),
    "explicit-placeholder": (("Look: <image> what is it?", A), (), "Look: <image> what is it?", None, [1]),
    "two-images": ((A, B, "Compare."), (), multi_image_prefix(2) + "Compare.", None, [1, 2]),
    "placeholders-across-parts": (("First <image>,", A, " then <image>.", B), (),
                                  "First <image>, then <image>.", None, [1, 2]),
    "video": ((FRAMES, "What happens?"), (), video_prefix(3) + "What happens?", None, [1, 1, 1]),
    "history-with-images": (
        ("And now?",),
        (Turn((A, "Describe."), "A cat."), Turn(("Sure?",), "Yes.")),
        "And now?", [("<image>\nDescribe.", "A cat."), ("Sure?", "Yes.")], [1]),
    "empty-answer-in-history": (("Again.",), (Turn(("Hi",), ""),), "Again.", [("Hi", "")], []),
    "image-in-second-turn": ((B, "This one?"), (Turn((A, "Describe."), "A cat."),),
                             "<image>\nThis one?", [("<image>\nDescribe.", "A cat.")], [1, 2]),
}


@pytest.mark.parametrize("case", CASES)
def test_prompt_equals_the_original(builder, chat, case):
    parts, history, question, pairs, tiles = CASES[case]
    prompt = builder.build(Conversation(user_parts=parts, history=history))
    # The original: render question and history with the model's system message, then expand `<image>` in order.
    expected = expand_images(render(question, pairs or (), chat.checkpoint.spec.system_message), tiles)
    assert prompt.expanded_text == expected
    assert list(prompt.token_ids) == chat.tokenizer(expected).input_ids
    assert [image.num_tiles for image in prompt.images] == tiles


@pytest.mark.parametrize(("parts", "question", "tiles"), [
    ((A, "Describe."), "Describe.", [1]),
    (("Image-1: <image>\nImage-2: <image>\nCompare.", A, B), "Image-1: <image>\nImage-2: <image>\nCompare.",
     [1, 2]),
])
def test_first_turn_matches_chat_build_prompt(builder, chat, parts, question, tiles):
    prompt = builder.build(Conversation(user_parts=parts))
    assert prompt.expanded_text == chat.build_prompt(question, None, tiles)[1]


def test_mixed_images_and_video_are_numbered_in_part_order(builder):
    prompt = builder.build(Conversation(user_parts=(A, FRAMES, "Explain.")))
    assert "Image-1: <img>" in prompt.expanded_text
    assert prompt.text.endswith("<|im_start|>user\nImage-1: <img></img>\nFrame1: <img></img>\nFrame2: <img></img>\n"
                                "Frame3: <img></img>\nExplain.<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.image_keys == ["key-a", "f1", "f2", "f3"]


@pytest.mark.parametrize(("system", "rendered"), [
    (None, DEFAULT_SYSTEM_MESSAGE), ("You are terse.", "You are terse."), ("", "")])
def test_system_message(builder, system, rendered):
    prompt = builder.build(Conversation(user_parts=("Hi",), system_message=system))
    assert prompt.text.startswith(f"<|im_start|>system\n{rendered}<|im_end|>\n<|im_start|>user\nHi")


def test_literal_img_tags_are_text_as_in_the_original(builder, chat):
    """`<img>` typed by a user is the special token the original gives it, not an image slot."""
    question = "What does <img></img> do in HTML? Here: <image> and <img src=x>"
    prompt = builder.build(Conversation(user_parts=(question, A),
                                        history=(Turn(("<img>?",), "An </img> tag."),)))
    expected = expand_images(render(question, [("<img>?", "An </img> tag.")], chat.checkpoint.spec.system_message),
                             [1])
    assert prompt.expanded_text == expected
    assert list(prompt.token_ids) == chat.tokenizer(expected).input_ids
    assert prompt.image_keys == ["key-a"]


def test_placeholder_text_in_an_answer_stays_text(builder):
    prompt = builder.build(Conversation(user_parts=("Ok",),
                                        history=(Turn((A, "Q"), "I saw <image> there."),)))
    assert prompt.image_keys == ["key-a"]
    assert "I saw <image> there." in prompt.text


@pytest.mark.parametrize(("conversation", "message"), [
    (Conversation(user_parts=()), "user_parts is empty"),
    (Conversation(user_parts=("<image> <image>", A)), "2 <image> placeholders but 1 images"),
    (Conversation(user_parts=("<image>",)), "1 <image> placeholders but 0 images"),
    (Conversation(user_parts=("x <IMG_CONTEXT>",)), "only the server writes"),
    (Conversation(user_parts=("\ue000",)), "only the server writes"),
    (Conversation(user_parts=("hi",), history=(Turn(("q",), "<IMG_CONTEXT>"),)),
     "history[0].assistant_text"),
    (Conversation(user_parts=("hi",), system_message="<IMG_CONTEXT>"), "system_message"),
    (Conversation(user_parts=(ImageRef("k", 0),)), "num_tiles must be >= 1"),
    (Conversation(user_parts=(ImageRef("", 1),)), "empty key"),
    (Conversation(user_parts=(VideoRef(()),)), "no frames"),
], ids=["empty", "too-many-placeholders", "placeholder-without-image", "img-context", "sentinel",
        "answer-markup", "system-markup", "zero-tiles", "empty-key", "empty-video"])
def test_bad_conversations(builder, conversation, message):
    with pytest.raises(InvalidArgumentError, match=message.replace("[", r"\[").replace("]", r"\]")):
        builder.build(conversation)


def test_context_limit(chat):
    small = PromptBuilder(chat.tokenizer, 256, None, max_context_tokens=600)
    with pytest.raises(ContextTooLongError):  # 3 tiles = 768 slots: rejected before tokenising
        small.build(Conversation(user_parts=(ImageRef("k", 3),)))
    with pytest.raises(ContextTooLongError):
        small.build(Conversation(user_parts=("word " * 700,)))
    assert len(small.build(Conversation(user_parts=(ImageRef("k", 2),)))) < 600
