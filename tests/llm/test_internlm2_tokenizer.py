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
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
import sentencepiece
import torch
import transformers.dynamic_module_utils
import xgrammar
from safetensors.torch import load_file, save_file

from services.common.chat import GenerationParams, InternVLChat
from services.common.checkpoint import open_checkpoint
from services.common.contract import template
from services.common.contract.constraint import Constraint, ConstraintKind
from services.common.model import load_tokenizer
from services.common.tiny import make_tiny
from services.llm.config import LLMConfig
from services.llm.grammar import Grammars
from services.llm.metrics import LLMMetrics
from services.llm.prompt import Conversation, ImagePart, TextPart
from services.llm.sampling import Sampler, SamplingParams, sample_batch
from services.llm.service import GenerateRequest, LLMService

pytestmark = [pytest.mark.timeout(300)]

# InternVL's added tokens in the published InternLM2 checkpoints' order: the chat markers, then the image and
# grounding markers. Here they follow the sentencepiece pieces directly.
ADDED = ("<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>",
         "<box>", "</box>")
SP_VOCAB = 800  # 3 control pieces, 256 byte pieces, the rest characters and merges
TOKENIZER_CLASS = "TinySPTokenizer"
# What `make_tiny` writes for its Qwen2 BPE tokenizer; none of it may be left for transformers to find.
QWEN_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "added_tokens.json", "special_tokens_map.json",
                        "tokenizer_config.json")
# The remote code the published checkpoints ship besides the tokenizer. Only the tokenizer's may ever run.
TRIPWIRES = ("configuration_internvl_chat", "modeling_internvl_chat", "configuration_internlm2", "modeling_internlm2",
             "configuration_intern_vit", "modeling_intern_vit", "conversation")
TRIPWIRE_SOURCE = '''"""Stands for the checkpoint's own {name}.py, which the serving stack must never import."""
with open({record!r}, "a", encoding="utf-8") as record:
    record.write("{name}\\n")
raise RuntimeError("the checkpoint's {name}.py was imported")
'''
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


def corpus(lines: int = 400) -> list[str]:
    """Seeded English sentences, questions, numbers and JSON lines: enough for a few hundred BPE merges, among them
    pieces holding quotes, braces and digits, so that a grammar has multi-character tokens to choose from."""
    rng = random.Random(0)
    nouns = ["car", "house", "tree", "river", "lighthouse", "picture", "dog", "cat", "boat", "garden", "city",
             "mountain", "street", "window", "table", "bird", "image", "person", "child", "bridge"]
    adjectives = ["red", "green", "blue", "small", "large", "old", "bright", "quiet", "wide", "tall", "dark"]
    verbs = ["stands", "waits", "shines", "moves", "sleeps", "rests", "appears", "grows", "turns", "looks"]
    places = ["near the sea", "in the park", "on the hill", "under the bridge", "by the road", "at night"]
    out = []
    for i in range(lines):
        noun, other = rng.sample(nouns, 2)
        adjective = rng.choice(adjectives)
        kind = i % 5
        if kind == 0:
            out.append(f"The {adjective} {noun} {rng.choice(verbs)} {rng.choice(places)}.")
        elif kind == 1:
            out.append(f"What is the {noun} doing {rng.choice(places)}? Describe the {other} too.")
        elif kind == 2:
            out.append(f"There are {rng.randint(0, 999)} {noun}s and {rng.randint(0, 99)} {adjective} {other}s.")
        elif kind == 3:
            out.append(json.dumps({"colour": rng.choice(adjectives), "count": rng.randint(-5, 120),
                                   "ok": rng.random() < 0.5, "name": noun}))
        else:
            out.append(f"Tell me a story about a {adjective} {noun}, please; the {other} is {rng.choice(adjectives)}.")
    return out


def train_sentencepiece(workdir: Path) -> Path:
    """A BPE model configured like InternLM2's: byte fallback, digits split, text taken as is (no normalisation,
    whitespace kept, newlines included), a dummy "▁" prefix, and <unk>, <s>, </s> at ids 0, 1, 2."""
    text = workdir / "corpus.txt"
    text.write_text("\n".join(corpus()) + "\n", encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(workdir / "sp"), model_type="bpe", vocab_size=SP_VOCAB,
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    return workdir / "sp.model"


def tokenizer_config(base: int) -> dict:
    """`tokenizer_config.json` as the published InternLM2 checkpoints write it: remote code by auto_map (slow class
    only), control pieces and added tokens in `added_tokens_decoder`, the added ones listed as special."""
    entries = {0: "<unk>", 1: "<s>", 2: "</s>"} | {base + k: token for k, token in enumerate(ADDED)}
    return {
        "auto_map": {"AutoTokenizer": [f"tokenization_testlm.{TOKENIZER_CLASS}", None]},
        "tokenizer_class": TOKENIZER_CLASS,
        "added_tokens_decoder": {str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for i, token in entries.items()},
        "additional_special_tokens": list(ADDED),
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
    }


def cut_vocabulary(out: Path, rows: int) -> None:
    """Keeps the first `rows` embedding and output rows and says so in config.json, as in the published checkpoints
    (vocab_size == len(tokenizer)): the random model would otherwise pick ids no tokenizer piece has."""
    weights = load_file(out / "model.safetensors")
    for name in ("language_model.model.tok_embeddings.weight", "language_model.output.weight"):
        weights[name] = weights[name][:rows].clone()
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["llm_config"]["vocab_size"] = rows
    (out / "config.json").write_text(json.dumps(config, indent=2))


@dataclass(frozen=True)
class Built:
    """The checkpoint directory, its sentencepiece model, and the tripwires' record."""

    path: Path
    sp: sentencepiece.SentencePieceProcessor
    record: Path  # where a tripwire writes its name when imported

    @property
    def base(self) -> int:
        """The first added token's id: the number of sentencepiece pieces."""
        return self.sp.get_piece_size()

    def id_of(self, token: str) -> int:
        return self.base + ADDED.index(token)

    def assert_no_other_code_ran(self) -> None:
        imported = self.record.read_text().split() if self.record.exists() else []
        assert not imported, f"checkpoint modules imported: {imported}"


def build(root: Path) -> Built:
    out = make_tiny(root / "tiny_internlm2_sp", llm="internlm2")
    for name in QWEN_TOKENIZER_FILES:
        (out / name).unlink()
    shutil.copyfile(train_sentencepiece(root), out / "tokenizer.model")
    shutil.copyfile(Path(__file__).with_name("tokenization_testlm.py"), out / "tokenization_testlm.py")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    base = sp.get_piece_size()
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(base), indent=2, ensure_ascii=False))
    special_map = {"additional_special_tokens": list(ADDED), "bos_token": "<s>", "eos_token": "</s>",
                   "pad_token": "</s>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    cut_vocabulary(out, base + len(ADDED))
    record = root / "imported.txt"
    for name in TRIPWIRES:
        (out / f"{name}.py").write_text(TRIPWIRE_SOURCE.format(name=name, record=str(record)))
    return Built(out, sp, record)


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


def ask(*parts, **sampling) -> GenerateRequest:
    sampling.setdefault("max_new_tokens", MAX_NEW)
    return GenerateRequest(Conversation(user_parts=parts), SamplingParams(**sampling),
                           inline_embeddings=any(isinstance(p, ImagePart) for p in parts))


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
        text_request = ask(TextPart(text_question))
        image_request = ask(ImagePart("tile", 1), TextPart(image_question))
        assert list(service.prompts.build(text_request.conversation).token_ids) == expected_ids(built, text_prompt)
        assert list(service.prompts.build(image_request.conversation).token_ids) == expected_ids(built, image_prompt)
        text_reply = await collect(await service.generate(text_request))
        image_reply = await collect(await service.generate(image_request, {"tile": embeddings}))
        schema = Constraint(ConstraintKind.JSON_SCHEMA, schema=json.dumps(BOUNDED_SCHEMA))
        json_reply = await collect(await service.generate(ask(TextPart("The weather, as JSON."), max_new_tokens=80,
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
