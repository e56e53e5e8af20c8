"""Constrained decoding as every process takes it: which grammar an answer must match, its limits, its wire mapping.

The gateway and the LLM service both validate what they can without a tokenizer (the schema is JSON, a choice list
is not empty); the LLM service compiles the grammar against its tokenizer (`services.llm.grammar`) and refuses a
schema or pattern xgrammar cannot compile, naming the problem.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from internvl.common.v1 import common_pb2

from services.contract.errors import InvalidArgumentError


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

    MAX_SPEC_CHARS = 64 * 1024
    MAX_CHOICES = 1024

    def validate(self) -> None:
        if len(self.schema) + len(self.pattern) + sum(map(len, self.choices)) > self.MAX_SPEC_CHARS:
            raise InvalidArgumentError(f"the constraint is larger than {self.MAX_SPEC_CHARS} characters")
        if self.kind is ConstraintKind.JSON_SCHEMA:
            try:
                schema = json.loads(self.schema)
            except ValueError as exc:
                raise InvalidArgumentError(f"json_schema: the schema is not valid JSON ({exc})") from None
            except RecursionError:  # thousands of nested arrays or objects fit in MAX_SPEC_CHARS
                raise InvalidArgumentError("json_schema: the schema is nested too deeply to parse") from None
            if not isinstance(schema, (dict, bool)):
                raise InvalidArgumentError("json_schema: a schema must be a JSON object (or true/false)")
        elif self.kind is ConstraintKind.REGEX and not self.pattern:
            raise InvalidArgumentError("regex: the pattern is empty")
        elif self.kind is ConstraintKind.CHOICE:
            if not self.choices:
                raise InvalidArgumentError("choice: the list of choices is empty")
            if len(self.choices) > self.MAX_CHOICES:
                raise InvalidArgumentError(f"choice: at most {self.MAX_CHOICES} choices, got {len(self.choices)}")
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
