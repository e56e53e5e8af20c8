"""Command-line flags generated from a config dataclass: a field with a `help` is a flag, so a flag is one edit.

A flag's name is its field's (`max_batch_size` -> `--max-batch-size`), its type the field's (`int`, `float`, `str`,
`X | None` as `X`; `bool` is a switch), its default the field's (a field without one is a required flag). What the
type cannot say is in the field's metadata, written by `flag()` (or as a plain dict by modules below the runtime):

    help      the `--help` text; `%(default)s` is the default. A callable(default) -> text when it depends on it.
    option    the option string, when it is not the field's name (`--lora` for `loras`)
    choices, metavar, type, action   argparse's own (`type` when the annotation's is not the flag's)
    env       a variable whose value stands in for an absent or empty flag, read when the config is built
    convert   (flag value, environ) -> the field's value, when they differ (`0` -> None, a file -> its contents)

A field made by `flag_group()` holds a dataclass whose own fields are flags (the servers' shared options, TLS, LoRA),
added to the same parser: under an argparse group of its own when it has a `title`. Its `build` turns the group into
the field's value when that is not the group itself (PEM paths into loaded TLS credentials), and its `defaults` give
this use of the group other flag defaults (each service's own `--port`).

Validation stays in the configs' `__post_init__`; `from_args` only carries the flags' values into the fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, dataclass
from typing import Any

METADATA_KEYS = frozenset({"help", "option", "choices", "metavar", "type", "action", "env", "convert"})
GROUP_KEYS = frozenset({"group", "title", "build", "defaults"})
_SCALARS = (int, float, str)


def flag(default: Any = MISSING, help: str | Callable[[Any], str] = "", *, default_factory: Any = MISSING,
         option: str | None = None, choices: Any = None, metavar: str | None = None, type: Any = None,
         action: str | None = None, env: str | None = None, convert: Callable[[Any, Mapping[str, str]], Any] | None = None,
         repr: bool = True) -> Any:
    """A dataclass field that is also a flag (the module docstring lists what each argument means)."""
    if not help:
        raise TypeError("a flag needs its help text")
    given = {"help": help, "option": option, "choices": choices, "metavar": metavar, "type": type, "action": action,
             "env": env, "convert": convert}
    metadata = {key: value for key, value in given.items() if value is not None}
    return dataclasses.field(default=default, default_factory=default_factory, repr=repr, metadata=metadata)


def flag_group(group: type, *, title: str | None = None, build: Callable[[Any], Any] | None = None,
               defaults: Mapping[str, Any] | None = None, default: Any = MISSING,
               default_factory: Any = MISSING) -> Any:
    """A dataclass field whose value comes from the flags of dataclass `group` (see the module docstring)."""
    metadata = {"group": group, "title": title, "build": build, "defaults": dict(defaults or {})}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


@dataclass(frozen=True)
class FlagSpec:
    """One flag as the parser gets it: `option`, argparse's keyword arguments, and the argparse group's title."""

    option: str
    kwargs: Mapping[str, Any]
    title: str | None

    @property
    def dest(self) -> str:
        return _dest(self.option)

    @property
    def default(self) -> Any:
        return self.kwargs.get("default")

    @property
    def help(self) -> str:
        return self.kwargs["help"]

    def add_to(self, container: argparse._ActionsContainer, **changes: Any) -> argparse.Action:
        return container.add_argument(self.option, **{**self.kwargs, **changes})

    def argv(self, value: Any) -> list[str]:
        """`value` as this flag on a command line (nothing for the default), e.g. for a child process."""
        if value == self.default:
            return []
        if self.kwargs.get("action") == "store_true":
            return [self.option]
        if self.kwargs.get("action") == "append":
            return [token for item in value for token in (self.option, str(item))]
        return [self.option, str(value)]


def flag_specs(config: type) -> list[FlagSpec]:
    """Every flag of dataclass `config`, its groups' included, in field order."""
    return list(_specs(config, {}, None))


def add_flags(parser: argparse.ArgumentParser, config: type) -> None:
    """Adds the flags of `config` to `parser` (a group's under an argparse group when it has a title)."""
    containers: dict[str | None, argparse._ActionsContainer] = {None: parser}
    for spec in flag_specs(config):
        if spec.title not in containers:
            containers[spec.title] = parser.add_argument_group(spec.title)
        spec.add_to(containers[spec.title])


def from_args(config: type, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Any:
    """`config` built from the parsed flags; the `env` variables are read from `environ` (default: os.environ)."""
    environ = os.environ if environ is None else environ
    values = {}
    for field in dataclasses.fields(config):
        meta = field.metadata
        if "group" in meta:
            group = from_args(meta["group"], args, environ)
            values[field.name] = group if meta["build"] is None else meta["build"](group)
        elif "help" in meta:
            value = getattr(args, _dest(_option(field)))
            if "env" in meta:
                value = value or environ.get(meta["env"]) or None
            values[field.name] = meta["convert"](value, environ) if "convert" in meta else value
    return config(**values)


def _option(field: dataclasses.Field) -> str:
    return field.metadata.get("option") or "--" + field.name.replace("_", "-")


def _dest(option: str) -> str:
    """argparse's attribute name for `option`."""
    return option.removeprefix("--").replace("-", "_")


def _specs(config: type, defaults: Mapping[str, Any], title: str | None) -> Iterator[FlagSpec]:
    hints = typing.get_type_hints(config)
    unknown = {name for name in defaults if name not in {f.name for f in dataclasses.fields(config)}}
    if unknown:
        raise TypeError(f"{config.__name__} has no field {', '.join(sorted(unknown))} to give a flag default to")
    for field in dataclasses.fields(config):
        meta = field.metadata
        if "group" in meta:
            _check_keys(config, field, GROUP_KEYS)
            yield from _specs(meta["group"], meta["defaults"], meta["title"] or title)
        elif "help" in meta:
            _check_keys(config, field, METADATA_KEYS)
            yield FlagSpec(_option(field), _argparse_kwargs(field, hints[field.name], defaults), title)


def _check_keys(config: type, field: dataclasses.Field, allowed: frozenset[str]) -> None:
    unknown = set(field.metadata) - allowed
    if unknown:
        raise TypeError(f"{config.__name__}.{field.name}: unknown flag metadata {', '.join(sorted(unknown))}")


def _argparse_kwargs(field: dataclasses.Field, annotation: Any, defaults: Mapping[str, Any]) -> dict[str, Any]:
    meta = field.metadata
    if field.name in defaults:
        default, required = defaults[field.name], False
    elif field.default is not MISSING:
        default, required = field.default, False
    elif field.default_factory is not MISSING:
        default, required = field.default_factory(), False
    else:
        default, required = None, True
    kind = _scalar(annotation)
    kwargs: dict[str, Any] = {"default": default}
    if required:
        kwargs["required"] = True
    if meta.get("action"):
        kwargs["action"] = meta["action"]
    elif kind is bool:
        kwargs["action"] = "store_true"
    if kwargs.get("action") == "append":
        kwargs["default"] = list(default)  # argparse appends to (a copy of) the default
    if meta.get("type") is not None:
        kwargs["type"] = meta["type"]
    elif kind in (int, float):
        kwargs["type"] = kind
    for key in ("choices", "metavar"):
        if key in meta:
            kwargs[key] = meta[key]
    kwargs["help"] = meta["help"](default) if callable(meta["help"]) else meta["help"]
    return kwargs


def _scalar(annotation: Any) -> type | None:
    """`int`, `float`, `str` or `bool` for an annotation of one of them (or of one `| None`); None otherwise."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = members[0] if len(members) == 1 else None
    return annotation if annotation in (*_SCALARS, bool) else None
