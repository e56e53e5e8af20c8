"""The internvl2_5 template, written out by hand from the original conversation.py rules."""

from services.contract import template

SYS = template.DEFAULT_SYSTEM_MESSAGE


def test_default_system_message_is_the_original():
    assert SYS == ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
                   "多模态大语言模型。")


def test_single_turn():
    assert template.render("Hi") == (
        f"<|im_start|>system\n{SYS}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_history_and_system_override():
    text = template.render("Q2", [("<image>\nQ1", "A1")], system_message="Be brief.")
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\nQ1<|im_end|>\n"
                    "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n")


def test_empty_system_message_is_kept_empty():
    assert template.render("Hi", system_message="").startswith("<|im_start|>system\n<|im_end|>\n")


def test_images_expand_in_order_with_their_tile_counts():
    text = template.expand_images("A <image> B <image> C <image>", [2, 1], tokens_per_tile=3)
    assert text == ("A <img>" + "<IMG_CONTEXT>" * 6 + "</img> B <img>" + "<IMG_CONTEXT>" * 3
                    + "</img> C <image>")


def test_placeholder_rules_of_the_original():
    assert template.first_turn_question("What?", has_images=True, has_history=False) == "<image>\nWhat?"
    assert template.first_turn_question("What?", has_images=True, has_history=True) == "What?"
    assert template.first_turn_question("<image> What?", has_images=True, has_history=False) == "<image> What?"
    assert template.first_turn_question("What?", has_images=False, has_history=False) == "What?"
    assert template.multi_image_prefix(2) == "Image-1: <image>\nImage-2: <image>\n"
    assert template.video_prefix(2) == "Frame1: <image>\nFrame2: <image>\n"


def test_clean_response():
    assert template.clean_response("  An answer.<|im_end|>junk") == "An answer."
