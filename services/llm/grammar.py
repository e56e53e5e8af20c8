"""Constraints compiled into xgrammar grammars for one tokenizer: what `Sampler` masks a constrained row's logits with.

`Grammars` holds one `xgrammar.TokenizerInfo` and one `xgrammar.GrammarCompiler` per model, both made on the first
constrained request (the vocabulary's decoding takes about a second for 150k tokens). The compiler caches what it
compiled, keyed by the grammar's source text and options, so a schema that many requests share is compiled once.
Every constraint is first written as EBNF text (`constraint_ebnf`): the vLLM engine gives vLLM's xgrammar backend that
same text, over the same vocabulary (`build_tokenizer_info`), so both engines mask with the same grammar.

The tokenizer's added tokens (`<|im_start|>`, `<img>`, `<IMG_CONTEXT>`, ... and the unused rows of a padded lm_head)
are never allowed by a constraint, the stop token excepted once the grammar accepts. xgrammar would not see this by
itself: in a byte-level BPE vocabulary an added token's string is its literal text ("<img>" is made of printable
characters), so `TokenizerInfo.from_huggingface` classifies none of them as special and lets every one of them into an
open JSON string. Such a token means something else to the model, and the detokenizer drops the special ones from the
answer, so the text the client got would not be the text the grammar matched. Here their strings are emptied:
xgrammar classifies a token with an empty string as special and never allows it. Every text is still reachable, in
ordinary tokens, since byte-level BPE spells any byte sequence.
"""

from __future__ import annotations

import json
import re
import threading
from typing import TYPE_CHECKING

import xgrammar

from services.contract.constraint import Constraint, ConstraintKind
from services.contract.errors import InvalidArgumentError

if TYPE_CHECKING:  # the compile worker (services.llm.grammar_worker) imports this module without transformers
    from transformers import PreTrainedTokenizerBase

# xgrammar's C++ messages start with a time and the source position that raised them ("[22:48:56]
# /project/cpp/json_schema_converter.cc:5082: Unsupported type ..."): of no use to the caller.
_SOURCE_PREFIX = re.compile(r"^\[[0-9:.]+\]\s+\S+:\d+:\s*")

# A JSON object at the top level, any members: xgrammar's builtin JSON grammar would also accept an array.
_ANY_OBJECT = '{"type": "object"}'


class Grammars:
    """Compiles `Constraint`s for one tokenizer; thread-safe (`compile` blocks: call it off the event loop)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_id: int):
        """`vocab_size` is the model's (its lm_head's rows, the width of the logits): it may exceed len(tokenizer)."""
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_id = stop_token_id
        self._lock = threading.Lock()
        self._info: xgrammar.TokenizerInfo | None = None
        self._compiler: xgrammar.GrammarCompiler | None = None
        self._vocabulary: tuple[list[str], str] | None = None

    @property
    def vocabulary(self) -> tuple[list[str], str]:
        """(encoded vocabulary, metadata JSON): what `xgrammar.TokenizerInfo.from_vocab_and_metadata` rebuilds the
        tokenizer info from (in a compile worker process); built once."""
        self._ensure()
        assert self._vocabulary is not None
        return self._vocabulary

    @property
    def tokenizer_info(self) -> xgrammar.TokenizerInfo:
        """The vocabulary as xgrammar sees it, added tokens emptied (see the module docstring); built once."""
        return self._ensure()[0]

    @property
    def compiler(self) -> xgrammar.GrammarCompiler:
        return self._ensure()[1]

    def _ensure(self) -> tuple[xgrammar.TokenizerInfo, xgrammar.GrammarCompiler]:
        with self._lock:
            if self._info is None or self._compiler is None:
                self._vocabulary = tokenizer_vocabulary(self.tokenizer, self.vocab_size, self.stop_token_id)
                info = xgrammar.TokenizerInfo.from_vocab_and_metadata(*self._vocabulary)
                self._compiler = xgrammar.GrammarCompiler(info, cache_enabled=True)
                self._info = info
            return self._info, self._compiler

    def compile(self, constraint: Constraint) -> xgrammar.CompiledGrammar:
        """The grammar of `constraint`; InvalidArgumentError naming the kind and xgrammar's reason if it has none."""
        return compile_ebnf(self.compiler, grammar_text(constraint), constraint.kind.value)


def grammar_text(constraint: Constraint) -> str:
    """`constraint_ebnf`, its failure an InvalidArgumentError naming the kind and xgrammar's reason. Fast (the
    conversion writes a rule per schema node or regex operator, linear in the constraint's bounded text): the
    expensive, unbounded part is `compile_ebnf`."""
    try:
        return constraint_ebnf(constraint)
    except (RuntimeError, ValueError) as exc:  # xgrammar raises RuntimeError; ValueError: e.g. unencodable text
        raise InvalidArgumentError(f"{constraint.kind.value}: {_reason(exc)}") from None


def compile_ebnf(compiler: xgrammar.GrammarCompiler, ebnf: str, kind: str) -> xgrammar.CompiledGrammar:
    """The grammar `ebnf` (of a constraint of `kind`) compiled against `compiler`'s vocabulary; InvalidArgumentError
    naming the kind and xgrammar's reason if it fails. Blocking and unbounded in time and memory: the service runs it
    in services.llm.grammar_pool's worker processes."""
    try:
        return compiler.compile_grammar(ebnf)
    except (RuntimeError, ValueError) as exc:
        raise InvalidArgumentError(f"{kind}: {_reason(exc)}") from None


def constraint_ebnf(constraint: Constraint) -> str:
    """The grammar of `constraint` as xgrammar EBNF text: what every engine compiles (the vLLM engine hands it to
    vLLM's xgrammar backend), so that a constraint means the same text everywhere. Raises xgrammar's RuntimeError
    (or ValueError) when the constraint has no grammar."""
    if constraint.kind is ConstraintKind.JSON_OBJECT:
        return str(xgrammar.Grammar.from_json_schema(_ANY_OBJECT, any_whitespace=False))
    if constraint.kind is ConstraintKind.JSON_SCHEMA:
        # Compact whitespace (", " and ": " between members, nothing else): with any_whitespace the grammar allows
        # whitespace between every two tokens, and a model that does not know the schema well can spend all of
        # max_new_tokens on spaces and newlines without ever closing the object.
        grammar = xgrammar.Grammar.from_json_schema(constraint.schema, any_whitespace=False,
                                                    strict_mode=constraint.strict)
        return json_string_characters_fixed(str(grammar))
    if constraint.kind is ConstraintKind.REGEX:
        return str(xgrammar.Grammar.from_regex(constraint.pattern))
    if constraint.kind is ConstraintKind.CHOICE:
        return choice_ebnf(constraint.choices)
    raise ValueError(f"unsupported constraint kind {constraint.kind!r}")


# xgrammar (0.2.8 as 0.2.9) writes the characters of a length-bounded JSON string (minLength / maxLength) as any character but a
# quote, a backslash, CR or LF: control characters pass unescaped (invalid JSON) and escapes are impossible.
_BOUNDED_CHARACTERS = re.compile(r'^(\S+_characters) ::= \(\(\[\^\\"\\\\\\r\\n\]\)\)$', re.MULTILINE)
# What a JSON string character is: anything but a control character, a quote or a backslash, or an escape.
_JSON_CHARACTER = (r'(([^\0-\x1f\"\\]) | ("\\" (([\"\\/bfnrt]) | ("u" [A-Fa-f0-9] [A-Fa-f0-9] [A-Fa-f0-9] '
                   r'[A-Fa-f0-9]))))')


def json_string_characters_fixed(ebnf: str) -> str:
    """xgrammar's EBNF of a JSON schema with every length-bounded string's character rule made JSON's (see above):
    each counted character is one unescaped character or one escape sequence."""
    return _BOUNDED_CHARACTERS.sub(lambda m: f"{m.group(1)} ::= {_JSON_CHARACTER}", ebnf)


def choice_ebnf(choices: tuple[str, ...] | list[str]) -> str:
    """An EBNF grammar whose language is exactly `choices`: one string literal per choice, alternated."""
    return "root ::= " + " | ".join(_ebnf_literal(choice) for choice in choices)


def _ebnf_literal(text: str) -> str:
    """`text` as an xgrammar EBNF string literal, in ASCII.

    Quote and backslash are escaped; every character outside printable ASCII is written as a fixed-width \\UXXXXXXXX
    escape. Not \\xHH: xgrammar's \\x takes every hex digit that follows (C's rule), so "\\x00b" would read as one
    character; and not raw text, which would carry control characters (NUL included) into the grammar's source.
    """
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif " " <= char <= "~":
            out.append(char)
        else:
            out.append(f"\\U{ord(char):08X}")
    return '"' + "".join(out) + '"'


def _reason(exc: BaseException) -> str:
    return _SOURCE_PREFIX.sub("", str(exc).strip()) or type(exc).__name__


def build_tokenizer_info(tokenizer: PreTrainedTokenizerBase, vocab_size: int,
                         stop_token_id: int) -> xgrammar.TokenizerInfo:
    """xgrammar's TokenizerInfo of `tokenizer` over `vocab_size` rows, the added tokens' strings emptied."""
    return xgrammar.TokenizerInfo.from_vocab_and_metadata(*tokenizer_vocabulary(tokenizer, vocab_size, stop_token_id))


def tokenizer_vocabulary(tokenizer: PreTrainedTokenizerBase, vocab_size: int,
                         stop_token_id: int) -> tuple[list[str], str]:
    """The encoded vocabulary (`vocab_size` strings, the added tokens' emptied) and the metadata JSON of xgrammar's
    TokenizerInfo of `tokenizer`: what `build_tokenizer_info` makes it from."""
    # from_huggingface detects how the vocabulary is encoded (byte-level BPE, byte fallback, raw) and whether a
    # space is prepended; its metadata is kept and the vocabulary rebuilt without the added tokens.
    detected = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=[stop_token_id])
    metadata = json.loads(detected.dump_metadata())
    metadata["stop_token_ids"] = [stop_token_id]
    encoded: list[str] = [""] * vocab_size  # rows past the tokenizer's tokens stay empty: special, never allowed
    for token, index in tokenizer.get_vocab().items():
        if index < vocab_size:
            encoded[index] = token
    for index in added_token_ids(tokenizer):
        if index < vocab_size:
            encoded[index] = ""  # the stop token too: xgrammar allows a stop token by its id, not by its string
    return encoded, json.dumps(metadata)


def added_token_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of the tokenizer's added tokens, special or not (a non-special one such as <tool_call> is still a
    control token of the model), and of its special tokens."""
    return set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids)
