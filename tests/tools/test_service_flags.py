"""Each service's flags are its config's fields: exactly those, the same as before they were generated, all in
`internvl-serve SERVICE --help` with their fields' help texts."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
from helpers.cli_flags import options, service_parser

from gateway.config import GatewayConfig
from services.llm.config import LLMConfig
from services.vision.config import VisionConfig
from tools import cli

CONFIGS = {"vision": VisionConfig, "llm": LLMConfig, "gateway": GatewayConfig}

_SERVER = ["--port", "--host", "--metrics-port", "--max-message-bytes", "--drain-seconds", "--otlp-endpoint",
           "--port-file", "--tls-cert", "--tls-key", "--tls-client-ca"]
_LORA = ["--lora", "--max-loras", "--max-lora-rank"]
_REQUEST_LIMITS = ["--max-n", "--max-logit-bias", "--max-stop-strings", "--max-stop-string-chars",
                   "--max-constraint-chars", "--max-constraint-choices"]
# Every flag of each service by name, so a flag renamed or dropped fails here: the command lines as they were written
# by hand before the flags were generated from the configs, and --port-file, --engine, --tensor-parallel-size, the
# gateway's tenant flags, its admission flags (--max-in-flight ... --default-priority) and the request limits (issue
# 25), added since.
FLAGS_BEFORE = {
    "vision": [*_SERVER, *_LORA, "--model", "--redis-url", "--dtype", "--device", "--max-batch-tiles", "--max-wait-ms",
               "--cache-ttl-s", "--max-image-pixels", "--max-items", "--namespace", "--preprocess-threads",
               "--memory-cache-mb"],
    "llm": [*_SERVER, *_LORA, "--model", "--redis-url", "--dtype", "--device", "--max-batch-size", "--max-queue",
            "--kv-cache-budget-mb", "--kv-budget-mb", "--max-step-tokens", "--max-new-tokens-default",
            "--max-context-tokens", "--engine", "--tensor-parallel-size", "--pipeline-parallel-size",
            "--max-prompt-tokens", "--grammar-compile-timeout-s", *_REQUEST_LIMITS],
    "gateway": [*_SERVER, "--http-port", "--vision-target", "--llm-target", "--llm-routing", "--routing-epsilon",
                "--resolve-interval-s", "--redis-url", "--session-ttl-s", "--media-root", "--max-media-bytes",
                "--allowed-media-domains", "--allow-private-media-addresses", "--media-connect-timeout-s",
                "--media-read-timeout-s", "--max-pixels", "--max-video-frames", "--max-request-tiles",
                "--encode-items-per-call", "--namespace", "--default-timeout-s", "--max-in-flight",
                "--critical-reserve", "--max-queued", "--queue-wait-s", "--default-priority", "--media-threads",
                "--api-token-file", "--upstream-tls-ca", "--upstream-tls-cert", "--upstream-tls-key",
                "--upstream-tls-server-name", "--api-keys-file", "--shared-prefix-cache", "--shared-embedding-cache",
                "--max-media-items", "--max-conversation-media-items", *_REQUEST_LIMITS,
                # Gray failures.
                "--vision-attempt-timeout-s", "--circuit-failure-threshold", "--circuit-cooldown-s"],
}



def declared(config: type) -> list[str]:
    """The flags `config`'s fields declare, read off their metadata here: a field with a help is `--its-name` (or
    its `option`), a flag group's fields are its own."""
    found = []
    for field in dataclasses.fields(config):
        if "group" in field.metadata:
            found += declared(field.metadata["group"])
        elif "help" in field.metadata:
            found.append(field.metadata.get("option") or "--" + field.name.replace("_", "-"))
    return found


@pytest.mark.parametrize("command", CONFIGS)
def test_the_parser_has_exactly_the_flags_the_config_declares(command):
    parsed = sorted(options(service_parser(command)))
    assert parsed == sorted(declared(CONFIGS[command]))
    assert parsed == sorted(FLAGS_BEFORE[command])


def test_required_flags_and_the_ports_each_service_defaults_to():
    found = {command: options(service_parser(command)) for command in CONFIGS}
    assert {command: sorted(o for o, a in actions.items() if a.required) for command, actions in found.items()} == {
        "vision": ["--model", "--port"], "llm": ["--model"], "gateway": ["--llm-target", "--vision-target"]}
    assert (found["llm"]["--port"].default, found["gateway"]["--port"].default) == (50053, 50051)


@pytest.mark.parametrize("command", CONFIGS)
def test_help_lists_every_flag_with_its_help_text(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # no wrapping: each help text on one line
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    formatter = argparse.HelpFormatter(prog=command)
    for option, action in options(service_parser(command)).items():
        assert f"  {option}" in out
        assert formatter._expand_help(action) in out, option


def test_the_environment_stands_in_for_an_absent_redis_url():
    parser = service_parser("gateway")
    args = parser.parse_args(["--vision-target", "v:1", "--llm-target", "l:1"])
    assert GatewayConfig.from_args(args, {"INTERNVL_REDIS_URL": "redis://r:1/0"}).redis_url == "redis://r:1/0"
    assert GatewayConfig.from_args(args, {}).redis_url is None
    flag_wins = parser.parse_args(["--vision-target", "v:1", "--llm-target", "l:1", "--redis-url", "redis://f:1/0"])
    assert GatewayConfig.from_args(flag_wins, {"INTERNVL_REDIS_URL": "redis://r:1/0"}).redis_url == "redis://f:1/0"
