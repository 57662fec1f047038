"""How a configuration's fields become ``fol-vpr``'s flags: a field declares its flag with
:func:`option` (its default and help once, argparse's keywords beside them), :func:`add_flags`
puts the flags of a configuration's fields on a parser, and :func:`build` makes the configuration
from the parsed flags. Also the value types the flags share. No heavy imports."""
from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

FLAG = "fol_flag"  # the metadata key of a field's flag: {"flag": ..., "help": ..., "group": ..., argparse's keywords}


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or a positive integer")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value} must be between 0 and 1")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{value} must be a positive finite number")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or a positive finite number")
    return value


def int_at_least(minimum: int, why: str) -> Callable[[str], int]:
    """A flag type for whole numbers of at least ``minimum`` (``why`` says what needs it)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}: {why}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"  # argparse names the type in its message for unparsable text
    return parse


class ImageSizeAction(argparse.Action):
    """``--image_size H W`` or ``--image_size S`` (the shorter side)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None) -> None:
        if len(values) > 2:
            raise argparse.ArgumentError(self, f"takes H W or one value (the shorter side), not {len(values)} values")
        setattr(namespace, self.dest, values)


def option(default: Any = dataclasses.MISSING, *, help: str | None = None, flag: str | None = None, group: str | None = None,
           factory: Callable[[], Any] | None = None, **argparse_keywords: Any) -> Any:  # fmt: skip
    """A dataclass field set by the flag ``--<field name>`` (or ``flag``), with its help text and
    argparse's keywords (``type``, ``nargs``, ``choices``, ``action``, ...) declared here once.
    Keywords of our own: ``convert`` turns the parsed value into the field's (``tuple``),
    ``invert`` makes a boolean field's flag say its opposite (``--no_labels``), ``cli_default``
    is where the flag starts when it differs from the library's default."""
    metadata = {FLAG: {"flag": flag, "help": help, "group": group, **argparse_keywords}}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def internal(default: Any = dataclasses.MISSING, factory: Callable[[], Any] | None = None) -> Any:
    """A field no flag sets (filled by the command or the library)."""
    return dataclasses.field(default_factory=factory) if factory is not None else dataclasses.field(default=default)


# Keys of a field's flag metadata that are ours, not argparse's.
OWN_KEYS = ("flag", "group", "convert", "invert", "cli_default")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in ``--help`` (none where the default is None: the help says it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def _flag_default(field: dataclasses.Field) -> Any:
    """What argparse starts a field's flag from: its default (tuples as lists, as typed)."""
    spec = field.metadata[FLAG]
    if "cli_default" in spec:
        return spec["cli_default"]
    if spec.get("invert") or spec.get("action") == "store_true":
        return False
    if field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    elif field.default is not dataclasses.MISSING:
        value = field.default
    else:
        return None
    return list(value) if isinstance(value, tuple) else value


def _nested(field: dataclasses.Field) -> type | None:
    """The configuration a field holds, when it holds one (built from its own flags)."""
    factory = field.default_factory
    return factory if isinstance(factory, type) and dataclasses.is_dataclass(factory) else None


def add_flags(
    parser: argparse.ArgumentParser,
    config_type: type,
    skip: Iterable[str] = (),
    groups: dict[str, Any] | None = None,
) -> None:
    """The flags of ``config_type``'s fields (and of the configurations it holds) on ``parser``,
    in the argument groups their fields name (``groups``: those already made on ``parser``, by
    title; the new ones are added to it)."""
    skip = set(skip)
    groups = {} if groups is None else groups
    for field in dataclasses.fields(config_type):
        if field.name in skip:
            continue
        if FLAG not in field.metadata:
            if _nested(field):
                add_flags(parser, _nested(field), skip, groups)
            continue
        spec = field.metadata[FLAG]
        keywords = {key: value for key, value in spec.items() if key not in OWN_KEYS}
        if spec.get("invert"):
            keywords["action"] = "store_true"
        name = spec["flag"] or field.name
        dest = name if spec.get("invert") else field.name
        title = spec["group"]
        if title is not None and title not in groups:
            groups[title] = parser.add_argument_group(title)
        (groups[title] if title else parser).add_argument(f"--{name}", dest=dest, default=_flag_default(field), **keywords)


def flag_values(config_type: type, args: argparse.Namespace, skip: Iterable[str] = ()) -> dict[str, Any]:
    """``config_type``'s field values from parsed flags (the fields without a flag here keep
    their defaults; held configurations are built from their own flags)."""
    values = {}
    for field in dataclasses.fields(config_type):
        if field.name in skip:
            continue
        if FLAG not in field.metadata:
            if _nested(field):
                values[field.name] = build(_nested(field), args)
            continue
        spec = field.metadata[FLAG]
        dest = (spec["flag"] or field.name) if spec.get("invert") else field.name
        if not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if spec.get("invert"):
            value = not value
        elif value is not None and spec.get("convert"):
            value = spec["convert"](value)
        values[field.name] = value
    return values


def build(config_type: type, args: argparse.Namespace, **given: Any) -> Any:
    """A ``config_type`` from parsed flags, ``given`` fields replacing theirs."""
    return config_type(**{**flag_values(config_type, args, skip=given), **given})
