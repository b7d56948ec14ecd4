"""Click options generated from a config dataclass, one per field, the same way for every command
(train, eval, profile): `batch_size` -> `--batch-size`, the type from the annotation, `--x/--no-x`
for booleans, a choice list from the field's `choices` metadata, a range from its `min`, the help
text from its `help` metadata. The dataclass stays the one place a setting is defined; the model
layer never imports click.

    @click.command()
    @config_options(EvalConfig)
    def eval_command(**values): cfg = EvalConfig(**values)
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable

import click


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def config_options(config_class: type, *, exclude: tuple[str, ...] = (), unset_defaults: bool = False,
                   default_note: Callable[[str, Any], str] | None = None) -> Callable[[Callable], Callable]:
    """A decorator adding one option per field of `config_class` (but `exclude`).

    unset_defaults: every option defaults to None, so the command can tell "given on the command
    line" from "left to a recipe or a config file" (train); otherwise the field's default is the
    option's default. default_note(field, default) -> the "[default: ...]" text of --help."""
    types = typing.get_type_hints(config_class)
    fields = [f for f in dataclasses.fields(config_class) if f.name not in exclude]

    def decorate(command: Callable) -> Callable:
        for field in reversed(fields):
            meta, want = field.metadata, types[field.name]
            want = _plain_type(want)
            default = None if unset_defaults else field.default
            note = default_note(field.name, field.default) if default_note else _note(field.default)
            kwargs: dict[str, Any] = {"default": default, "help": meta.get("help", "") + note}
            if want is bool:
                decl = [f"{flag_name(field.name)}/--no-{field.name.replace('_', '-')}", field.name]
            else:
                decl = [flag_name(field.name), field.name]
                kwargs["type"] = _click_type(want, meta)
            command = click.option(*decl, **kwargs)(command)
        return command
    return decorate


def _plain_type(want: Any) -> Any:
    """`int | None` -> int: an optional field takes the type of its value."""
    args = [a for a in typing.get_args(want) if a is not type(None)]
    return args[0] if typing.get_origin(want) in (typing.Union, getattr(__import__("types"), "UnionType", None)) \
        and len(args) == 1 else want


def _click_type(want: type, meta: typing.Mapping[str, Any]) -> Any:
    if "choices" in meta:
        return click.Choice(meta["choices"])
    if "min" in meta:
        return (click.IntRange if want is int else click.FloatRange)(min=meta["min"])
    return want


def _note(default: Any) -> str:
    return f" [default: {default}]" if default not in ("", None) else ""
