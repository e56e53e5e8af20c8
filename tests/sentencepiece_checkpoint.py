"""A tiny InternLM2 checkpoint with the published sizes' tokenizer path: a sentencepiece model trained here, a tokenizer
class of the tests' own (tests/llm/tokenization_testlm.py) named by `auto_map`, InternVL's added tokens right after the
sentencepiece pieces (the model's vocabulary cut to match), and the published checkpoints' other code files as
tripwires that record their import and raise. Shared by the tokenizer test and the end-to-end adapter test.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import sentencepiece
from safetensors.torch import load_file, save_file

from services.model.tiny import make_tiny

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


def build(root: Path, preset: str = "tiny") -> Built:
    """`preset`: the model's shape (services.model.tiny.PRESETS; `small` for vLLM's CPU attention)."""
    out = make_tiny(root / f"{preset}_internlm2_sp", llm="internlm2", preset=preset)
    for name in QWEN_TOKENIZER_FILES:
        (out / name).unlink()
    shutil.copyfile(train_sentencepiece(root), out / "tokenizer.model")
    shutil.copyfile(Path(__file__).parent / "llm" / "tokenization_testlm.py", out / "tokenization_testlm.py")
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
