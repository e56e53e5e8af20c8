"""The building blocks of the request models (`gateway.openai.protocol`, `gateway.openai.messages`): a strict base
model, problems worded after the path pydantic reports them at, and the value types whose refusals read like the
rest of the API's.

A problem's text follows its path: `problem(" must be an integer")` raised while validating
`messages[0].content[1].video.num_segments` reads "messages[0].content[1].video.num_segments must be an integer";
`protocol.invalid_argument` joins them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, GetCoreSchemaHandler, GetJsonSchemaHandler, PlainValidator
from pydantic_core import PydanticCustomError, core_schema

# The error types of our own problems: worded after their path; a whole message (no path); a field this API does not
# take (worded after its name, and reported before any other problem).
PROBLEM = "internvl_problem"
MESSAGE = "internvl_message"
NOT_TAKEN = "internvl_not_taken"


class Model(BaseModel):
    """Strict (no coercion: `"5"` is not a number, `1` is not `true`) and frozen; keys a model does not declare are
    ignored unless it forbids them."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")


def problem(text: str, kind: str = PROBLEM) -> PydanticCustomError:
    """A refusal reading `text` after the path of where it is raised (`" must be an integer"`, `": only text ..."`),
    or, of kind MESSAGE, `text` alone."""
    return PydanticCustomError(kind, "{text}", {"text": text})


@dataclass(frozen=True)
class Refused:
    """Marks a field this server does not take: null passes (the openai client's "not given"); any other value is
    refused naming the field and `reason`."""

    reason: str

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(self.validate)

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> dict:
        return {"type": "null", "description": f"Not supported: {self.reason}."}

    def validate(self, value: Any) -> None:
        if value is not None:
            raise problem(f" is not supported: {self.reason}", NOT_TAKEN)


class Only:
    """Marks a field accepted only with a value that asks for nothing (one of `values`, or null); any other value is
    refused with `refusal` (read after the field's name)."""

    def __init__(self, *values: Any, refusal: str) -> None:
        self.values = (None, *values)
        self.refusal = refusal

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(self.validate)

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> dict:
        return {"enum": list(self.values)}

    def validate(self, value: Any) -> Any:
        if value not in self.values:  # by equality: `0` asks for what `false` does
            raise problem(self.refusal)
        return value


def to_float(value: Any, where: str = "") -> float:
    """A JSON number (not a boolean) as a float; `where` is read before the problem (`"[5]"`: `"[5] must be ..."`)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise problem(f"{where} must be a number")
    try:
        return float(value)
    except OverflowError:  # an integer beyond a float's range
        raise problem(f"{where} is out of range") from None


def _number(value: Any) -> float:
    if not isinstance(value, int | float):
        raise problem(f" has the wrong type ({type(value).__name__})")
    return to_float(value)


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise problem(" must be an integer")
    return value


# A top-level number (an integer or a float; a boolean "must be a number", a string "has the wrong type").
Number = Annotated[float, PlainValidator(_number, json_schema_input_type=float)]
# An integer inside a part (anything else "must be an integer").
Integer = Annotated[int, PlainValidator(_integer, json_schema_input_type=int)]
