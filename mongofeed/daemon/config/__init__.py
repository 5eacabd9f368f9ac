"""The TOML config, as a package; ``parse`` holds it all for now, split by role next."""

from .parse import (
    MAX_BATCH_BYTES,
    ON_ERROR,
    REQUIRED,
    SCHEMA,
    VARIABLE,
    ArrayConfig,
    Config,
    FeedConfig,
    FeedSourceConfig,
    FieldConfig,
    SourceConfig,
    TransformConfig,
    _type_name,
    load_config,
    load_source,
    parse_config,
)

__all__ = ["MAX_BATCH_BYTES", "ON_ERROR", "REQUIRED", "SCHEMA", "VARIABLE",
           "ArrayConfig", "Config", "FeedConfig", "FeedSourceConfig", "FieldConfig",
           "SourceConfig", "TransformConfig", "_type_name", "load_config", "load_source",
           "parse_config"]
