"""services.runtime.logs: the text and JSON formats, the request-scoped id, the OpenTelemetry ids, and the CLI's
--log-format, which `up` hands down to its children."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.runtime.logs import (
    REQUEST_ID,
    TEXT_FORMAT,
    ContextFilter,
    JsonFormatter,
    TextFormatter,
    configure_logging,
    request_scope,
)
from tools import cli

REPO = Path(__file__).resolve().parents[2]
ISO_UTC_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


class Capture:
    """A private logger whose records go, through the module's filter, to a formatter writing into a string."""

    def __init__(self, formatter: logging.Formatter):
        self.stream = io.StringIO()
        handler = logging.StreamHandler(self.stream)
        handler.addFilter(ContextFilter())
        handler.setFormatter(formatter)
        # Not registered with logging's manager: no parent (so not the root's handlers) and none of the handlers
        # pytest attaches to registered loggers, which would fail a test on the deliberately bad message below.
        self.logger = logging.Logger(f"test_logs.{uuid.uuid4().hex[:8]}", logging.DEBUG)  # noqa: LOG001
        self.logger.addHandler(handler)

    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.lines()]


@pytest.fixture
def as_json() -> Capture:
    return Capture(JsonFormatter("probe"))


@pytest.fixture
def as_text() -> Capture:
    return Capture(TextFormatter())


@pytest.fixture
def root_logging():
    """The root logger's handlers and level put back after a test that configures it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)


# ---------------------------------------------------------------------------------------------------------- json


def test_json_lines_have_the_fields(as_json):
    as_json.logger.info("loaded %s in %.1fs", "ckpt", 1.25)
    [entry] = as_json.records()
    assert list(entry) == ["time", "level", "service", "logger", "message"]
    assert ISO_UTC_MS.match(entry["time"]), entry["time"]
    assert entry["level"] == "INFO" and entry["service"] == "probe" and entry["logger"] == as_json.logger.name
    assert entry["message"] == "loaded ckpt in 1.2s"


def test_what_a_record_factory_adds_to_every_record_is_not_an_extra(as_json):
    """vLLM, imported, installs a record factory adding `vllm_process_name` to every record of the process."""
    original = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = original(*args, **kwargs)
        record.library_process = "Library::Main"
        return record

    logging.setLogRecordFactory(factory)
    try:
        as_json.logger.info("plain")
        as_json.logger.info("with", extra={"model": "tiny"})
    finally:
        logging.setLogRecordFactory(original)
    plain, extra = as_json.records()
    assert list(plain) == ["time", "level", "service", "logger", "message"]
    assert list(extra) == ["time", "level", "service", "logger", "message", "model"]


def test_request_id_only_inside_the_scope(as_json):
    as_json.logger.info("before")
    with request_scope("req-1"):
        as_json.logger.info("inside")
        with request_scope("req-2"):
            as_json.logger.info("nested")
        as_json.logger.info("inside again")
    as_json.logger.info("after")
    assert [e.get("request_id") for e in as_json.records()] == [None, "req-1", "req-2", "req-1", None]
    assert REQUEST_ID.get() == ""


@pytest.mark.asyncio
async def test_request_id_survives_await_and_is_per_task(as_json):
    async def serve(request_id: str, started: asyncio.Event, other_started: asyncio.Event) -> None:
        with request_scope(request_id):
            as_json.logger.info("start %s", request_id)
            started.set()
            await other_started.wait()  # both scopes are open now, in two tasks of one loop
            await asyncio.sleep(0)
            as_json.logger.info("end %s", request_id)

    a, b = asyncio.Event(), asyncio.Event()
    await asyncio.gather(serve("req-a", a, b), serve("req-b", b, a))
    as_json.logger.info("no request")
    entries = as_json.records()
    assert len(entries) == 5
    for entry in entries[:4]:
        assert entry["message"].endswith(entry["request_id"]), entry
    assert "request_id" not in entries[4]


def test_trace_and_span_ids_of_the_current_span(as_json):
    # A local provider: the global one (and so other tests) is left alone.
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test_logs")
    with tracer.start_as_current_span("chat") as span:
        as_json.logger.info("in a span")
        context = span.get_span_context()
    as_json.logger.info("outside")
    inside, outside = as_json.records()
    assert inside["trace_id"] == f"{context.trace_id:032x}" and inside["span_id"] == f"{context.span_id:016x}"
    assert "trace_id" not in outside and "span_id" not in outside
    [finished] = exporter.get_finished_spans()
    assert finished.context.trace_id == context.trace_id
    provider.shutdown()


def test_exception_text_is_included(as_json):
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        as_json.logger.exception("step failed")
    [entry] = as_json.records()
    assert entry["level"] == "ERROR" and entry["message"] == "step failed"
    assert entry["exception"].startswith("Traceback (most recent call last):")
    assert "RuntimeError: boom" in entry["exception"]


def test_extra_fields_and_what_cannot_be_serialised(as_json):
    class Opaque:
        def __repr__(self) -> str:
            return "<opaque>"

    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    as_json.logger.info("with extras", extra={"tokens": 12, "shape": [2, 3], "handle": Opaque(), "bad": Broken(),
                                              "service": "not this"})
    [entry] = as_json.records()
    assert entry["tokens"] == 12 and entry["shape"] == [2, 3] and entry["handle"] == "<opaque>"
    assert "Broken" in entry["bad"]
    assert entry["service"] == "probe"  # the formatter's fields win over an extra of the same name
    # Standard LogRecord attributes are not extras.
    assert not {"args", "msg", "levelno", "pathname", "lineno", "thread", "exc_info"} & set(entry)


def test_a_message_that_does_not_fit_its_arguments_is_still_a_line(as_json, as_text):
    for capture in (as_json, as_text):
        capture.logger.info("%d items", "not a number")
    [entry] = as_json.records()
    assert "%d items" in entry["message"] and "not a number" in entry["message"]
    [line] = as_text.lines()
    assert "%d items" in line and "not a number" in line


# ---------------------------------------------------------------------------------------------------------- text


def record(message: str, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("services.llm.engine", logging.WARNING, __file__, 1, message, (), exc_info)


def test_text_is_todays_format_without_a_request_id():
    rec = record("plain")
    today = logging.Formatter(TEXT_FORMAT).format(logging.makeLogRecord(rec.__dict__))
    ContextFilter().filter(rec)
    assert TextFormatter().format(rec) == today
    assert re.match(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3} WARNING services\.llm\.engine: plain$", today)


def test_text_carries_the_request_id_and_the_trace_id(as_text):
    with request_scope("req-7"):
        as_text.logger.warning("slow step")
    provider = TracerProvider()
    with provider.get_tracer("test_logs").start_as_current_span("s") as span, request_scope("req-8"):
        as_text.logger.warning("traced")
        trace_id = f"{span.get_span_context().trace_id:032x}"
    first, second = as_text.lines()
    assert first.endswith(f"WARNING {as_text.logger.name}: slow step [request_id=req-7]")
    assert second.endswith(f": traced [request_id=req-8] [trace_id={trace_id}]")
    provider.shutdown()


def test_text_puts_the_request_id_on_the_first_line_of_a_traceback():
    try:
        raise ValueError("bad")
    except ValueError:
        rec = record("failed", exc_info=sys.exc_info())
    with request_scope("req-9"):
        ContextFilter().filter(rec)
    lines = TextFormatter().format(rec).splitlines()
    assert lines[0].endswith("failed [request_id=req-9]") and lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: bad"


# --------------------------------------------------------------------------------------------- configure_logging


def test_configure_logging_replaces_its_own_handler_only(root_logging, capsys):
    other = logging.NullHandler()
    root_logging.addHandler(other)
    configure_logging("debug", "text", service="probe")
    configure_logging("info", "json", service="probe")
    ours = [h for h in root_logging.handlers if isinstance(h.formatter, (JsonFormatter, TextFormatter))]
    assert len(ours) == 1 and isinstance(ours[0].formatter, JsonFormatter) and other in root_logging.handlers
    assert root_logging.level == logging.INFO
    logging.getLogger("test_logs.root").info("to stderr")
    err = capsys.readouterr().err
    assert json.loads(err)["message"] == "to stderr"
    with pytest.raises(ValueError, match="yaml"):
        configure_logging("info", "yaml", service="probe")


# ------------------------------------------------------------------------------------------------------------ CLI

# A subcommand registered for the run only: it logs a line of each kind and exits, so the real `main` can be run
# without loading a model.
PROBE = textwrap.dedent("""
    import logging
    from services.runtime.logs import request_scope

    log = logging.getLogger("probe")

    def add_arguments(parser):
        pass

    def run(args):
        log.info("hello from %s", args.command)
        with request_scope("req-cli"):
            log.warning("in a request", extra={"tokens": 3})
        try:
            1 / 0
        except ZeroDivisionError:
            log.exception("failed")
        return 0
""")
RUN_PROBE = ("import sys; from tools import cli; cli.SUBCOMMANDS['logprobe'] = ('logprobe', 'test'); "
             "sys.exit(cli.main(sys.argv[1:]))")


def run_cli(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    (tmp_path / "logprobe.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), str(REPO),
                                                                     os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", RUN_PROBE, *argv], check=False, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli_json_every_stderr_line_is_an_object(tmp_path):
    done = run_cli(tmp_path, "--log-format", "json", "logprobe")
    assert done.returncode == 0, done.stderr
    entries = [json.loads(line) for line in done.stderr.splitlines()]
    assert [e["message"] for e in entries] == ["hello from logprobe", "in a request", "failed"]
    assert {e["service"] for e in entries} == {"logprobe"}
    assert [e.get("request_id") for e in entries] == [None, "req-cli", None] and entries[1]["tokens"] == 3
    assert "ZeroDivisionError" in entries[2]["exception"]


def test_cli_text_is_the_default(tmp_path):
    done = run_cli(tmp_path, "--log-level", "warning", "logprobe")
    assert done.returncode == 0, done.stderr
    first = done.stderr.splitlines()[0]
    assert re.match(r"^\S+ \S+ WARNING probe: in a request \[request_id=req-cli\]$", first), done.stderr


def test_cli_unknown_log_format_is_a_usage_error(tmp_path):
    done = run_cli(tmp_path, "--log-format", "yaml", "logprobe")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stderr.startswith("usage: internvl-serve")
    assert "argument --log-format: invalid choice: 'yaml'" in done.stderr


# ------------------------------------------------------------------------------------------------------------- up


def test_up_hands_its_log_and_tracing_flags_to_the_children(monkeypatch, root_logging, tmp_path):
    from tools import launcher, up

    # The Namespace `up.run` gets from the real CLI, global flags included.
    parsed = []
    monkeypatch.setattr(up, "run", lambda args: parsed.append(args) or 0)
    assert cli.main(["--log-level", "debug", "--log-format", "json", "up", "--model", "m",
                     "--log-dir", str(tmp_path), "--otlp-endpoint", "http://collector:4317"]) == 0
    started = []
    monkeypatch.setattr(launcher, "spawn", lambda name, argv, *a, **kw: started.append(argv) or object())
    stack = up.Stack(parsed[0])
    for command in ("vision", "llm", "gateway"):
        stack.service(command, command, "--model", "m")
    for argv, command in zip(started, ("vision", "llm", "gateway"), strict=True):
        assert argv[:8] == [sys.executable, "-m", "tools.cli", "--log-level", "debug", "--log-format", "json",
                            command], argv
        assert argv[-2:] == ["--otlp-endpoint", "http://collector:4317"], argv  # every process traces


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_up_children_log_json(tiny_checkpoint, tmp_path):
    from stack import up_stack

    from tools.launcher import processes

    logs = tmp_path / "logs"
    with up_stack(tiny_checkpoint(), logs, http=False, cli_flags=["--log-format", "json"]) as up:
        argvs = {role: p.argv for p in processes() if p.ppid == up.process.pid
                 for role in ("vision", "llm", "gateway") if role in p.argv}
        assert set(argvs) == {"vision", "llm", "gateway"}, argvs
        for role, argv in argvs.items():
            assert argv[3:8] == ["--log-level", "INFO", "--log-format", "json", role], argv
    for role, name in (("vision", "vision-0"), ("llm", "llm"), ("gateway", "gateway")):
        lines = [line for line in (logs / f"{name}.log").read_text().splitlines() if line.startswith("{")]
        assert lines and {json.loads(line)["service"] for line in lines} == {role}, name
