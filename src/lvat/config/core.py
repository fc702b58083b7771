"""Typed configuration: dataclasses whose field docstrings are the `--help` text.

A config is a tree of dataclasses. It is read from a TOML or YAML file, then `--key value`
flags (dotted for nested sections, e.g. `--data.num_labeled 100`) override the file, then every
value is checked against its field's type and range. The resolved config is written into each run
folder as `config.toml`, which `--config` reads back unchanged.

Errors are one line, name the key and say what is allowed (`ConfigError`).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import json
import math
import sys
import textwrap
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from lvat.errors import ConfigError, one_line

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

T = TypeVar("T")

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def option(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A dataclass field with an allowed range (the docstring under it is its help text)."""
    bounds = {k: v for k, v in {"ge": ge, "gt": gt, "le": le, "lt": lt}.items() if v is not None}
    return dataclasses.field(default=default, metadata={"bounds": bounds})


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map field name -> the string literal under it in the class body (PEP 257 attribute doc)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source (e.g. frozen app): help text is just empty
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for stmt, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (list, tuple, Sequence):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(key: str, tp: Any, value: Any) -> Any:
    """Coerce `value` (from a file, or a string from a flag) to `tp`, or raise ConfigError."""
    origin = get_origin(tp)

    def fail(extra: str = "") -> ConfigError:
        return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}{extra}")

    if origin is Literal:
        choices = get_args(tp)
        for choice in choices:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(choices)}")
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(key, arg, value)
            except ConfigError:
                continue
        raise fail()
    if origin in (list, tuple):
        (inner, *_rest) = get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise fail()
        items = [_convert(f"{key}[{i}]", inner, v) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise fail(" (use true or false)")
    if tp is int:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:  # allow 1e4 for step counts
                    f = float(value)
                except ValueError:
                    raise fail() from None
                if f.is_integer():
                    return int(f)
        raise fail()
    if tp is float:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):  # flags, and YAML's '1e-3' which YAML 1.1 reads as a string
            try:
                return float(value)
            except ValueError:
                raise fail() from None
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise fail()
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # a bug in the schema, not input


def _check_bounds(key: str, value: Any, bounds: dict[str, float]) -> None:
    if not bounds or not isinstance(value, int | float) or isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} = {value} is not a finite number")
    ops = {
        "ge": (lambda a, b: a >= b, ">="),
        "gt": (lambda a, b: a > b, ">"),
        "le": (lambda a, b: a <= b, "<="),
        "lt": (lambda a, b: a < b, "<"),
    }
    for name, bound in bounds.items():
        test, sym = ops[name]
        if not test(value, bound):
            allowed = " and ".join(f"{ops[n][1]} {b}" for n, b in bounds.items())
            raise ConfigError(f"{key} = {value} is out of range: must be {allowed}")


def all_keys(cls: type, prefix: str = "") -> dict[str, tuple[Any, dataclasses.Field]]:
    """Flatten a config class into {'section.key': (type, field)} for every leaf field."""
    out: dict[str, tuple[Any, dataclasses.Field]] = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_section(tp):
            out.update(all_keys(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = (tp, f)
    return out


def _close(word: str, choices: Sequence[str]) -> str | None:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown_key(cls: type, key: str, prefix: str = "", table: bool = False) -> ConfigError:
    """The one-line error for `key` unknown under `cls` (the section at `prefix`).

    An unknown section is named as such with the closest section; an unknown leaf gets the
    closest key of its section (or the same name in another section), and the allowed names are
    listed once each, sorted. `table`: the value is a table (a `[section]` of a file).
    """
    parts = key[len(prefix) :].split(".")
    node = cls
    for part in parts[:-1]:  # walk down the sections that exist
        tp = _hints(node).get(part)
        if not _is_section(tp):
            break
        node, prefix = tp, f"{prefix}{part}."
    bad = key[len(prefix) :].split(".")[0]
    hints = _hints(node)
    names = [f.name for f in dataclasses.fields(node)]
    sections = sorted(n for n in names if _is_section(hints[n]))
    leaves = sorted(n for n in names if not _is_section(hints[n]))
    where = f" in [{prefix[:-1]}]" if prefix else ""
    if "." in key[len(prefix) :] or (table and sections):
        close = _close(bad, sections)
        hint = f" (did you mean '{prefix}{close}'?)" if close else ""
        allowed = f"; allowed sections{where}: {', '.join(sections)}" if sections else ""
        scalars = f"; keys{where}: {', '.join(leaves)}" if leaves else ""
        return ConfigError(
            f"unknown key '{key}': unknown section '{prefix}{bad}'{hint}{allowed}{scalars}"
        )
    close = _close(bad, leaves)
    if close is None and not prefix:
        close = _close(bad, sections)
    if close is not None:
        hint = f" (did you mean '{prefix}{close}'?)"
    else:  # the same name in another section, e.g. --data.steps -> train.steps
        elsewhere = sorted(k for k in all_keys(cls) if k.rsplit(".", 1)[-1] == bad)
        hint = f" (did you mean '{elsewhere[0]}'?)" if elsewhere else ""
    allowed = leaves if prefix else sorted(names)
    what = f"allowed{where}" if prefix else "allowed top-level keys and sections"
    return ConfigError(f"unknown key '{key}'{hint}; {what}: {', '.join(allowed)}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build a validated `cls` from nested plain data; unknown keys and bad values raise."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix[:-1] or 'config'}: expected a table of keys, got {data!r}")
    hints = _hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise _unknown_key(cls, key, prefix, table=isinstance(value, dict))
        tp = hints[name]
        if _is_section(tp):
            kwargs[name] = from_dict(tp, value, f"{key}.")
        else:
            kwargs[name] = _convert(key, tp, value)
            _check_bounds(key, kwargs[name], names[name].metadata.get("bounds", {}))
    for name in names:  # absent sections are built (and checked) from their defaults
        if name not in kwargs and _is_section(hints[name]):
            kwargs[name] = from_dict(hints[name], {}, f"{prefix}{name}.")
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (JSON/TOML friendly)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def parse_overrides(args: Sequence[str], cls: type) -> dict[str, Any]:
    """Turn ['--data.name', 'svhn', '--train.steps=10'] into nested {'data': {'name': 'svhn'}}."""
    known = all_keys(cls)
    nested: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument '{arg}': overrides look like --key value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in known:
            raise _unknown_key(cls, key)
        if not eq:
            tp = known[key][0]
            nxt = args[i + 1] if i + 1 < len(args) else None
            if tp is bool and (nxt is None or nxt.startswith("--")):
                value = "true"  # a bare boolean flag switches it on
            elif nxt is None:
                raise ConfigError(f"--{key}: missing value (expected {_type_name(tp)})")
            else:
                value = nxt
                i += 1
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
        i += 1
    return nested


def to_flags(values: dict[str, Any]) -> list[str]:
    """The inverse of parse_overrides: {'train.steps': 10} -> ['--train.steps', '10']."""
    return [a for k, v in values.items() for a in (f"--{k}", str(v))]


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a TOML (.toml) or YAML (.yaml/.yml) config file into plain data.

    A top-level `extends = "base.toml"` (relative to this file) reads that file first; this
    file's keys win. The paper's configs use it to share one file per dataset setting.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: `extends` loops back to itself")
    formats = {".toml": "TOML", ".yaml": "YAML", ".yml": "YAML"}
    if path.suffix not in formats:
        raise ConfigError(f"{path}: unknown config format; use .toml, .yaml or .yml")
    fmt = formats[path.suffix]
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a UTF-8 {fmt} file (byte {exc.start} is {raw[exc.start]:#04x}); "
            f"save it as UTF-8 text"
        ) from None
    if "\x00" in text:
        raise ConfigError(f"{path}: not a UTF-8 {fmt} file (it holds NUL bytes); is it binary?")
    try:
        if fmt == "YAML":
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text)
    except Exception as exc:  # parser errors: keep their line/column, on one line
        raise ConfigError(f"{path}: cannot parse as {fmt}: {one_line(exc, 300)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table of keys")
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends: expected a file name, got {base!r}")
    return _merge(read_file(path.parent / base, (*_seen, path.resolve())), data)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """File (if any), then flags on top; validated. Flags always win over the file."""
    data = read_file(path) if path else {}
    return from_dict(cls, _merge(data, parse_overrides(overrides, cls)))


def _without_none(table: dict[str, Any]) -> dict[str, Any]:
    """TOML has no null: an unset (None) option is left out, and reads back as its default."""
    return {
        k: _without_none(v) if isinstance(v, dict) else v for k, v in table.items() if v is not None
    }


def dumps_toml(cfg: Any) -> str:
    """Render a config as TOML (top-level keys first, then one table per section), by tomli-w."""
    import tomli_w

    return tomli_w.dumps(_without_none(to_dict(cfg)))


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as TOML, atomically; `load_config` reads it back unchanged."""
    from lvat.io import atomic_write_text

    return atomic_write_text(Path(path), dumps_toml(cfg))


def help_text(cls: type) -> str:
    """One line per key: `--key TYPE (default) doc` — the body of `--help`."""
    rows = []
    for key, (tp, f) in all_keys(cls).items():
        owner = _owner(cls, key)
        doc = field_docs(owner).get(key.rsplit(".", 1)[-1], "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        bounds = f.metadata.get("bounds", {})
        rng = " ".join(f"{n} {b}" for n, b in bounds.items())
        rows.append(
            f"  --{key} {_type_name(tp)} (default {default!r}{', ' + rng if rng else ''})\n"
            f"      {doc}"
        )
    return "\n".join(rows)


def _owner(cls: type, key: str) -> type:
    """The dataclass that declares the leaf of a dotted key."""
    for part in key.split(".")[:-1]:
        cls = _hints(cls)[part]
    return cls


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _fixed(key: str, patterns: Sequence[str]) -> bool:
    return any(key == p or (p.endswith(".*") and key.startswith(p[:-1])) for p in patterns)


def check_resume(saved: Any, cfg: Any, run: str = "the run") -> None:
    """Raise a one-line ConfigError if `cfg` changes a key that a resumed run must keep.

    The keys are the class's `RESUME_FIXED` (for `Config`: the model, the split and image shape,
    the method and the seed); a pattern `section.*` covers a whole section. Everything else
    (lr, steps, evaluation, logging, checkpointing, device, ...) may change on resume.
    """
    patterns = getattr(type(cfg), "RESUME_FIXED", ())
    old, new = _flatten(to_dict(saved)), _flatten(to_dict(cfg))
    changed = [k for k in old if _fixed(k, patterns) and old[k] != new.get(k)]
    if changed:
        what = ", ".join(f"{k} ({old[k]!r} -> {new.get(k)!r})" for k in changed)
        raise ConfigError(
            f"cannot resume {run} with {what}: these keys are fixed on resume: "
            f"{', '.join(patterns)} (lr, steps, evaluation, logging and checkpoint keys may "
            "change); start a new run in another --out instead"
        )


def resume_config(cls: type[T], saved: dict[str, Any], overrides: Sequence[str], out: str) -> T:
    """The config of a resumed run: the one `saved` in its checkpoint, with `overrides` (flags)
    on top and `out` = the run folder; a flag that changes a `RESUME_FIXED` key is refused."""
    flags = parse_overrides(overrides, cls)  # a bad flag is the user's: report it as is
    if "out" in flags and Path(str(flags["out"])) != Path(out):
        raise ConfigError(f"--out: a resumed run stays in its folder {out}; drop --out")
    try:
        old = from_dict(cls, saved)
    except ConfigError as exc:
        raise ConfigError(
            f"{out}: the config saved in its checkpoint is not valid for this lvat ({exc}); was "
            "it written by another version or edited?"
        ) from None
    new = from_dict(cls, _merge(saved, flags))
    check_resume(old, new, out)
    return dataclasses.replace(new, out=str(out))  # type: ignore[type-var]
