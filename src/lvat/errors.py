"""User-facing errors: the CLI prints any `LvatError` as one line and exits with status 2."""


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
