"""mongofeed: feed training data stored in MongoDB to Keras, fast and safely.

``mongofeed serve`` runs the producer processes (one MongoClient each); the training process
reads batches with ``mongofeed.Consumer`` or ``mongofeed.keras.MongoFeedSequence``.
"""

__version__ = "0.1.0"

from .consumer import Batch, Consumer, MultiConsumer
from .errors import (
    ConfigError,
    DecodeError,
    FeedError,
    FeedTimeout,
    MongoFeedError,
    ProtocolError,
)

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
]
