"""Development commands, for checkouts of mongofeed: the local FerretDB test server and the
test, demo and bench runners (``python -m mongofeed.dev --help``). Standard library only, so
they run with a bare Python, before the virtual environment exists, and without bash or make.
"""
