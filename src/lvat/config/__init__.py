"""Configuration: typed dataclasses, read from TOML/YAML, overridden by `--key value` flags."""

from lvat.config.core import (
    dumps_toml,
    field_docs,
    from_dict,
    help_text,
    load_config,
    option,
    parse_overrides,
    read_file,
    save_config,
    to_dict,
)
from lvat.config.schema import Config, DataConfig, MethodConfig, ModelConfig, TrainConfig

__all__ = [
    "Config",
    "DataConfig",
    "MethodConfig",
    "ModelConfig",
    "TrainConfig",
    "dumps_toml",
    "field_docs",
    "from_dict",
    "help_text",
    "load_config",
    "option",
    "parse_overrides",
    "read_file",
    "save_config",
    "to_dict",
]
