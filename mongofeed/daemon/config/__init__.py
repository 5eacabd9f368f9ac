"""The TOML config: its keys, loading, overrides and every check, before anything starts.

- ``schema``: ``SCHEMA``, the single source of truth for which keys exist, their types,
  defaults and meaning (the configuration reference in the docs is generated from it);
- ``model``: the checked config, frozen dataclasses (``Config`` and one per table);
- ``parse``: reading the file and the overrides, the top level, [batch], [output], [serve];
- ``sources``: [source] and [feeds.*] with their sources;
- ``arrays``: [fields.*], [transform] and [arrays.*].

Every fault is a ``ConfigError`` that names the file and the key to fix.
"""

from .model import (
    VARIABLE,
    ArrayConfig,
    Config,
    FeedConfig,
    FeedSourceConfig,
    FieldConfig,
    ServeConfig,
    SourceConfig,
    TransformConfig,
)
from .parse import MAX_BATCH_BYTES, load_config, load_source, parse_config
from .schema import ON_ERROR, SCHEMA

__all__ = ["MAX_BATCH_BYTES", "ON_ERROR", "SCHEMA", "VARIABLE", "ArrayConfig", "Config",
           "FeedConfig", "FeedSourceConfig", "FieldConfig", "ServeConfig",
           "SourceConfig", "TransformConfig",
           "load_config", "load_source", "parse_config"]
