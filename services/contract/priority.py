"""A request's priority under saturation (the Gateway API Inference Extension's criticality), and its one wire and
header mapping.

Three levels, most important first: `critical` (admitted first, never shed by priority), `standard` (the default:
waits for a slot, up to its deadline or the gateway's --queue-wait-s) and `sheddable` (refused at once while the
gateway is saturated, with a Retry-After). The numbers are `internvl.common.v1.Priority`'s; a lower number is more
important, which is also vLLM's convention, so the LLM engines sort by the value itself. Transport-free: the header
is a string, the wire value an int (0, unspecified, is `None`: the tenant's or the gateway's default decides).
"""

from __future__ import annotations

import enum

from services.contract.errors import InvalidArgumentError

HEADER = "X-Request-Priority"


class Priority(enum.IntEnum):
    """Mirrors `internvl.common.v1.Priority` (same numbers); lower is more important."""

    CRITICAL = 1
    STANDARD = 2
    SHEDDABLE = 3

    @property
    def label(self) -> str:
        """Its name as the header, the flag and the metrics spell it: `critical`, `standard`, `sheddable`."""
        return self.name.lower()

    @classmethod
    def parse(cls, text: str, where: str = HEADER) -> Priority:
        """The priority a header or flag value names (case and surrounding spaces ignored); InvalidArgumentError
        naming `where` and the allowed values otherwise."""
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise InvalidArgumentError(f"{where}: {text!r} is not a priority; use one of "
                                       f"{', '.join(p.label for p in cls)}") from None

    @classmethod
    def from_pb(cls, value: int) -> Priority | None:
        """The priority of a wire value; None for PRIORITY_UNSPECIFIED (0), InvalidArgumentError for an unknown one."""
        if value == 0:
            return None
        try:
            return cls(value)
        except ValueError:
            raise InvalidArgumentError(f"priority {value} is not a priority; use one of "
                                       + ", ".join(f"{p.value} ({p.label})" for p in cls)) from None

    def to_pb(self) -> int:
        return int(self)



# Every priority's name, most important first: what flags, headers and the tenants' key file accept.
LABELS = tuple(p.label for p in Priority)

def effective_priority(explicit: Priority | None, tenant_default: Priority | None, default: Priority) -> Priority:
    """The one place a request's priority is decided: the request's own (gRPC field or HTTP header), else its
    tenant's default, else the gateway's --default-priority."""
    if explicit is not None:
        return explicit
    if tenant_default is not None:
        return tenant_default
    return default
