"""The language path against independent implementations: a reference InternLM2 forward written from the spec,
and transformers' native InternVLForConditionalGeneration.generate, token for token in float32."""

import pytest
import torch
from reference_impl import internlm2_logits, native_config, read_original, to_native_state_dict
from transformers import InternVLForConditionalGeneration

from services.contract.template import video_prefix
from services.model.chat import GenerationParams, InternVLChat
from services.model.checkpoint import open_checkpoint
from services.model.modules import load_language_model
from services.vision.preprocess import load_image

SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


def test_internlm2_mapping_equals_reference_forward(tiny_checkpoint):
    directory = tiny_checkpoint(llm="internlm2", vision="6b", shards=3)
    config, weights = read_original(directory)
    input_ids = torch.randint(0, 151674, (1, 40), generator=torch.Generator().manual_seed(1))
    expected = internlm2_logits(config, weights, input_ids)
    model = load_language_model(open_checkpoint(directory), torch.float32, "cpu")
    with torch.inference_mode():
        ours = model(input_ids=input_ids).logits
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def _native(directory):
    config, weights = read_original(directory)
    model = InternVLForConditionalGeneration(native_config(config)).eval()
    model.load_state_dict(to_native_state_dict(config, weights), strict=True)
    return model


def _native_generate(model, chat, prompt, pixel_values, max_new_tokens):
    input_ids = chat.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, pixel_values=pixel_values, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=151645,
                             pad_token_id=151643)
    return out[0, input_ids.shape[1]:].tolist()


@pytest.mark.parametrize(("llm", "vision"), [("qwen2", "300m"), ("qwen2", "6b"), ("internlm2", "300m"),
                                             ("internlm2", "6b")])
def test_greedy_chat_equals_native_generate(tiny_checkpoint, golden_dir, llm, vision):
    directory = tiny_checkpoint(llm=llm, vision=vision)
    chat = InternVLChat.load(str(directory), dtype="float32", device="cpu")
    native = _native(directory)
    pixels = load_image(golden_dir / "wide_2200x300.png", max_num=2)  # 2x1 grid + thumbnail = 3 tiles
    assert pixels.shape[0] == 3

    question, prompt = chat.build_prompt("Describe the picture.", None, [pixels.shape[0]])
    # The prompt, written out by hand from the original template.
    assert question == "<image>\nDescribe the picture."
    assert prompt == (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n<img>"
                      + "<IMG_CONTEXT>" * 768 + "</img>\nDescribe the picture.<|im_end|>\n<|im_start|>assistant\n")

    params = GenerationParams(max_new_tokens=12)
    ours = chat.generate_ids(prompt, pixels, params)
    assert ours == _native_generate(native, chat, prompt, pixels, 12)
    assert len(ours) >= 2

    answer, history = chat.chat(pixels, "Describe the picture.", params)
    assert answer == chat.tokenizer.decode(ours, skip_special_tokens=True).split("<|im_end|>")[0].strip()
    assert history == [(question, answer)]


def test_multi_image_and_history_prompt_match_native(tiny_checkpoint, golden_dir):
    """Two images with per-image tile counts, then a second round whose history keeps both images."""
    directory = tiny_checkpoint()
    chat = InternVLChat.load(str(directory), dtype="float32", device="cpu")
    native = _native(directory)
    first = load_image(golden_dir / "small_120x90.png", max_num=1)
    second = load_image(golden_dir / "wide_2200x300.png", max_num=2)
    pixels = torch.cat([first, second])
    counts = [first.shape[0], second.shape[0]]
    params = GenerationParams(max_new_tokens=6)

    answer, history = chat.chat(pixels, "Image-1: <image>\nImage-2: <image>\nCompare them.", params,
                                num_patches_list=counts)
    _, prompt = chat.build_prompt("And the colours?", history, counts)
    assert prompt.count("<img>") == 2
    assert prompt.count("<IMG_CONTEXT>") == 256 * sum(counts)
    assert prompt.endswith(f"Compare them.<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
                           "<|im_start|>user\nAnd the colours?<|im_end|>\n<|im_start|>assistant\n")
    assert chat.generate_ids(prompt, pixels, params) == _native_generate(native, chat, prompt, pixels, 6)


def test_video_frames_equal_native(tiny_checkpoint, golden_dir):
    """Video as the original: one tile per frame, `Frame{i}: <image>` lines, one embedding block per frame."""
    directory = tiny_checkpoint(llm="internlm2", vision="300m")
    chat = InternVLChat.load(str(directory), dtype="float32", device="cpu")
    frames = torch.cat([load_image(golden_dir / name, max_num=1) for name in
                        ("small_120x90.png", "wide_2200x300.png", "portrait_333x1200.png")])
    question = video_prefix(3) + "What happens?"
    assert question == "Frame1: <image>\nFrame2: <image>\nFrame3: <image>\nWhat happens?"
    _, prompt = chat.build_prompt(question, None, [1, 1, 1])
    assert "Frame2: <img>" + "<IMG_CONTEXT>" * 256 + "</img>\nFrame3: " in prompt
    params = GenerationParams(max_new_tokens=6)
    assert chat.generate_ids(prompt, frames, params) == _native_generate(_native(directory), chat, prompt, frames, 6)


def test_seeded_sampling_is_reproducible(tiny_checkpoint):
    chat = InternVLChat.load(str(tiny_checkpoint()), dtype="float32", device="cpu")
    _, prompt = chat.build_prompt("Hello", None, [])
    params = GenerationParams(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.95)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(chat.generate_ids(prompt, None, params))
    torch.manual_seed(8)
    other = chat.generate_ids(prompt, None, params)
    assert runs[0] == runs[1]
    assert other != runs[0]
