"""User-facing errors: the CLI prints any `LvatError` as one line and exits with status 2."""


def one_line(exc: BaseException | str, limit: int | None = None) -> str:
    """An error's message on one line (messages quoting a file, a parser or torch may hold
    newlines), cut to `limit` characters if given; the exception's type name if it is empty."""
    text = " ".join(str(exc).split())[:limit]
    return text or (type(exc).__name__ if isinstance(exc, BaseException) else "")


class LvatError(Exception):
    """An error caused by input (config, data, files), with a message that says what to do."""


class ConfigError(LvatError):
    """A config key is unknown, or its value has the wrong type or is out of range."""


class DatasetError(LvatError):
    """A dataset is missing, unreadable or malformed."""


class ChecksumError(DatasetError):
    """A dataset file does not match its published checksum."""


class SplitError(LvatError):
    """A labeled/validation split cannot be drawn, or belongs to another dataset."""


class RunInUseError(LvatError):
    """A run folder is held by another live process (its lock is taken)."""
