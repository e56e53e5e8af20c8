"""The InternLM2 sizes' tokenizer path end to end: a sentencepiece model driven by the checkpoint's own code.

InternVL 2.5's 2B, 8B and 26B publish a sentencepiece `tokenizer.model` and their own tokenizer class, named by
`auto_map` in `tokenizer_config.json`, which `load_tokenizer` runs with `trust_remote_code`. The tiny checkpoints
carry a Qwen2 BPE tokenizer even for the InternLM2 shape, so here a tiny InternLM2 checkpoint gets instead: a BPE
sentencepiece model with byte fallback trained on a corpus this module writes, a tokenizer class of this test's own
(tests/llm/tokenization_testlm.py, copied in as checkpoint code), and InternVL's added tokens right after the
sentencepiece pieces, the model's vocabulary cut to match. Then, each against an independent computation:

* `load_tokenizer` runs that class, the added tokens sit at their ids, and a one-image prompt encodes to what the
  sentencepiece processor gives for the text between added tokens, the IMG_CONTEXT run where the template puts it;
* the LLM service answers a text and an image question greedily with the reference path's tokens and text;
* a JSON schema compiles for this byte-fallback vocabulary and random logits decode to JSON that validates;
* no other checkpoint code runs: the directory holds the published checkpoints' modeling and configuration modules
  as tripwires that record their import and raise;
* a length-bounded JSON string refuses control characters (xgrammar's own rule for it admits them, and this
  vocabulary has a byte piece for each: services.llm.grammar rewrites the rule).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import sys
from functools import partial
from pathlib import Path

import helpers.engine
import jsonschema
import pytest
import torch
import transformers.dynamic_module_utils
import xgrammar
from sentencepiece_checkpoint import ADDED, TOKENIZER_CLASS, TRIPWIRE_SOURCE, TRIPWIRES, Built, build

from services.contract import template
from services.contract.constraint import Constraint, ConstraintKind
from services.contract.conversation import ImageRef
from services.llm.config import LLMConfig
from services.llm.engine.sampling import Sampler, SamplingParams, sample_batch
from services.llm.grammar import Grammars
from services.llm.metrics import LLMMetrics
from services.llm.service import LLMService
from services.model.chat import GenerationParams, InternVLChat
from services.model.checkpoint import open_checkpoint
from services.model.modules import load_tokenizer

pytestmark = [pytest.mark.timeout(300)]

MAX_NEW = 12
# Bounded: enum, integer range, boolean; what a greedy random model completes within a few dozen tokens.
BOUNDED_SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", 'blue "sky"']},
        "count": {"type": "integer", "minimum": -5, "maximum": 120},
        "ok": {"type": "boolean"},
    },
    "required": ["colour", "count", "ok"],
    "additionalProperties": False,
}
# With a free string, where noise spells text in byte pieces as well as in merged pieces.
SCHEMA = {**BOUNDED_SCHEMA, "properties": {**BOUNDED_SCHEMA["properties"], "name": {"type": "string"}},
          "required": [*BOUNDED_SCHEMA["required"], "name"]}
BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("internlm2-sp")
    with pytest.MonkeyPatch.context() as patch:
        # transformers copies remote code into its modules cache and imports it from there: a private cache keeps
        # the user's clean and this module's copies apart from any other run's.
        patch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(root / "hf-modules"))
        yield build(root)


@pytest.fixture(scope="module")
def chat(built) -> InternVLChat:
    """The single-process reference path on the checkpoint, float32 on CPU."""
    return InternVLChat.load(str(built.path), dtype="float32", device="cpu")


def expected_ids(built: Built, text: str) -> list[int]:
    """`<s>`, then each added token's id and the sentencepiece processor's own ids for the text between them."""
    ids = [built.sp.bos_id()]
    for piece in re.split("(" + "|".join(map(re.escape, ADDED)) + ")", text):
        if piece in ADDED:
            ids.append(built.id_of(piece))
        elif piece:
            ids += built.sp.encode(piece)
    return ids


def test_load_tokenizer_runs_the_checkpoints_class_with_the_added_tokens_at_their_ids(built, chat):
    tokenizer = load_tokenizer(open_checkpoint(built.path))
    cls = type(tokenizer)
    # The class transformers imported from the checkpoint's module, not a built-in one nor this test's file.
    assert cls.__name__ == TOKENIZER_CLASS and not tokenizer.is_fast
    assert cls.__module__.startswith("transformers_modules.") and cls.__module__.endswith(".tokenization_testlm")
    assert Path(inspect.getfile(cls)).read_bytes() == (built.path / "tokenization_testlm.py").read_bytes()
    assert isinstance(chat.tokenizer, cls)

    base = built.base
    assert base >= 256 + 3 + 100, "the corpus should give well over a hundred merges"
    assert tokenizer.convert_tokens_to_ids(list(ADDED)) == list(range(base, base + len(ADDED)))
    assert [tokenizer.convert_ids_to_tokens(base + k) for k in range(len(ADDED))] == list(ADDED)
    assert len(tokenizer) == base + len(ADDED) == chat.language_model.get_output_embeddings().weight.shape[0]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert set(ADDED) <= set(tokenizer.all_special_tokens)
    assert (chat.img_context_id, chat.stop_id) == (built.id_of(template.IMG_CONTEXT), built.id_of(template.STOP_TOKEN))

    # A one-image question in the internvl2_5 template; the default system message is Chinese, outside the corpus,
    # so the prompt is spelled partly in byte pieces.
    _, prompt = chat.build_prompt("What colour is the car in the picture?", None, [1])
    ids = tokenizer(prompt).input_ids
    assert ids == expected_ids(built, prompt)
    assert any(BYTE_PIECE.fullmatch(built.sp.id_to_piece(i)) for i in ids if i < base)
    start = ids.index(built.id_of(template.IMG_START))
    assert ids[start + 1:start + 257] == [built.id_of(template.IMG_CONTEXT)] * 256
    assert ids[start + 257] == built.id_of(template.IMG_END)
    assert ids.count(built.id_of(template.IMG_CONTEXT)) == 256
    # Before <img>: the system turn and the user role, exactly; after </img>: the question and the open turn.
    assert tokenizer.decode(ids[:start]) == ("<s><|im_start|>system\n" + template.DEFAULT_SYSTEM_MESSAGE
                                             + "<|im_end|>\n<|im_start|>user\n")
    assert tokenizer.decode(ids[start + 258:]) == ("\nWhat colour is the car in the picture?<|im_end|>\n"
                                                   "<|im_start|>assistant\n")
    assert tokenizer.decode(ids) == "<s>" + prompt
    built.assert_no_other_code_ran()


def image_tile() -> torch.Tensor:
    """One seeded 448x448 tile, values in the normalised pixels' range."""
    return torch.rand(1, 3, 448, 448, generator=torch.Generator().manual_seed(5)) * 4 - 2


ask = partial(helpers.engine.ask, max_new_tokens=MAX_NEW)


@pytest.mark.asyncio
async def test_the_service_answers_as_the_reference_path(built, chat, collect):
    """`LLMService.load`, the server's own loading path, on the checkpoint; greedy text and image answers equal
    transformers' generate on the reference path, token for token, and their text its decode."""
    params = GenerationParams(max_new_tokens=MAX_NEW)
    text_question = "Tell me a story about a lighthouse, in français s'il vous plaît."
    _, text_prompt = chat.build_prompt(text_question, None, [])
    text_ids = chat.generate_ids(text_prompt, None, params)
    tiles = image_tile()
    image_question = "What is in the image?"
    _, image_prompt = chat.build_prompt(image_question, None, [1])
    image_ids = chat.generate_ids(image_prompt, tiles, params)
    embeddings = chat.vision.encode(tiles).reshape(-1, chat.language_model.config.hidden_size)
    # The answers are made of sentencepiece pieces, not only of added tokens: the decode below is exercised.
    assert any(i < built.base for i in text_ids + image_ids)

    service = LLMService.load(LLMConfig(model=str(built.path), dtype="float32", device="cpu"), LLMMetrics())
    await service.start()
    try:
        text_request = ask(text_question)
        image_request = ask(image_question, ImageRef("tile", 1))
        assert list(service.prompts.build(text_request.conversation).token_ids) == expected_ids(built, text_prompt)
        assert list(service.prompts.build(image_request.conversation).token_ids) == expected_ids(built, image_prompt)
        text_reply = await collect(await service.generate(text_request))
        image_reply = await collect(await service.generate(image_request, {"tile": embeddings}))
        schema = Constraint(ConstraintKind.JSON_SCHEMA, schema=json.dumps(BOUNDED_SCHEMA))
        json_reply = await collect(await service.generate(ask("The weather, as JSON.", max_new_tokens=80,
                                                              constraint=schema)))
    finally:
        await service.close()

    for reply, ids, prompt, question, pixels in ((text_reply, text_ids, text_prompt, text_question, None),
                                                 (image_reply, image_ids, image_prompt, image_question, tiles)):
        assert reply.token_ids == ids
        assert reply.finish.usage.prompt_tokens == len(chat.tokenizer(prompt).input_ids)
        assert reply.text == chat.tokenizer.decode(ids, skip_special_tokens=True)
        answer, _ = chat.chat(pixels, question, params)
        assert template.clean_response(reply.text) == answer
    assert json_reply.reason == "stop", json_reply.text
    jsonschema.validate(json.loads(json_reply.text), BOUNDED_SCHEMA)
    built.assert_no_other_code_ran()


SAMPLED = [SamplingParams(), SamplingParams(temperature=1.0, seed=1),
           SamplingParams(temperature=0.8, top_p=0.9, seed=2), SamplingParams(temperature=1.2, top_k=100, seed=3)]


def test_a_json_schema_constrains_random_logits_to_valid_json(built, chat):
    """xgrammar reads this vocabulary as byte fallback (▁ for spaces, <0xNN> for bytes); whatever noisy logits
    say, the constrained tokens decode, through the tokenizer, to JSON that validates."""
    tokenizer = chat.tokenizer
    vocab = chat.language_model.get_output_embeddings().weight.shape[0]
    grammars = Grammars(tokenizer, vocab, chat.stop_id)
    assert grammars.tokenizer_info.vocab_type == xgrammar.VocabType.BYTE_FALLBACK
    grammar = grammars.compile(Constraint(ConstraintKind.JSON_SCHEMA, schema=json.dumps(SCHEMA)))
    never = set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids)
    # Pieces holding a quote (the byte piece <0x22> among them), lifted a little more every step, so that the free
    # string ends within the steps while its first characters are noise.
    quotes = [i for token, i in tokenizer.get_vocab().items() if '"' in token or token == "<0x22>"]
    byte_pieces = 0
    for run, params in enumerate(SAMPLED):
        sampler = Sampler(params, vocab, "cpu", grammar=grammar)
        tokens: list[int] = []
        for step in range(300):
            logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(run * 1000 + step)) * 3
            logits[0, quotes] += 0.1 * step
            [token], _ = sample_batch(logits, [sampler])
            tokens.append(token)
            if token == chat.stop_id:
                break
        assert tokens[-1] == chat.stop_id and sampler.grammar_done, tokenizer.decode(tokens)
        assert not never & set(tokens[:-1])
        text = tokenizer.decode(tokens[:-1])
        assert text == tokenizer.decode(tokens[:-1], skip_special_tokens=True)
        jsonschema.validate(json.loads(text), SCHEMA)
        byte_pieces += sum(bool(BYTE_PIECE.fullmatch(built.sp.id_to_piece(t))) for t in tokens[:-1])
    assert byte_pieces, "no answer used a byte piece: the byte-fallback decoding went untested"
    built.assert_no_other_code_ran()


def test_the_tripwires_are_live_and_no_model_code_was_imported(built, chat, tmp_path):
    """A tripwire does record and raise when imported (run here from a copy with its own record), and loading the
    model, the vision path and the tokenizer imported none of the checkpoint's modules."""
    record = tmp_path / "record.txt"
    probe = tmp_path / "modeling_internlm2.py"
    probe.write_text(TRIPWIRE_SOURCE.format(name="modeling_internlm2", record=str(record)))
    with pytest.raises(RuntimeError, match="modeling_internlm2.py was imported"):
        spec = importlib.util.spec_from_file_location("tripwire_probe", probe)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert record.read_text().split() == ["modeling_internlm2"]

    InternVLChat.load(str(built.path), dtype="float32", device="cpu")
    built.assert_no_other_code_ran()
    assert type(chat.language_model).__module__.startswith("transformers.models.llama.")
    loaded = [name for name in sys.modules
              if name.startswith("transformers_modules.") and name.rsplit(".", 1)[-1] in TRIPWIRES]
    assert not loaded, loaded


def test_a_length_bounded_string_refuses_control_characters(built, chat):
    """Found by the random-logits run above when `name` had a maxLength: xgrammar's rule for a length-bounded string
    let <0x19> into the string and the answer was not JSON (services.llm.grammar now rewrites that rule).
    Deterministic here: after `{"name": "a`, no control-character byte piece may follow, and an escape may."""
    vocab = chat.language_model.get_output_embeddings().weight.shape[0]
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}}, "required": ["name"]}
    grammar = Grammars(chat.tokenizer, vocab, chat.stop_id).compile(
        Constraint(ConstraintKind.JSON_SCHEMA, schema=json.dumps(schema)))
    matcher = xgrammar.GrammarMatcher(grammar)
    assert matcher.accept_string('{"name": "a')
    bitmask = xgrammar.allocate_token_bitmask(1, vocab)
    matcher.fill_next_token_bitmask(bitmask, 0)
    control = [built.sp.piece_to_id(f"<0x{byte:02X}>") for byte in range(0x20)]
    allowed = [i for i in control if bitmask[0, i // 32] >> (i % 32) & 1]
    assert not allowed, [built.sp.id_to_piece(i) for i in allowed]
    # An escaped quote counts as one of the 8 characters, and closes nothing.
    assert matcher.accept_string('\\"bc"}')
    assert matcher.is_completed()
