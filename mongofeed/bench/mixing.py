"""``mongofeed bench --mixing``: how well each order mixes, without a database.

Over ``MIXING_IDS`` integer ids whose label is sorted with the ``_id`` (a collection loaded
class by class, the hard case), for the full shuffle, no shuffle and windowed orders of a
few window shapes: the classes per batch, the distance from the epoch's class mix, the rank
correlation between ``_id`` and place in the epoch, and how many documents that shared a
batch in epoch 0 share one again in epoch 1.
"""

from __future__ import annotations

import numpy as np

MIXING_IDS = 1_000_000
MIXING_CLASSES = 10
MIXING_WINDOWS = ((65_536, 64), (8_192, 64), (65_536, 8))  # (documents, ranges) per window


def epoch_positions(plan, epoch: int) -> np.ndarray:
    """The ids 0..N-1 of an epoch in the plan's order (for integer ids: an id is its rank)."""
    if not plan.windowed:
        return np.concatenate([plan.positions(epoch, list(range(g, min(g + 4096,
                                                                          plan.global_batches()))))
                               for g in range(0, plan.global_batches(), 4096)])
    from ..daemon.planner.order import window_order

    out = []
    for window in range(plan.windows):
        spec = plan.window_read(epoch, window)
        # the window's documents sorted by _id: its ranges' ids, which are consecutive ints
        ids = np.concatenate([np.arange(low, high + inclusive) for low, high, inclusive
                              in spec.ranges])
        out.append(ids[window_order(plan.seed, epoch, window, spec.count).at(
            np.arange(spec.count))])
    return np.concatenate(out)


def mixing(n: int = MIXING_IDS, batch_size: int = 64) -> list[dict]:
    """Each order over ``n`` documents whose label is sorted with the ``_id`` (a collection
    loaded class by class, the hard case): distinct classes and the total-variation distance
    from the epoch's class mix per batch, the rank correlation between ``_id`` and place in the
    epoch, and how many pairs of documents that shared a batch in epoch 0 share one in epoch 1."""
    from ..daemon.planner import Ids, Plan, SplitsBuilder, WindowPlan

    labels = np.arange(n) * MIXING_CLASSES // n
    plans = [("full shuffle", Plan(Ids("int64", np.arange(n)), batch_size, 3, True,
                                   ids_digest="-")),
             ("no shuffle", Plan(Ids("int64", np.arange(n)), batch_size, 3, False,
                                 ids_digest="-"))]
    for docs, ranges in MIXING_WINDOWS:
        range_docs = docs // ranges // batch_size * batch_size
        builder = SplitsBuilder(range_docs)
        builder.add_reply(np.concatenate([np.frombuffer(b"\x12\x00\x00\x00\x12_id\x00", np.uint8)
                                          .reshape(1, 9).repeat(n, 0),
                                          np.arange(n, dtype="<i8").view(np.uint8)
                                          .reshape(n, 8), np.zeros((n, 1), np.uint8)],
                                         axis=1).tobytes())
        splits, last, count, digest = builder.finish()
        plans.append((f"window: {docs:,} documents in {ranges} ranges",
                      WindowPlan(splits, last, count, batch_size, 3, False, range_docs, ranges,
                                 digest)))
    results = []
    for name, plan in plans:
        epochs = [epoch_positions(plan, e) for e in (0, 1)]
        whole = n // batch_size * batch_size
        batches = labels[epochs[0][:whole]].reshape(-1, batch_size)
        counts = np.stack([(batches == c).sum(1) for c in range(MIXING_CLASSES)], 1)
        tv = np.abs(counts / batch_size - 1 / MIXING_CLASSES).sum(1).mean() / 2
        rank = np.empty(n, np.int64)
        rank[epochs[0]] = np.arange(n)
        together = (rank[epochs[1][:whole]].reshape(-1, batch_size) // batch_size)
        again = np.mean([len(row) - len(np.unique(row)) for row in together[:2000]])
        results.append({
            "order": name, "classes_per_batch": float((counts > 0).sum(1).mean()),
            "tv_distance": float(tv),
            "id_rank_correlation": float(np.corrcoef(np.arange(n), rank)[0, 1]),
            "pairs_again_per_batch": float(again)})
    return results


def format_mixing(results: list[dict], n: int = MIXING_IDS) -> str:
    lines = [f"Mixing over {n:,} documents with {MIXING_CLASSES} classes in _id order, "
             f"batches of 64:", "",
             "| order | classes per batch | distance from the epoch's class mix | "
             "_id ↔ position correlation | documents that met in epoch 0, meeting again |",
             "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['order']} | {r['classes_per_batch']:.2f} | {r['tv_distance']:.3f} | "
                     f"{r['id_rank_correlation']:+.3f} | {r['pairs_again_per_batch']:.2f} |")
    return "\n".join(lines)
