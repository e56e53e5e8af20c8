"""The command-line parsers the flag tests read: a service's own, and its options by their first spelling."""

from __future__ import annotations

import argparse
import importlib

from tools import cli


def service_parser(command: str) -> argparse.ArgumentParser:
    """The parser `internvl-serve COMMAND` gets: the subcommand module's own `add_arguments`."""
    parser = argparse.ArgumentParser(prog=f"internvl-serve {command}")
    importlib.import_module(cli.SUBCOMMANDS[command][0]).add_arguments(parser)
    return parser


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every option of `parser` but --help, by its first spelling."""
    return {a.option_strings[0]: a for a in parser._actions if a.option_strings and a.dest != "help"}
