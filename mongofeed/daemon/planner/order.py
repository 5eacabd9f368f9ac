"""An epoch's order as a function: a keyed pseudo-random permutation of ``range(n)``,
computed for any positions in O(1) each, with no array of n ever built.

A Feistel network over the smallest power of two that holds n (2^b with b bits split into
halves of b // 2 and b - b // 2 that alternate sides each round, so the domain is less than
2n), keyed from ``(seed, epoch, ...)`` through BLAKE2b, with a SplitMix64 finaliser as round
function; positions that land at n or beyond are walked on through the network until they
fall inside (cycle-walking: a bijection of ``range(n)`` by construction, and since more than
half of the domain is inside, a batch of 256 positions needs about four passes; a balanced
network over the next even power of two would need about twelve at n = 100 million).
Vectorised with numpy: a batch's positions cost one call. Same key, same order, on every
machine (integer arithmetic only).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

FEISTEL_ROUNDS = 6
ORDER_VERSION = "feistel6-splitmix64"  # announced in the plan identity: change it with the order
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


@lru_cache(maxsize=1024)
def _round_keys(key: tuple) -> np.ndarray:
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8 * FEISTEL_ROUNDS).digest()
    return np.frombuffer(digest, "<u8").astype(np.uint64)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: every output bit depends on every input bit."""
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


class Permutation:
    """Position i of the order is ``at([i])[0]``: a bijection of ``range(n)`` fixed by
    ``key`` (a tuple of ints and strings)."""

    def __init__(self, n: int, key: tuple):
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.widths = (bits // 2, bits - bits // 2)  # of the left and right half
        self.keys = _round_keys(tuple(key))

    def _encrypt(self, x: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """One pass through the network, with ``keys``: one row per round, of one key (a
        column) or of one key per element of ``x``. A round maps (L, R) to (R, L ^ F(R)),
        truncated to L's width: invertible whatever the widths, which swap sides each round
        (an even number of rounds puts them back)."""
        left_bits, right_bits = self.widths
        left, right = x >> np.uint64(right_bits), x & np.uint64((1 << right_bits) - 1)
        for round_key in keys:
            mixed = _mix(right ^ round_key) & np.uint64((1 << left_bits) - 1)
            left, right = right, left ^ mixed
            left_bits, right_bits = right_bits, left_bits
        return (left << np.uint64(right_bits)) | right

    def at(self, positions) -> np.ndarray:
        """The values at ``positions`` (each in ``range(n)``), as int64."""
        return self._walk(np.asarray(positions, dtype=np.uint64), self.keys[:, None])

    def _walk(self, x: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """``x`` through the network until every value lands in ``range(n)``."""
        out = self._encrypt(x, keys)
        outside = np.flatnonzero(out >= self.n)
        while outside.size:
            out[outside] = self._encrypt(out[outside],
                                         keys if keys.shape[1] == 1 else keys[:, outside])
            outside = outside[out[outside] >= self.n]
        return out.astype(np.int64)


def permute_many(n: int, keys: list[tuple], which, positions) -> np.ndarray:
    """``positions[i]`` through the permutation of ``range(n)`` keyed by ``keys[which[i]]``
    (as ``Permutation(n, keys[which[i]]).at``), in one vectorised pass for all the keys: the
    copies of one source in a mixture's batch."""
    permutation = Permutation(n, ())
    rows = np.stack([_round_keys(tuple(key)) for key in keys], axis=1)  # (rounds, keys)
    return permutation._walk(np.asarray(positions, dtype=np.uint64),
                             rows[:, np.asarray(which)])


def epoch_order(seed: int, epoch: int, n: int) -> Permutation:
    """The full shuffle's order of epoch ``epoch``."""
    return Permutation(n, ("epoch", seed, epoch))


def range_order(seed: int, epoch: int, n: int) -> Permutation:
    """The windowed order's shuffle of the ``n`` full ranges in epoch ``epoch``."""
    return Permutation(n, ("ranges", seed, epoch))


def window_order(seed: int, epoch: int, window: int, n: int) -> Permutation:
    """The order of the ``n`` documents of one window (sorted by ``_id``) in epoch ``epoch``."""
    return Permutation(n, ("window", seed, epoch, window))
