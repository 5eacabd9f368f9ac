"""Unit tests of the rules in source.py that the worker relies on: which database errors are
transient, how ``_id``s are told apart, how a long ``$in`` is cut. Pure and fast."""

from __future__ import annotations

import bson
import pytest
from bson import Int64, ObjectId
from bson.errors import InvalidBSON
from pymongo import helpers_shared
from pymongo.errors import (
    AutoReconnect,
    ConnectionFailure,
    CursorNotFound,
    DocumentTooLarge,
    ExecutionTimeout,
    NetworkTimeout,
    NotPrimaryError,
    OperationFailure,
    ServerSelectionTimeoutError,
)

from mongofeed.daemon.planner import sort_key
from mongofeed.daemon.source import RETRYABLE_CODES, id_chunks, id_key, is_transient

# A few codes pymongo does not retry: bad value, unauthorized, time limit set by the query,
# cursor gone, duplicate key, authentication failed.
NOT_RETRYABLE_CODES = [2, 13, 50, 43, 11000, 18]


def test_retryable_codes_are_pymongos_own():
    """pymongo's set is private; if it changes or moves, this says so."""
    assert RETRYABLE_CODES == helpers_shared._RETRYABLE_ERROR_CODES


@pytest.mark.parametrize("code", sorted(helpers_shared._RETRYABLE_ERROR_CODES))
def test_server_errors_pymongo_would_retry_are_transient(code):
    assert is_transient(OperationFailure(f"code {code}", code=code))


@pytest.mark.parametrize("code", NOT_RETRYABLE_CODES)
def test_other_server_errors_are_not(code):
    assert not is_transient(OperationFailure(f"code {code}", code=code))


def test_a_server_error_labelled_retryable_is_transient():
    details = {"ok": 0, "code": 462, "errorLabels": ["RetryableError", "SystemOverloadedError"]}
    assert is_transient(OperationFailure("overloaded", code=462, details=details))


@pytest.mark.parametrize("exc", [
    ConnectionFailure("down"), AutoReconnect("reset"), NetworkTimeout("slow"),
    NotPrimaryError("stepped down", {"code": 189}), ServerSelectionTimeoutError("no server"),
])
def test_connection_failures_are_transient(exc):
    assert is_transient(exc)


@pytest.mark.parametrize("exc", [
    ExecutionTimeout("maxTimeMS", code=50), CursorNotFound("gone", code=43),
    DocumentTooLarge("16 MiB"), InvalidBSON("bad"), ValueError("bug"), ImportError("PIL"),
])
def test_everything_else_is_not(exc):
    assert not is_transient(exc)


def test_ids_that_python_merges_are_distinct():
    """true, 1, 1.0 and Int64(1) are equal and hash alike in Python, not in BSON."""
    ids = [True, 1, 1.0, Int64(1), False, 0, 0.0, "1", b"1"]
    assert len({id_key(i) for i in ids}) == len(ids)
    assert len({sort_key(i) for i in ids}) == len(ids)  # the planner tells them apart too


def test_equal_ids_of_one_type_are_one_id():
    oid = ObjectId()
    assert id_key(oid) == id_key(ObjectId(str(oid)))
    assert id_key(7) == id_key(bson.decode(bson.encode({"_id": 7}))["_id"])
    assert id_key("a") == id_key("a")


def test_ids_are_cut_into_queries_that_fit():
    ids = ["x" * 300, *range(5), "y" * 300, 5]
    chunks = id_chunks(ids, max_bytes=400)
    assert [i for chunk in chunks for i in chunk] == ids
    assert chunks == [["x" * 300, 0, 1, 2, 3, 4], ["y" * 300, 5]]
    assert all(sum(len(id_key(i)) for i in chunk) <= 400 for chunk in chunks)


def test_an_id_larger_than_a_query_gets_one_alone():
    assert id_chunks([1, "z" * 500, 2], max_bytes=100) == [[1], ["z" * 500], [2]]
    assert id_chunks([]) == []
