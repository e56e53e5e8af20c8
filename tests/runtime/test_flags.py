"""Flags generated from a config dataclass (services.runtime.flags), on configs written here for the purpose."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import pytest

from services.runtime import flags
from services.runtime.flags import flag, flag_group


@dataclass(frozen=True)
class Paths:
    cert: str | None = flag(None, "a PEM file (env TEST_CERT)", env="TEST_CERT")
    key: str | None = flag(None, "its key")

    def load(self) -> tuple[str, str] | None:
        return (self.cert, self.key) if self.cert else None


@dataclass(frozen=True)
class Transport:
    port: int = flag(help=lambda default: "port" + ("" if default is None else f" (default {default})"))
    drain_s: float = flag(30.0, "drain for this long (default %(default)s)")


@dataclass(frozen=True)
class Config:
    model: str = flag(help="the model")
    transport: Transport = flag_group(Transport, default_factory=lambda: Transport(port=0), defaults={"port": 7})
    tls: tuple[str, str] | None = flag_group(Paths, title="TLS", build=Paths.load, default=None)
    batch: int = flag(32, "batch size (default %(default)s)")
    dtype: str | None = flag(None, "dtype", choices=("float32", "bfloat16"))
    fast: bool = flag(False, "go fast")
    ttl_s: int | None = flag(60, "expiry, 0: none", convert=lambda seconds, environ: seconds or None)
    names: tuple[str, ...] = flag((), "a name; repeatable", option="--name", action="append", metavar="NAME",
                                  convert=lambda names, environ: tuple(names))
    secret: str | None = flag(None, "a secret's file, else $SECRET",
                              convert=lambda path, environ: f"read {path}" if path else environ.get("SECRET"))
    # Not a flag: no help.
    internal: int = 5


def parser_of(config: type) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="test")
    flags.add_flags(parser, config)
    return parser


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.option_strings[0]: a for a in parser._actions if a.option_strings and a.dest != "help"}


def test_each_field_with_help_is_a_flag_named_and_typed_like_it():
    parser = parser_of(Config)
    found = options(parser)
    assert list(found) == ["--model", "--port", "--drain-s", "--cert", "--key", "--batch", "--dtype", "--fast",
                           "--ttl-s", "--name", "--secret"]
    assert found["--model"].required and not found["--batch"].required
    assert (found["--batch"].type, found["--batch"].default) == (int, 32)
    assert (found["--drain-s"].type, found["--ttl-s"].type) == (float, int)
    assert found["--dtype"].choices == ("float32", "bfloat16")
    assert isinstance(found["--fast"], argparse._StoreTrueAction)
    assert isinstance(found["--name"], argparse._AppendAction) and found["--name"].metavar == "NAME"
    # The group's default for this use of it, and the help that depends on it.
    assert (found["--port"].default, found["--port"].help) == (7, "port (default 7)")
    assert [g.title for g in parser._action_groups if g._group_actions][-1] == "TLS"
    help_text = parser.format_help()
    assert "batch size (default 32)" in help_text and "drain for this long (default 30.0)" in help_text


def test_from_args_fills_the_fields_groups_included():
    args = parser_of(Config).parse_args(["--model", "m", "--port", "9", "--cert", "c.pem", "--key", "k.pem",
                                         "--batch", "4", "--dtype", "bfloat16", "--fast", "--ttl-s", "0",
                                         "--name", "a", "--name", "b", "--secret", "s.txt"])
    config = flags.from_args(Config, args, {})
    assert config == Config(model="m", transport=Transport(port=9, drain_s=30.0), tls=("c.pem", "k.pem"), batch=4,
                            dtype="bfloat16", fast=True, ttl_s=None, names=("a", "b"), secret="read s.txt")
    defaults = flags.from_args(Config, parser_of(Config).parse_args(["--model", "m"]), {})
    assert defaults == Config(model="m", transport=Transport(port=7), tls=None, ttl_s=60, secret=None)


def test_env_stands_in_for_an_absent_flag_only():
    parser = parser_of(Config)
    from_env = flags.from_args(Config, parser.parse_args(["--model", "m", "--key", "k"]),
                               {"TEST_CERT": "env.pem", "SECRET": "s3"})
    assert (from_env.tls, from_env.secret) == (("env.pem", "k"), "s3")
    flag_wins = flags.from_args(Config, parser.parse_args(["--model", "m", "--cert", "flag.pem", "--key", "k"]),
                                {"TEST_CERT": "env.pem"})
    assert flag_wins.tls == ("flag.pem", "k")


def test_a_new_field_is_a_new_flag():
    """The one edit a new flag takes: a field with its help."""

    @dataclass(frozen=True)
    class Extended(Config):
        max_images: int = flag(8, "most images per prompt (default %(default)s)")

    parser = parser_of(Extended)
    assert set(options(parser)) - set(options(parser_of(Config))) == {"--max-images"}
    assert "most images per prompt (default 8)" in parser.format_help()
    assert flags.from_args(Extended, parser.parse_args(["--model", "m", "--max-images", "3"]), {}).max_images == 3


def test_argv_writes_a_value_back_as_the_flag():
    specs = {spec.option: spec for spec in flags.flag_specs(Config)}
    assert specs["--batch"].argv(32) == []  # the default: nothing to pass
    assert specs["--batch"].argv(4) == ["--batch", "4"]
    assert specs["--fast"].argv(True) == ["--fast"] and specs["--fast"].argv(False) == []
    assert specs["--name"].argv(["a", "b"]) == ["--name", "a", "--name", "b"]
    args = parser_of(Config).parse_args(["--model", "m", *specs["--drain-s"].argv(0.5), *specs["--name"].argv(["x"])])
    assert (args.drain_s, args.name) == (0.5, ["x"])


def test_metadata_mistakes_are_refused():
    @dataclass(frozen=True)
    class Misspelt:
        batch: int = flag(1, "batch")
        other: int = dataclasses.field(default=1, metadata={"help": "x", "choises": (1, 2)})

    with pytest.raises(TypeError, match="Misspelt.other: unknown flag metadata choises"):
        flags.flag_specs(Misspelt)

    @dataclass(frozen=True)
    class BadDefault:
        transport: Transport = flag_group(Transport, default_factory=lambda: Transport(port=0), defaults={"prot": 1})

    with pytest.raises(TypeError, match="Transport has no field prot"):
        flags.flag_specs(BadDefault)
    with pytest.raises(TypeError, match="needs its help text"):
        flag(1)
