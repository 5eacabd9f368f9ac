"""mongofeed: feed training data stored in MongoDB to Keras, fast and safely.

``mongofeed serve`` runs the producer processes (one MongoClient each); the training process
reads batches with ``mongofeed.Consumer`` or ``mongofeed.keras.MongoFeedSequence``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

from .errors import (
    ConfigError,
    DecodeError,
    FeedError,
    FeedTimeout,
    MongoFeedError,
    ProtocolError,
)

if TYPE_CHECKING:
    from .consumer import Batch, Consumer
    from .multi import MultiConsumer
    from .resume import merge_states

# Imported on first use (PEP 562), so that importing the package does not need zmq, numpy or
# pymongo: ``python3 -m mongofeed.dev`` runs with a bare Python, before the venv exists.
_LAZY = {"Batch": ".consumer", "Consumer": ".consumer", "MultiConsumer": ".multi",
         "merge_states": ".resume"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "Batch",
    "ConfigError",
    "Consumer",
    "DecodeError",
    "FeedError",
    "FeedTimeout",
    "MongoFeedError",
    "MultiConsumer",
    "ProtocolError",
    "__version__",
    "merge_states",
]
