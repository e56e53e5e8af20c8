"""`up` takes the services' own flags (generated from their configs) and passes them on to the right children."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest
from helpers.cli_flags import options, service_parser

from gateway.config import GatewayConfig
from services.llm.config import LLMConfig
from services.runtime import flags
from services.runtime.flags import flag
from services.vision.config import VisionConfig
from tools import cli, up, up_flags

# What each service needs besides what `up` forwards (its ports and targets, which `up` sets when it starts them).
REQUIRED = {"vision": ["--port", "0"], "llm": [], "gateway": ["--vision-target", "v:1", "--llm-target", "l:1"]}
CONFIGS = {"vision": VisionConfig, "llm": LLMConfig, "gateway": GatewayConfig}
# Every flag `up` had before its service flags were generated: each keeps its name.
UP_FLAGS_BEFORE = ["--model", "--dtype", "--host", "--gateway-port", "--http-port", "--metrics-port", "--redis-url",
                   "--redis-cluster", "--redis-cluster-replicas", "--vision-replicas", "--llm-replicas",
                   "--llm-routing", "--media-root", "--allowed-media-domains", "--lora", "--max-loras",
                   "--max-lora-rank", "--log-dir", "--otlp-endpoint", "--startup-timeout", "--tls-cert", "--tls-key",
                   "--tls-ca", "--tls-client-ca", "--api-token-file"]



def up_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="internvl-serve up")
    up.add_arguments(parser)
    return parser


def child_config(args: argparse.Namespace, command: str, config: type | None = None):
    """The config the `command` child `up` would start builds from its command line (no environment)."""
    config = config or CONFIGS[command]
    parser = argparse.ArgumentParser()
    flags.add_flags(parser, config)
    return config.from_args(parser.parse_args([*REQUIRED[command], *up_flags.forwarded_argv(args, command)]), {})


def up_help(capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "10000")  # no wrapping: each help text on one line
    with pytest.raises(SystemExit) as exited:
        cli.main(["up", "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_up_help_shows_each_forwarded_flag_with_the_services_own_help(capsys, monkeypatch):
    out = up_help(capsys, monkeypatch)
    ours = options(up_parser())
    formatter = argparse.HelpFormatter(prog="up")
    skipped = up_flags.UP_OWNS | up_flags.NOT_LOCAL
    for command in CONFIGS:
        for option, action in options(service_parser(command)).items():
            if option in skipped:
                continue
            text = formatter._expand_help(action)
            assert text in formatter._expand_help(ours[option]), (command, option)
            assert text in out, (command, option)
            assert ours[option].default == action.default and ours[option].type == action.type, (command, option)
    for option in ("--allow-private-media-addresses", "--max-pixels", "--max-request-tiles"):
        assert f"  {option}" in out


def test_every_service_flag_is_forwarded_or_owned_by_up():
    every = {option for command in CONFIGS for option in options(service_parser(command))}
    forwarded = {f.spec.option for f in up_flags.forwarded_flags()}
    skipped = up_flags.UP_OWNS | up_flags.NOT_LOCAL
    assert forwarded | skipped == every  # nothing left out, and no stale name among the skipped ones
    assert not forwarded & skipped
    assert set(UP_FLAGS_BEFORE) <= set(options(up_parser()))


def test_flags_set_on_up_reach_the_childrens_configs(tmp_path):
    token = tmp_path / "token"
    token.write_text("t" * 20)
    args = up_parser().parse_args([
        "--model", "m", "--dtype", "bfloat16", "--device", "cpu", "--lora", "a=/x", "--max-loras", "3",
        "--drain-seconds", "1.5", "--namespace", "ns", "--max-batch-tiles", "8", "--cache-ttl-s", "0",
        "--max-batch-size", "4", "--max-context-tokens", "99", "--llm-routing", "round_robin",
        "--allow-private-media-addresses", "--max-pixels", "1000", "--max-request-tiles", "7",
        "--allowed-media-domains", "127.0.0.1,*.example.com", "--media-root", str(tmp_path),
        "--api-token-file", str(token)])
    vision, llm, gateway = (child_config(args, command) for command in ("vision", "llm", "gateway"))
    for service in (vision, llm):
        assert (service.model, service.dtype, service.device) == ("m", "bfloat16", "cpu")
        assert (service.adapters.loras, service.adapters.max_loras) == ((("a", "/x"),), 3)
    assert (vision.namespace, vision.max_batch_tiles, vision.cache_ttl_s) == ("ns", 8, None)
    assert (llm.max_batch_size, llm.max_context_tokens) == (4, 99)
    assert vision.server.drain_seconds == llm.server.drain_seconds == gateway.server.drain_seconds == 1.5
    assert (gateway.llm_routing, gateway.allow_private_media_addresses) == ("round_robin", True)
    assert (gateway.max_pixels, gateway.max_request_tiles, gateway.namespace) == (1000, 7, "ns")
    assert gateway.allowed_media_domains == ("127.0.0.1", "*.example.com")
    assert (gateway.media_root, gateway.api_token) == (str(tmp_path), "t" * 20)


def test_flags_left_at_their_defaults_are_not_passed():
    """So each child falls back on its own default and environment (INTERNVL_API_TOKEN, INTERNVL_TLS_*...)."""
    args = up_parser().parse_args(["--model", "m"])
    assert up_flags.forwarded_argv(args, "vision") == up_flags.forwarded_argv(args, "llm") == ["--model", "m"]
    assert up_flags.forwarded_argv(args, "gateway") == []


def test_a_new_service_field_is_an_up_flag_too(monkeypatch, capsys):
    @dataclass(frozen=True, kw_only=True)
    class Extended(GatewayConfig):
        max_prompt_chars: int = flag(100_000, "longest text a request may carry (default %(default)s)")

    monkeypatch.setitem(up_flags.SERVICE_CONFIGS, "gateway", Extended)
    assert "longest text a request may carry (default 100000)" in up_help(capsys, monkeypatch)
    args = up_parser().parse_args(["--model", "m", "--max-prompt-chars", "42"])
    assert up_flags.forwarded_argv(args, "gateway") == ["--max-prompt-chars", "42"]
    assert child_config(args, "gateway", Extended).max_prompt_chars == 42


def test_services_declaring_one_flag_differently_cannot_share_it(monkeypatch):
    @dataclass(frozen=True)
    class Clashing(LLMConfig):
        namespace: str = flag("other", "cache key prefix (default %(default)s)")

    monkeypatch.setitem(up_flags.SERVICE_CONFIGS, "llm", Clashing)
    with pytest.raises(TypeError, match="--namespace is declared differently by vision and llm"):
        up_flags.forwarded_flags()
