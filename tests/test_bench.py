"""Smoke test of ``mongofeed bench --quick`` against the test server: every row runs and
reports a positive rate. No timing is asserted: the numbers are the benchmark's business."""

from __future__ import annotations

import json

from click.testing import CliRunner

from mongofeed.bench.command import bench

EXPECTED_ROWS = {
    ("digits", "mongofeed-w1"), ("digits", "mongofeed-w2"), ("digits", "mongofeed-window-w2"),
    ("digits", "keras-forum-posted"),
    ("digits", "keras-forum-intended"), ("digits", "keras-best-practice"),
    ("digits", "tensorpack"), ("digits", "raw-drain"), ("digits", "ceiling-w2"),
    ("digits", "memcpy"), ("synthetic64-mem", "ceiling-w2"),
    ("synthetic64-mem", "zmq-loopback"), ("synthetic64-mem", "memcpy"),
}


def test_quick_bench_runs_every_row(mongo_uri, tmp_path):
    result = CliRunner().invoke(bench, [
        "--uri", mongo_uri, "--database", "mongofeed_bench_smoke", "--quick",
        "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["data"], r["name"]): r for r in report["rows"]}
    assert set(rows) == EXPECTED_ROWS, result.output
    for key, row in rows.items():
        if row["loader"] == "tensorpack" and "skipped" in row:
            continue  # an optional peer: skipped with its reason when it cannot be imported
        assert "error" not in row, f"{key}: {row.get('error')}"
        assert row["samples_per_s"] > 0, key
        assert row["batches"] > 0, key
    assert (tmp_path / "results.png").exists() or "matplotlib" in result.output
    assert "| data | loader |" in result.output
