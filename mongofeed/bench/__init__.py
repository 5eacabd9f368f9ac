"""``mongofeed bench``: mongofeed against the loaders users write instead, on the same server
and data. Imported only when that command runs (docs/benchmarks.md)."""
