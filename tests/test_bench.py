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
    ("digits", "ceiling-tcp-w2"), ("digits", "memcpy"), ("synthetic64-mem", "ceiling-w2"),
    ("synthetic64-mem", "ceiling-tcp-w2"), ("synthetic64-mem", "zmq-loopback"),
    ("synthetic64-mem", "memcpy"),
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
        if row["loader"].startswith("ceiling"):  # what waiting costs on this machine
            assert row["work_us"] > 0 and row["work_after_gap_us"] > 0, key
            assert row["recv_us"] > 0 and row["recv_gap_ms"] > 0, key
            assert row["channel_us"] > 0 and row["channel_gap_ms"] > 0, key
            assert row["channel_busy_us"] > 0 and row["channel_busy_gap_ms"] > 0, key
            assert row["consumer_us"] > 0, key  # Consumer.get alone, without Keras
    assert (tmp_path / "results.png").exists() or "matplotlib" in result.output
    assert "| data | loader |" in result.output


def test_only_fit_runs_the_keras_fit_comparison_alone(mongo_uri, tmp_path):
    """``--only fit``: no loader rows, the fit from numpy, a PyDataset and the daemon (from
    memory over shared memory and tcp, and from the database), on the recorded backend."""
    result = CliRunner().invoke(bench, [
        "--uri", mongo_uri, "--database", "mongofeed_bench_fit", "--quick", "--only", "fit",
        "--fit-epochs", "2", "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["rows"] == [] and report["machine"]["keras_backend"]
    fit = report["fit"]
    assert "error" not in fit, fit
    for source in ("numpy", "pydataset", "memory", "memory_tcp", "mongofeed"):
        assert fit[f"{source}_epoch_s"] > 0, source
    assert {t["target"] for t in report["targets"]} >= {
        "digits: Keras fit slowdown from mongofeed vs in-memory numpy"}


def test_planner_bench_runs_without_a_database(tmp_path):
    """``mongofeed bench --planner N``: a real supervisor plans N synthetic ids through the
    daemon's listing code and serves 8 consumers; the figures come back per id type."""
    result = CliRunner().invoke(bench, ["--planner", "20000", "--seconds", "1",
                                        "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = {r["kind"]: r for r in json.loads((tmp_path / "planner.json").read_text())}
    assert set(rows) == {"objectid", "int64"}, result.output
    assert rows["objectid"]["bytes_per_id"] == 12 and rows["int64"]["bytes_per_id"] == 8
    for row in rows.values():
        assert row["loop_iterations"] > 0 and row["batches_per_s"] > 0, row
        assert row["loop_longest_cpu_ms"] <= row["loop_longest_ms"] + 1
