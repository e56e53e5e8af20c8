"""Constrained decoding as every process takes it: which grammar an answer must match, its limits, its wire mapping.

The gateway and the LLM service both validate what they can without a tokenizer (the schema is JSON, a choice list
is not empty); the LLM service compiles the grammar against its tokenizer (`services.llm.grammar`) and refuses a
schema or pattern xgrammar cannot compile, naming the problem.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field

from internvl.common.v1 import common_pb2

from services.contract.errors import InvalidArgumentError


@dataclass(frozen=True)
class ConstraintLimits:
    """How large a constraint may be, before anything compiles it. Each field is a flag of the gateway and of the
    LLM service (plain metadata: the contract is below the runtime's `flag()`)."""

    max_constraint_chars: int = field(default=64 * 1024, metadata={
        "help": "most characters of a constraint's schema, pattern or choices together (default %(default)s)"})
    max_constraint_choices: int = field(default=1024, metadata={
        "help": "most choices of a choice constraint (default %(default)s)"})

    def problems(self) -> list[str]:
        return [f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                for name in ("max_constraint_chars", "max_constraint_choices") if getattr(self, name) < 1]


DEFAULT_CONSTRAINT_LIMITS = ConstraintLimits()


class ConstraintKind(enum.Enum):
    JSON_OBJECT = "json_object"
    JSON_SCHEMA = "json_schema"
    REGEX = "regex"
    CHOICE = "choice"


@dataclass(frozen=True)
class Constraint:
    """What the answer must match: any JSON object, a JSON Schema (`schema`, JSON text), a regular expression
    (`pattern`, the whole answer) or one of `choices`."""

    kind: ConstraintKind
    schema: str = ""
    strict: bool = False
    pattern: str = ""
    choices: tuple[str, ...] = ()

    def validate(self, limits: ConstraintLimits = DEFAULT_CONSTRAINT_LIMITS) -> None:
        """Refuses a constraint above `limits` (naming the limit and its flag) or one that cannot have a grammar."""
        size = len(self.schema) + len(self.pattern) + sum(map(len, self.choices))
        if size > limits.max_constraint_chars:
            raise InvalidArgumentError(f"the constraint is larger than {limits.max_constraint_chars} characters "
                                       f"(--max-constraint-chars), got {size}")
        if self.kind is ConstraintKind.JSON_SCHEMA:
            try:
                schema = json.loads(self.schema)
            except ValueError as exc:
                raise InvalidArgumentError(f"json_schema: the schema is not valid JSON ({exc})") from None
            except RecursionError:  # thousands of nested arrays or objects fit in --max-constraint-chars
                raise InvalidArgumentError("json_schema: the schema is nested too deeply to parse") from None
            if not isinstance(schema, (dict, bool)):
                raise InvalidArgumentError("json_schema: a schema must be a JSON object (or true/false)")
        elif self.kind is ConstraintKind.REGEX and not self.pattern:
            raise InvalidArgumentError("regex: the pattern is empty")
        elif self.kind is ConstraintKind.CHOICE:
            if not self.choices:
                raise InvalidArgumentError("choice: the list of choices is empty")
            if len(self.choices) > limits.max_constraint_choices:
                raise InvalidArgumentError(f"choice: at most {limits.max_constraint_choices} choices "
                                           f"(--max-constraint-choices), got {len(self.choices)}")
            if not all(self.choices):
                raise InvalidArgumentError("choice: a choice is an empty string")

    @classmethod
    def from_pb(cls, message: common_pb2.Constraint) -> Constraint | None:
        which = message.WhichOneof("kind")
        if which is None:
            return None
        if which == "json_object":
            return cls(ConstraintKind.JSON_OBJECT)
        if which == "json_schema":
            return cls(ConstraintKind.JSON_SCHEMA, schema=message.json_schema.schema,
                       strict=message.json_schema.strict)
        if which == "regex":
            return cls(ConstraintKind.REGEX, pattern=message.regex)
        return cls(ConstraintKind.CHOICE, choices=tuple(message.choice.choices))

    def to_pb(self) -> common_pb2.Constraint:
        if self.kind is ConstraintKind.JSON_OBJECT:
            return common_pb2.Constraint(json_object=common_pb2.JsonObject())
        if self.kind is ConstraintKind.JSON_SCHEMA:
            return common_pb2.Constraint(json_schema=common_pb2.JsonSchema(schema=self.schema, strict=self.strict))
        if self.kind is ConstraintKind.REGEX:
            return common_pb2.Constraint(regex=self.pattern)
        return common_pb2.Constraint(choice=common_pb2.ChoiceList(choices=list(self.choices)))
