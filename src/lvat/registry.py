"""An ordered name -> entry table that plugins extend: the base of lvat's open registries.

`lvat.regularizers.registry.METHODS` (what `method.name` may be) and
`lvat.models.registry.KINDS` (what `lvat fit KIND` trains and LVAT perturbs) are `Registry`
objects. An entry is any object with a `name` attribute; entries keep their registration order
(the built-ins first), which is the order of reports, `--help` and error messages. Looking up a
name that is not registered raises a one-line `ConfigError` listing the registered names.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator
from typing import Generic, TypeVar

from lvat.errors import ConfigError

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Generic[T]):
    """Entries by name, in registration order.

    Args:
        what: what an entry is, for messages ("method", "transformer kind").
        builtins: a module that registers the built-in entries when imported; it is imported on
            the first use of the registry, so they always come first and are always there.
    """

    def __init__(self, what: str, builtins: str | None = None) -> None:
        self.what = what
        self._builtins = builtins
        self._entries: dict[str, T] = {}

    def _load(self) -> dict[str, T]:
        if self._builtins is not None:
            module, self._builtins = self._builtins, None  # first, so that its register() passes
            try:
                importlib.import_module(module)
            except BaseException:
                self._builtins = module  # try again on the next use
                raise
        return self._entries

    def register(self, entry: T, *, replace: bool = False) -> T:
        """Add `entry` under `entry.name`; a name already taken is refused unless `replace`.
        Returns `entry`, so that it can decorate or be assigned."""
        name = getattr(entry, "name", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.what} needs a non-empty string `name`, got {name!r}")
        entries = self._load()
        if name in entries and not replace:
            raise ValueError(f"{self.what} {name!r} is already registered (replace=True to swap)")
        entries[name] = entry
        return entry

    def unregister(self, name: str) -> T:
        """Remove and return the entry `name` (the undo of `register`)."""
        return self._load().pop(name)

    def __getitem__(self, name: str) -> T:
        entries = self._load()
        if name not in entries:
            close = difflib.get_close_matches(str(name), list(entries), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown {self.what} {name!r}{hint}; registered: {', '.join(entries)}"
            )
        return entries[name]

    def get(self, name: object, default: T | None = None) -> T | None:
        """The entry `name`, or `default` when there is none (no error)."""
        return self._load().get(name, default) if isinstance(name, str) else default

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._load()

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._load()))

    def __len__(self) -> int:
        return len(self._load())

    def names(self) -> list[str]:
        return list(self._load())

    def values(self) -> list[T]:
        return list(self._load().values())

    def items(self) -> list[tuple[str, T]]:
        return list(self._load().items())

    def index(self, name: str) -> int:
        """Registration rank of `name` (reports sort rows by it); len(self) if not registered."""
        names = self.names()
        return names.index(name) if name in names else len(names)

    def __repr__(self) -> str:
        return f"Registry({self.what}: {', '.join(self._load())})"
