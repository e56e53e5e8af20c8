"""Reading a request body as JSON text: within the size limit, parsed, no deeper than `MAX_DEPTH`, and every string
Unicode text, or refused with a 400 (413 for the size) naming what is wrong.

JSON can spell what no Unicode text holds: a lone UTF-16 surrogate escape (`"\\ud800"`, which RFC 8259 leaves to the
receiver and I-JSON, RFC 7493, forbids). Python's parser returns it as a str that cannot be encoded, and the rest of
the gateway (routing keys, protobuf messages to the services, which carry only valid UTF-8) rightly assumes text can
be; so it is refused here, where text enters. Nesting is bounded for the same reason: the models, the constraint's
schema and the services walk the body recursively, and a deep enough one would end any of them in a RecursionError.
"""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from services.contract.errors import InvalidArgumentError, RequestTooLargeError

# Arrays and objects inside each other, at most (the body itself is level 1). OpenAI's strict structured outputs allow
# 10 levels of schema nesting; a schema sits 4 levels down in a body.
MAX_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")


async def read_json(http: web.Request, limit: int) -> Any:
    """The body parsed, or `InvalidArgumentError` / `RequestTooLargeError` (over `limit` bytes)."""
    try:
        body = await http.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidArgumentError("the body is not valid JSON") from None
    except RecursionError:  # deeper than the parser itself can go, far beyond MAX_DEPTH
        raise _too_deep() from None
    except web.HTTPRequestEntityTooLarge:
        raise RequestTooLargeError(f"the request body is larger than the limit of {limit} bytes; send smaller media "
                                   "(the gateway's --max-media-bytes sets it)") from None
    check_text(body)
    return body


def check_text(body: Any) -> None:
    """Refuses a body nested deeper than `MAX_DEPTH` or holding a string (value or key) with a lone surrogate,
    naming where. Iterative, so that it cannot itself run out of stack."""
    pending: list[tuple[Any, tuple[int | str, ...]]] = [(body, ())]
    while pending:
        value, loc = pending.pop()
        if isinstance(value, str):
            if not value.isascii() and _SURROGATE.search(value):
                raise _lone_surrogate(value, loc)
            continue
        if isinstance(value, dict):
            items = list(value.items())
            for key, _ in items:
                if not key.isascii() and _SURROGATE.search(key):
                    raise _lone_surrogate(key, loc, key=True)
        elif isinstance(value, list):
            items = list(enumerate(value))
        else:
            continue
        if len(loc) >= MAX_DEPTH:
            raise _too_deep()
        pending.extend((item, (*loc, key)) for key, item in items)


def _where(loc: tuple[int | str, ...]) -> str:
    """`messages[0].content`, as the API names a place (the body itself: "the body")."""
    text = ""
    for key in loc:
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else str(key))
    return text or "the body"


def _lone_surrogate(text: str, loc: tuple[int | str, ...], key: bool = False) -> InvalidArgumentError:
    code = ord(_SURROGATE.search(text).group())
    what = f"a key in {_where(loc)}" if key else _where(loc)
    return InvalidArgumentError(f"{what} holds a lone UTF-16 surrogate (\\u{code:04x}), which is not a character: "
                                "send Unicode text (a character beyond U+FFFF escaped as a surrogate pair)")


def _too_deep() -> InvalidArgumentError:
    return InvalidArgumentError(f"the body is nested deeper than {MAX_DEPTH} levels of arrays and objects")
