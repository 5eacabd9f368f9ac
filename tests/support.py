"""Test data: the sample documents most tests serve, configs for them, and TOML files.

The daemon process, free ports and server counters are in ``mongofeed.testing``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def insert_samples(collection, count: int, val: int = 0) -> list:
    """``count`` documents: ``i`` (0..count-1), ``x`` = float32 [i, i, i, i] as raw bytes,
    ``y`` = i % 3, and ``split`` ("val" for the last ``val`` of them). Returns their _ids."""
    docs = [{"i": i, "x": np.full(4, i, dtype=np.float32).tobytes(), "y": i % 3,
             "split": "val" if i >= count - val else "train"} for i in range(count)]
    return collection.insert_many(docs).inserted_ids


def sample_config(uri: str, database: str, collection: str = "samples", *, batch=None,
                  feeds=None, fields=None, output=None, serve=None) -> dict:
    """A config as nested dicts for the documents of ``insert_samples``."""
    return {
        "source": {"uri": uri, "database": database, "collection": collection},
        "feeds": feeds or {"train": {"filter": {"split": "train"}, "shuffle": True},
                           "val": {"filter": {"split": "val"}, "shuffle": False}},
        "batch": {"size": 8, "seed": 0, **(batch or {})},
        "fields": fields or {
            "idx": {"path": "i", "decode": "scalar", "dtype": "int64"},
            "x": {"decode": "raw", "dtype": "float32", "shape": [4]},
            "label": {"path": "y", "decode": "scalar", "dtype": "int64", "one_hot": 3},
        },
        "output": output or {"inputs": ["x"], "targets": ["label"]},
        "serve": serve or {},
    }


def write_toml(path: Path, config: dict) -> Path:
    """A small TOML writer for our config shapes (tables, scalars, lists, inline tables)."""
    lines = []

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(v)

    def table(name, body):
        scalars = {k: v for k, v in body.items() if not (isinstance(v, dict) and k != "filter")}
        lines.append(f"[{name}]")
        lines.extend(f"{json.dumps(k)} = {value(v)}" for k, v in scalars.items())
        for k, v in body.items():
            if isinstance(v, dict) and k != "filter":
                table(f"{name}.{json.dumps(k)}", v)

    for section, body in config.items():
        table(section, body)
    path.write_text("\n".join(lines) + "\n")
    return path
