"""A sentencepiece tokenizer shaped like InternLM2's remote-code tokenizer, for tests.

tests/llm/test_internlm2_tokenizer.py copies this file into a test checkpoint as `tokenization_testlm.py` and names
the class in that checkpoint's `tokenizer_config.json` `auto_map`, so that `AutoTokenizer.from_pretrained(...,
trust_remote_code=True)` loads it as checkpoint code, the way it loads InternLM2's tokenizer. It keeps what the
serving stack relies on in InternLM2's: one sentencepiece model file (`tokenizer.model`, BPE with byte fallback),
`<s>` prepended to every encoded text and no `</s>` appended, the added tokens (chat and image markers) at ids after
the sentencepiece pieces, and pieces decoded by sentencepiece itself, added tokens written literally between them.
It imports nothing but sentencepiece and transformers: transformers checks a remote module's imports before loading.
"""

from __future__ import annotations

import os
import shutil
from typing import ClassVar

import sentencepiece
from transformers import PreTrainedTokenizer


class TinySPTokenizer(PreTrainedTokenizer):
    """Sentencepiece pieces as tokens; special tokens by content, `<s>` (bos) added in front of every text."""

    vocab_files_names: ClassVar[dict[str, str]] = {"vocab_file": "tokenizer.model"}
    model_input_names: ClassVar[list[str]] = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, unk_token: str = "<unk>", bos_token: str = "<s>", eos_token: str = "</s>",
                 pad_token: str = "</s>", add_bos_token: bool = True, add_eos_token: bool = False, **kwargs):
        # The base class's __init__ already asks for the vocabulary (to place special tokens), so the processor
        # has to exist first.
        self.vocab_file = vocab_file
        self.sp_model = sentencepiece.SentencePieceProcessor(model_file=vocab_file)
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        super().__init__(unk_token=unk_token, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                         add_bos_token=add_bos_token, add_eos_token=add_eos_token, **kwargs)

    @property
    def vocab_size(self) -> int:
        """The sentencepiece pieces only; the added tokens come after them."""
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        # Text between added tokens: sentencepiece encodes it whole (a dummy "▁" prefix included, when the model
        # asks for one), spelling what its pieces lack in <0xNN> byte pieces.
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        # Out of range raises, as InternLM2's does: an id the tokenizer lacks is the caller's mistake.
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Runs of pieces decoded by sentencepiece (▁ -> space, byte pieces -> UTF-8), special and added tokens
        as their text: sentencepiece would drop control pieces such as `<s>`, and does not know the added ones."""
        literal = set(self.all_special_tokens) | set(self.added_tokens_encoder)
        out: list[str] = []
        run: list[str] = []
        for token in tokens:
            if token in literal:
                out += [self.sp_model.decode_pieces(run), token]
                run = []
            else:
                run.append(token)
        out.append(self.sp_model.decode_pieces(run))
        return "".join(out)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: list[int] | None = None) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        ids = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            ids += bos + token_ids_1 + eos
        return ids

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: list[int] | None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask += bos + [0] * len(token_ids_1) + eos
        return mask

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Writes the sentencepiece model: a copy of the file loaded, or the loaded model's serialised proto."""
        if not os.path.isdir(save_directory):
            raise ValueError(f"{save_directory} is not a directory")
        target = os.path.join(save_directory, (f"{filename_prefix}-" if filename_prefix else "")
                              + self.vocab_files_names["vocab_file"])
        if os.path.isfile(self.vocab_file):
            if os.path.abspath(self.vocab_file) != os.path.abspath(target):
                shutil.copyfile(self.vocab_file, target)
        else:
            with open(target, "wb") as f:
                f.write(self.sp_model.serialized_model_proto())
        return (target,)
