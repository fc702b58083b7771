"""Command-line flags generated from a dataclass: one declaration per option.

The sub-commands that take no config file (`lvat bench`, `lvat figures`, `lvat diagnose`)
declare their options once, as a dataclass whose field docstrings are the `--help` text (as
for configs, `lvat.config.core`), and the parser is generated from it:

    @dataclass
    class FiguresOptions:
        run_dir: str
        '''a VAT or LVAT run folder written by `lvat train`'''
        samples: int = flag(5000, metavar="N")
        '''random test images (5000)'''

    add_flags(parser, FiguresOptions)        # run_dir positional, --samples N
    opts = from_flags(FiguresOptions, args)  # the parsed FiguresOptions

Per field, by its type and default:

- no default: a positional argument;
- `bool`, default False: `--name` switches it on; default True: `--no-name` switches it off;
- `Literal[...]`: one of its values (argparse `choices`);
- `int`, `float`, `str` (or `X | None`, default None: not given): one value of that type;
- a sequence of `str`: one comma-separated value, e.g. `--models conv-large,conv-small`.

`field_name` is `--field-name`; `flag(default, metavar=...)` names the value in `--help`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, TypeVar, get_args, get_origin

from lvat.config.core import field_docs

T = TypeVar("T")


def flag(default: Any = dataclasses.MISSING, *, metavar: str | None = None) -> Any:
    """A dataclass field whose flag shows its value as `metavar` in `--help` (e.g. N)."""
    return dataclasses.field(default=default, metadata={"metavar": metavar})


def comma_list(value: str) -> tuple[str, ...]:
    """ "a,b,,c" -> ("a", "b", "c"): the value of a sequence flag."""
    return tuple(x for x in value.split(",") if x)


def _unwrap_optional(tp: Any) -> Any:
    """`X | None` -> X (None is the default: the flag not given)."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _argument(name: str, f: dataclasses.Field, tp: Any, doc: str) -> tuple[list[str], dict]:
    """The `add_argument` names and keywords of field `name` (see the module docstring)."""
    option = "--" + name.replace("_", "-")
    kw: dict[str, Any] = {"help": doc.replace("%", "%%")}
    if f.metadata.get("metavar"):
        kw["metavar"] = f.metadata["metavar"]
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return [name], kw  # positional
    kw["default"] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    tp = _unwrap_optional(tp)
    origin = get_origin(tp)
    if tp is bool:
        if kw["default"]:
            return ["--no-" + name.replace("_", "-")], {**kw, "dest": name, "action": "store_false"}
        return [option], {**kw, "action": "store_true"}
    if origin is Literal:
        return [option], {**kw, "choices": get_args(tp)}
    if tp in (int, float):
        return [option], {**kw, "type": tp}
    if tp is str:
        return [option], kw
    if origin in (tuple, list, Sequence) and set(get_args(tp)) <= {str, Ellipsis}:
        return [option], {**kw, "type": comma_list}
    raise TypeError(f"{name}: no flag for a field of type {tp!r}")  # a bug in the dataclass


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one argument per field of the dataclass `cls` to `parser`, its docstring the help."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        names, kw = _argument(f.name, f, hints[f.name], docs.get(f.name, ""))
        parser.add_argument(*names, **kw)


def from_flags(cls: type[T], args: argparse.Namespace) -> T:
    """The `cls` that the parsed `args` describe (`add_flags(parser, cls)` made the parser)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})  # type: ignore[call-arg]
