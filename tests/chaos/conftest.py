"""Fixtures of the chaos suite."""

from __future__ import annotations

import pytest
import zmq


@pytest.fixture
def context():
    """A ZeroMQ context for the test's own raw sockets, destroyed also when the test fails
    (a context left with open sockets would hang the interpreter's exit)."""
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)
