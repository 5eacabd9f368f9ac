"""Named errors, raised where a fault is found and turned into user messages at the edge."""


class MongoFeedError(Exception):
    """Base class of every error mongofeed raises on purpose."""


class ConfigError(MongoFeedError):
    """The config file, an option or an environment variable has a wrong value."""


class SourceError(MongoFeedError):
    """The database cannot be reached, or holds nothing that the config selects."""


WHOLE_DOCUMENT = "(whole document)"  # DecodeError.field of a fault in no field in particular


class DecodeError(MongoFeedError):
    """A document does not fit the schema that the config declares for one of its fields."""

    def __init__(self, collection, doc_id, field, path, expected, found):
        self.collection = collection
        self.doc_id = doc_id
        self.field = field
        self.path = path
        self.expected = expected
        self.found = found
        super().__init__(
            f"collection {collection!r}, _id {doc_id!r}: field {field!r} (path {path!r}): "
            f"expected {expected}, found {found}"
        )


class ProtocolError(MongoFeedError):
    """A peer sent a message that does not follow the mongofeed wire protocol."""


class FeedTimeout(MongoFeedError, TimeoutError):
    """The daemon did not answer or send a batch within the consumer's timeout."""


class FeedError(MongoFeedError):
    """The daemon reported an error for this consumer's session (bad document, unknown feed)."""
