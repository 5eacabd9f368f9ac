"""A consumer in a process of its own, as a restarted training script (tests/test_resume.py
starts it)::

    python tests/resume_reader.py < job.json

The job (JSON on stdin): ``endpoint`` (a string, or a list for a ``MultiConsumer``),
``state`` (what a consumer's ``state_dict()`` gave, or null), ``shard`` (``[r, R]``,
``"auto"`` or null: the default) and ``take``: a number of batches, or ``"epoch"`` for the
rest of the current epoch. Prints one JSON line: ``batches``, each ``[epoch, index, idx]``,
and ``state``, the state after them.
"""

from __future__ import annotations

import json
import sys

from mongofeed.consumer import connect

TIMEOUT_S = 30


def batch_json(batch) -> list:
    return [batch.epoch, batch.index, batch.arrays["idx"].tolist()]


def main():
    job = json.load(sys.stdin)
    shard = job.get("shard")
    with connect(job["endpoint"], timeout=TIMEOUT_S, state=job.get("state"),
                 shard=tuple(shard) if isinstance(shard, list) else shard) as consumer:
        take = job["take"]
        batches = (list(consumer.epoch()) if take == "epoch"
                   else [consumer.get() for _ in range(take)])
        print(json.dumps({"batches": [batch_json(b) for b in batches],
                          "state": consumer.state_dict()}), flush=True)


if __name__ == "__main__":
    main()
