"""Why an answer ended, as the LLM service reports it and the gateway passes it on."""

from __future__ import annotations

import enum

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper


class FinishReason(enum.Enum):
    """The same three reasons, by the same names, as both protos' `FinishReason` enums (`FINISH_REASON_<NAME>`)."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"

    def to_pb(self, enum_type: EnumTypeWrapper) -> int:
        """The value of `enum_type` (`llm_pb2.FinishReason` or `gateway_pb2.FinishReason`) of the same name."""
        return enum_type.Value(f"FINISH_REASON_{self.name}")

    @classmethod
    def from_pb(cls, value: int, enum_type: EnumTypeWrapper) -> FinishReason:
        """The reason `value` of `enum_type` names; an unset or unknown value is STOP (the model ended its turn)."""
        try:
            return cls[enum_type.Name(value).removeprefix("FINISH_REASON_")]
        except (ValueError, KeyError):
            return cls.STOP
