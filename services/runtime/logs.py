"""Log formats and a request-scoped log context, shared by every process of the stack (the gateway's too).

`configure_logging` installs one stderr handler on the root logger, in one of two formats:

* `text` (the default): `%(asctime)s %(levelname)s %(name)s: %(message)s`, then ` [request_id=ID]` while a request
  id is set, ` [tenant=NAME]` while a tenant is (the gateway's callers) and ` [trace_id=HEX]` while a valid OpenTelemetry span is current, so a request's lines can be grepped;
* `json`: one JSON object per line: `time` (UTC, ISO 8601 with milliseconds and `Z`), `level`, `service`, `logger`,
  `message`, then `request_id`, `tenant`, `trace_id` and `span_id` when known, `exception` (the traceback text) and any
  `extra=` fields of the call.

The handler's `ContextFilter` reads the request id from `REQUEST_ID` (set with `request_scope`), the tenant from
`TENANT` (set by the gateway, `gateway.tenants`) and the trace and
span ids from OpenTelemetry's current span. Only the OpenTelemetry API is imported: without an SDK tracer provider
the current span is the invalid no-op span and no ids are added.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import logging
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")

# The id of the request being served: every record logged while it is set carries it.
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("internvl_request_id", default="")
# The name of the tenant whose request is being served (the gateway's): every record logged while it is set carries it.
TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("internvl_tenant", default="")

# Attributes Formatter.format and ContextFilter add to a record (besides those every record has: `_record_attributes`).
_ADDED_ATTRIBUTES = frozenset({"message", "asctime", "taskName", "request_id", "tenant", "trace_id", "span_id"})
# Set on the handler `configure_logging` installs, so that a later call replaces it and no other handler.
_OWNED = "_internvl_logs"


@contextlib.contextmanager
def request_scope(request_id: str) -> Iterator[None]:
    """Within the block, records carry `request_id`; the previous value is back after it.

    A context variable follows the code's context: it survives `await`, and each asyncio task has its own copy, so
    concurrent requests in one event loop do not see each other's ids. A generator (sync or async), though, runs in
    the context of whoever resumes it: with a `yield` inside the block the id stays set in the consumer's context
    while the generator is suspended. That is right when the consumer serves only this request (a gRPC aio
    streaming handler is driven by its RPC's own task); to a consumer that serves several requests, yield outside
    the block. A generator closed from another context (garbage collection, the event loop's finalizer) cannot
    reset the value there; the reset is then skipped instead of raising.
    """
    token = REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):  # the token was created in a different context (see above)
            REQUEST_ID.reset(token)


class ContextFilter(logging.Filter):
    """Adds `request_id` (from REQUEST_ID, "" when unset), `tenant` (from TENANT, likewise) and `trace_id`/`span_id` (lower-case hex, "" without a
    valid current span) to every record the handler emits; never drops a record.

    A handler filter rather than a record factory: it runs for records propagated from every logger, in the thread
    and context of the logging call (the handler is synchronous), and leaves the process-wide factory alone. Values
    a call passed itself with `extra=` are kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = REQUEST_ID.get()
        if not getattr(record, "tenant", ""):
            record.tenant = TENANT.get()
        if not getattr(record, "trace_id", ""):
            context = trace.get_current_span().get_span_context()
            valid = context.is_valid
            record.trace_id = trace.format_trace_id(context.trace_id) if valid else ""
            record.span_id = trace.format_span_id(context.span_id) if valid else ""
        return True


def _message(record: logging.LogRecord) -> str:
    """`record.getMessage()`, or its parts' repr when the arguments do not fit the format string."""
    try:
        return record.getMessage()
    except Exception:  # noqa: BLE001 - a bad format or a failing __str__ of an argument: log it anyway
        return f"{_repr(record.msg)} % {_repr(record.args)}"


def _repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception:  # noqa: BLE001 - any object may be logged
        return f"<{type(value).__name__} with a failing repr>"


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, with ` [request_id=ID]`, ` [tenant=NAME]` and ` [trace_id=HEX]` after the message (before any
    traceback)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        if request_id := getattr(record, "request_id", ""):
            line += f" [request_id={request_id}]"
        if tenant := getattr(record, "tenant", ""):
            line += f" [tenant={tenant}]"
        if trace_id := getattr(record, "trace_id", ""):
            line += f" [trace_id={trace_id}]"
        return line

    def format(self, record: logging.LogRecord) -> str:
        try:
            return super().format(record)
        except Exception:  # noqa: BLE001 - logging must not fail the code that logs
            # A message whose arguments do not fit its format: logged as their repr rather than lost (on a copy,
            # since other handlers get the same record).
            copy = logging.makeLogRecord(record.__dict__)
            copy.msg, copy.args = _message(record), None
            return super().format(copy)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (tracebacks are a string field). Never raises: a value that cannot
    be serialised is written as its repr."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        try:
            # ASCII-only (the default): a line any stderr encoding can write, which every JSON reader decodes.
            return json.dumps(self._entry(record))
        except Exception:  # noqa: BLE001 - logging must not fail the code that logs
            # Something unforeseen failed (a traceback that cannot be formatted, say): the essentials, as reprs.
            return json.dumps({"level": _repr(record.levelname), "service": self.service, "logger": _repr(record.name),
                               "message": _repr(record.msg), "args": _repr(record.args)})

    def _entry(self, record: logging.LogRecord) -> dict[str, Any]:
        created = datetime.fromtimestamp(record.created, tz=UTC)
        entry: dict[str, Any] = {
            "time": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": _message(record),
        }
        for key in ("request_id", "tenant", "trace_id", "span_id"):
            if value := getattr(record, key, ""):
                entry[key] = value
        if record.exc_info:
            # Formatter.format caches the text on the record for other handlers; do the same.
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        common = _record_attributes(logging.getLogRecordFactory())
        for key, value in record.__dict__.items():
            # The fields above win over an `extra=` field of the same name.
            if key not in common and key not in entry:
                entry[key] = _jsonable(value)
        return entry


@functools.cache
def _record_attributes(factory: Callable[..., logging.LogRecord]) -> frozenset[str]:
    """The attributes every record has, as `factory` (logging's record factory) makes them, and those the formatter
    and the filter add: what is left on a record came from `extra=`. A library may install a factory that adds its own
    attribute to every record (vLLM adds `vllm_process_name` in any process that imports it); that is not an extra."""
    return frozenset(factory("", 0, "", 0, "", (), None).__dict__) | _ADDED_ATTRIBUTES


def _jsonable(value: Any) -> Any:
    """`value` when json can write it, else its repr."""
    try:
        json.dumps(value)
    except Exception:  # noqa: BLE001 - TypeError, ValueError (a cycle), RecursionError
        return _repr(value)
    return value


class _StderrHandler(logging.StreamHandler):
    """Writes to `sys.stderr` as it is at each record, not as it was at setup, so a later redirection of stderr
    (a test's capture, `contextlib.redirect_stderr`) is followed instead of writing to a stream closed since."""

    def __init__(self) -> None:
        # Handler's, not StreamHandler's, __init__: the latter assigns `stream`, which is a read-only property here
        # (as in logging's own last-resort handler).
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stderr


def configure_logging(level: str, log_format: str, service: str) -> None:
    """Root logger at `level` (a name such as "INFO", any case) with one stderr handler in `log_format` ("text" or
    "json"; `service` names the process in JSON lines). A handler an earlier call installed is replaced; handlers
    others added stay. ValueError for an unknown level or format."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r}; expected one of {', '.join(LOG_FORMATS)}")
    root = logging.getLogger()
    root.setLevel(level.upper())  # ValueError for an unknown level name, as logging.basicConfig raised
    for handler in [h for h in root.handlers if getattr(h, _OWNED, False)]:
        root.removeHandler(handler)
        handler.close()
    handler = _StderrHandler()
    setattr(handler, _OWNED, True)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter(service) if log_format == "json" else TextFormatter())
    root.addHandler(handler)
