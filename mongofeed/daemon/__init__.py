"""The daemon side, ``mongofeed serve``: the supervisor and its loop, the worker processes,
the planner, and what a worker does to a batch (source, codec, transform). Never imported
by the training side (``mongofeed.consumer`` and the adapters)."""
