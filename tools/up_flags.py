"""The services' own flags that `internvl-serve up` takes and passes on, generated from the services' configs.

Every flag of the vision, LLM and gateway configs is one of `up`'s too, with the service's help text and default,
except those in `UP_OWNS` (what `up` sets itself) and `NOT_LOCAL` (what means nothing in its stack). A flag declared
by several services (`--model`, `--namespace`, the LoRA flags, `--drain-seconds`) is one flag of `up`, passed to
each of them; its help is theirs, each service's named when the texts differ. A flag set on `up` is passed on only
when it differs from the default, which is the service's own: the child then reads its environment fallbacks
(`INTERNVL_*`) exactly as it would alone.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.config import GatewayConfig
from services.llm.config import LLMConfig
from services.runtime import flags
from services.runtime.flags import FlagSpec
from services.vision.config import VisionConfig

# The services `up` starts, by subcommand, and the configs their flags come from.
SERVICE_CONFIGS: Mapping[str, type] = {"vision": VisionConfig, "llm": LLMConfig, "gateway": GatewayConfig}
# Set by `up` itself: each process's port, address and metrics port (and the file it reports them in), the Redis it
# started, the gateway's targets and HTTP port (`up`'s own --http-port), TLS (`up`'s own flags: one certificate for every server) and tracing (`up`'s
# --otlp-endpoint, given to every process).
UP_OWNS = frozenset({
    "--port", "--host", "--metrics-port", "--port-file", "--redis-url", "--vision-target", "--llm-target", "--http-port",
    "--otlp-endpoint", "--tls-cert", "--tls-key", "--tls-client-ca", "--upstream-tls-ca", "--upstream-tls-cert",
    "--upstream-tls-key", "--upstream-tls-server-name"})
# Meaningless in `up`'s stack: the in-process cache of a vision service without Redis (`up` always gives one), and
# DNS re-resolution of the gateway's targets (`up` gives fixed ipv4 lists).
NOT_LOCAL = frozenset({"--memory-cache-mb", "--resolve-interval-s"})
# Stand-ins for the required flags whose values `up` learns only once the processes run, so that the services'
# configs can check the other flags before anything starts.
_PLACEHOLDERS = {"vision": ["--port", "0"], "llm": [],
                 "gateway": ["--vision-target", "127.0.0.1:1", "--llm-target", "127.0.0.1:1"]}


@dataclass(frozen=True)
class Forwarded:
    """A service flag `up` takes (`spec`, as the first of `commands` declares it) and passes to each of `commands`."""

    spec: FlagSpec
    commands: tuple[str, ...]
    help: str


def forwarded_flags() -> list[Forwarded]:
    """Every flag `up` passes on, in the services' order (vision, llm, gateway) and each one's field order."""
    uses: dict[str, list[tuple[str, FlagSpec]]] = {}
    for command, config in SERVICE_CONFIGS.items():
        for spec in flags.flag_specs(config):
            if spec.option not in UP_OWNS | NOT_LOCAL:
                uses.setdefault(spec.option, []).append((command, spec))
    return [_merged(option, declared) for option, declared in uses.items()]


def _merged(option: str, declared: list[tuple[str, FlagSpec]]) -> Forwarded:
    """One flag of `up` for a flag several services declare: they must agree on everything but the help text."""
    first = declared[0][1]
    for command, spec in declared[1:]:
        if {**spec.kwargs, "help": ""} != {**first.kwargs, "help": ""}:
            raise TypeError(f"{option} is declared differently by {declared[0][0]} and {command}: `up` cannot pass "
                            "one value to both")
    helps = [spec.help for _, spec in declared]
    text = helps[0] if len(set(helps)) == 1 else "; ".join(f"{c}: {spec.help}" for c, spec in declared)
    return Forwarded(first, tuple(command for command, _ in declared), text)


def add_forwarded_flags(parser: argparse.ArgumentParser) -> None:
    """The forwarded flags, under one argparse group for each set of services they go to."""
    groups: dict[tuple[str, ...], argparse._ArgumentGroup] = {}
    for forwarded in forwarded_flags():
        if forwarded.commands not in groups:
            groups[forwarded.commands] = parser.add_argument_group(
                f"passed to {_joined(forwarded.commands)} (see `internvl-serve {forwarded.commands[0]} --help`)")
        forwarded.spec.add_to(groups[forwarded.commands], help=forwarded.help)


def forwarded_argv(args: argparse.Namespace, command: str) -> list[str]:
    """The flags of `command` set on `up` at other than their default, as `command`'s command line."""
    return [token for forwarded in forwarded_flags() if command in forwarded.commands
            for token in forwarded.spec.argv(getattr(args, forwarded.spec.dest))]


def check_forwarded(args: argparse.Namespace) -> None:
    """Builds each service's config from what `up` passes it, so a value a service would refuse stops `up` at once,
    with the service's own message (InvalidArgumentError), before anything starts."""
    for command, config in SERVICE_CONFIGS.items():
        parser = argparse.ArgumentParser(prog=f"internvl-serve {command}")
        flags.add_flags(parser, config)
        config.from_args(parser.parse_args([*_PLACEHOLDERS[command], *forwarded_argv(args, command)]))


def _joined(commands: tuple[str, ...]) -> str:
    return commands[0] if len(commands) == 1 else f"{', '.join(commands[:-1])} and {commands[-1]}"
