"""``mongofeed bench``: mongofeed against the loaders users would write instead, and against
what the server, the transport and the memory allow. Same server, same data, one run.

For each data set it loads the data (into ``--database``, dropping the bench's collections),
then runs every row in its own process (``bench.rows.row_main``) while this process samples
the memory of that process tree, prints one line per row, and at the end the table, the
targets of issue 5 (met or missed, by how much), ``results.json`` and ``results.png`` in
``--output``. Rows, what they measure and how to read them: docs/benchmarks.md.
"""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import click

from ..portable import kill_process_group, own_process_group
from .report import (
    MEMORY_LOADERS,
    OTHER_LOADERS,
    evaluate_targets,
    format_table,
    format_targets,
    keras_backend,
    machine,
    server_name,
    write_chart,
)

PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent.parent)
MEMORY_SAMPLE_S = 0.2
ROW_TIMEOUT_EXTRA_S = 240.0
SHORT_ROW_S = 3.0  # memcpy and loopback are steady at once


def shape_option(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not like 64,64,3") from None


@click.command(epilog="Example:\n\n\b\n  make bench\n"
               "  mongofeed bench --uri mongodb://127.0.0.1:27017 --quick\n"
               "  mongofeed bench --planner 1000000 --planner 10000000\n"
               "  mongofeed bench --uri mongodb://... --only digits --only mongofeed-w*")
@click.option("--uri", envvar="MONGOFEED_URI",
              help="MongoDB (or FerretDB) to benchmark against; nothing is started. "
              "Required but with --planner.")
@click.option("--database", default="mongofeed_bench", show_default=True,
              help="Database the bench loads its collections into (dropped and reloaded).")
@click.option("--metrics-url", envvar="MONGOFEED_METRICS_URL",
              help="FerretDB's /debug/metrics URL, for connections and queries "
              "(MongoDB: read from serverStatus).")
@click.option("--output", default="bench-results", show_default=True,
              type=click.Path(file_okay=False), help="Folder for results.json and results.png.")
@click.option("--quick", is_flag=True, help="Small sizes and short rows: a smoke run.")
@click.option("--only", multiple=True, metavar="NAME",
              help="Run only rows whose data set, loader or data/loader matches (glob); "
              "'fit' names the Keras fit comparison, which runs otherwise only without --only.")
@click.option("--workers", help="Daemon worker counts, e.g. 1,2,4 (default 1,2,N with "
              "N = max(4, 2 x CPUs)); the Keras and tensorpack rows use N processes.")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--synthetic-count", type=int, help="Synthetic images in the database "
              "[default: 2000, --quick 200].")
@click.option("--synthetic-shape", default="64,64,3", show_default=True, type=shape_option)
@click.option("--large-shape", default="224,224,3", show_default=True, type=shape_option,
              help="Image shape of the database-free rows with large batches.")
@click.option("--large-count", default=256, show_default=True)
@click.option("--seconds", type=float, help="Steady-state seconds per row "
              "[default: 12, --quick 1].")
@click.option("--fit-epochs", type=int, help="Epochs of the Keras fit comparison "
              "(0: skip) [default: 20, --quick 0].")
@click.option("--scale-count", type=int, help="Small documents (8x8 pixels and a label) in "
              "the large collection, read by one raw cursor and by mongofeed in each order "
              "(0: skip) [default: 200000, --quick 0].")
@click.option("--scale-seconds", type=float, help="Steady-state seconds of the large "
              "collection's rows, long enough to cross epochs [default: 60].")
@click.option("--planner", "planner_counts", multiple=True, type=int, metavar="N",
              help="Instead of the loaders: the planner at N synthetic ids (repeatable), "
              "no database: bytes per id, listing, sort, order, the loop's longest "
              "iteration under 8 consumers.")
@click.option("--planner-kinds", default="objectid,int64", show_default=True,
              help="Id types of --planner.")
@click.option("--planner-legacy", is_flag=True,
              help="With --planner: also mongofeed 0.1's planner at the same N.")
@click.option("--mixing", is_flag=True, help="Instead of the loaders: how well the full and "
              "the windowed order mix 1,000,000 class-sorted documents (no database).")


def bench(uri, database, metrics_url, output, quick, only, workers, batch_size,
          synthetic_count, synthetic_shape, large_shape, large_count, seconds, fit_epochs,
          scale_count, scale_seconds, planner_counts, planner_kinds, planner_legacy, mixing):
    """Benchmark mongofeed against the usual Keras loaders on the same server and data."""
    if mixing:
        from .mixing import format_mixing
        from .mixing import mixing as measure_mixing

        click.echo(format_mixing(measure_mixing()))
        if not planner_counts:
            return
    if planner_counts:
        from .planner import KINDS, run_planner_bench

        kinds = planner_kinds.split(",")
        if not set(kinds) <= set(KINDS):
            raise click.BadParameter(f"id types are {', '.join(KINDS)}",
                                     param_hint="--planner-kinds")
        run_planner_bench(list(planner_counts), kinds, seconds or 10.0, 1000, planner_legacy,
                          output, click.echo)
        return
    if not uri:
        raise click.UsageError("--uri (or MONGOFEED_URI) is required but with --planner")
    import pymongo

    cpus = os.cpu_count() or 1
    n = max(4, 2 * cpus)
    worker_counts = [int(w) for w in workers.split(",")] if workers else (
        [1, 2] if quick else [1, 2, n])
    n = max(worker_counts)
    seconds = seconds if seconds is not None else (1.0 if quick else 12.0)
    fit_epochs = fit_epochs if fit_epochs is not None else (0 if quick else 20)
    synthetic_count = synthetic_count or (200 if quick else 2000)
    scale_count = scale_count if scale_count is not None else (0 if quick else 200_000)
    scale_seconds = scale_seconds if scale_seconds is not None else 60.0
    if quick:
        large_shape, large_count = (64, 64, 3), 64
    client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000)
    try:
        build = client.admin.command("buildInfo")
    except pymongo.errors.PyMongoError as exc:
        raise click.ClickException(f"cannot reach the server at --uri: {exc}") from None
    datasets = load_datasets(client, database, synthetic_count, synthetic_shape)
    if quick:
        datasets = datasets[:1]  # digits; the large-batch rows below run from memory
    if scale_count:
        datasets.append(load_scale(client, database, scale_count, scale_seconds))
    client.close()
    datasets.append({"name": f"synthetic{large_shape[0]}-mem", "database": None,
                     "collection": None, "x_path": "image", "y_path": "label",
                     "shape": list(large_shape), "scale": 1 / 255, "filter": {"split": "train"},
                     "count": large_count})
    rows = plan_rows(datasets, worker_counts, n, only)
    base = {"uri": uri, "metrics_url": metrics_url, "batch_size": batch_size,
            "seconds": seconds}
    results = []
    click.echo(f"mongofeed bench: {len(rows)} rows, {seconds:g} s each at most, server "
               f"{server_name(build)}, {cpus} CPUs, Keras on {keras_backend()}")
    for i, (data, loader, w) in enumerate(rows, 1):
        label = f"[{i:>2}/{len(rows)}] {data['name']:<18} {row_name(loader, w):<22}"
        click.echo(label, nl=False)
        spec = {**base, "loader": loader, "workers": w, "data": data,
                "max_batches": 10**9, "seconds": data.get("seconds", seconds),
                "reply_docs": max(1, min(1000, 4_000_000 // (4 * max(1, _prod(data["shape"])))))}
        if data["database"] is None or loader in MEMORY_LOADERS:
            spec.update(uri=None, metrics_url=None)
        if loader in ("memcpy", "zmq-loopback"):
            spec["seconds"] = min(seconds, SHORT_ROW_S)
        result = run_process(spec, "row_main", spec["seconds"] + ROW_TIMEOUT_EXTRA_S)
        result.update(data=data["name"], loader=loader, name=row_name(loader, w), workers=w)
        results.append(result)
        click.echo(describe(result))
    fit = None
    if fit_epochs and (not only or "fit" in only):
        digits = next(d for d in datasets if d["name"] == "digits")
        click.echo(f"[fit] demo model on digits, {fit_epochs} epochs each from numpy, a "
                   f"PyDataset, mongofeed from memory (shared memory, tcp) and from the "
                   f"database ({n} workers) ... ", nl=False)
        fit = run_process({**base, "data": digits, "workers": n, "epochs": fit_epochs},
                          "fit_main", 600.0)
        click.echo(f"slowdown {fit['slowdown']:+.0%}" if "slowdown" in fit else
                   fit.get("error", "failed"))
    targets = evaluate_targets(results, fit)
    report = {"machine": machine(cpus), "server": {"name": server_name(build)},
              "options": {"quick": quick, "workers": worker_counts, "batch_size": batch_size,
                          "seconds": seconds, "synthetic_count": synthetic_count,
                          "synthetic_shape": synthetic_shape, "large_shape": large_shape,
                          "large_count": large_count, "scale_count": scale_count,
                          "scale_seconds": scale_seconds, "database": database},
              "datasets": datasets, "rows": results, "fit": fit, "targets": targets}
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    table = format_table(results)
    (out / "results.md").write_text(table + "\n\n" + format_targets(targets) + "\n")
    chart = write_chart(results, out / "results.png") if results else None
    click.echo("\n" + table + "\n\n" + format_targets(targets))
    click.echo(f"\nwrote {out / 'results.json'}, {out / 'results.md'}"
               + (f", {chart}" if chart else ""))


# -- data ------------------------------------------------------------------------------------------

def load_datasets(client, database: str, synthetic_count: int, shape) -> list:
    """Load digits and the synthetic images (dropping earlier copies); describe both."""
    from ..tools.load import load_digits, load_synthetic

    db = client[database]
    click.echo(f"loading digits and {synthetic_count} synthetic {'x'.join(map(str, shape))} "
               f"images into {database} ... ", nl=False)
    started = time.perf_counter()
    digits = load_digits(db["digits"], drop=True)
    name = f"synthetic{shape[0]}"
    synthetic = load_synthetic(db[name], synthetic_count, shape=shape, drop=True)
    click.echo(f"{time.perf_counter() - started:.1f} s")
    common = {"database": database, "filter": {"split": "train"}}
    return [
        {**common, "name": "digits", "collection": "digits", "x_path": "pixels",
         "y_path": "target", "shape": [8, 8, 1], "scale": 0.0625, "count": digits["train"]},
        {**common, "name": name, "collection": name, "x_path": "image", "y_path": "label",
         "shape": list(shape), "scale": 1 / 255, "count": synthetic["train"]},
    ]


def load_scale(client, database: str, count: int, seconds: float) -> dict:
    """The large collection: ``count`` small documents (8x8x1 pixels and a label), every one
    in the feed (an empty filter, so the listing is index-only)."""
    from ..tools.load import load_synthetic

    name = f"scale{count // 1000}k"
    click.echo(f"loading {count} small documents into {database}.{name} ... ", nl=False)
    started = time.perf_counter()
    loaded = load_synthetic(client[database][name], count, shape=(8, 8, 1), drop=True)
    click.echo(f"{time.perf_counter() - started:.1f} s")
    return {"name": name, "database": database, "collection": name, "x_path": "image",
            "y_path": "label", "shape": [8, 8, 1], "scale": 1 / 255, "filter": {},
            "count": loaded["total"], "seconds": seconds}


def plan_rows(datasets: list, worker_counts: list, n: int, only) -> list:
    rows = []
    for data in datasets:
        if data["database"] is None:
            loaders = [("ceiling", n), ("ceiling-tcp", n), ("zmq-loopback", 1), ("memcpy", 1)]
        elif data.get("seconds"):  # the large collection: the two orders and the server
            loaders = [("mongofeed", n), ("mongofeed-window", n), ("raw-drain", 1)]
        else:
            loaders = [("mongofeed", w) for w in worker_counts] + [
                ("mongofeed-window", n)] + [(name, n) for name in OTHER_LOADERS] + [
                ("raw-drain", 1), ("ceiling", n), ("ceiling-tcp", n), ("memcpy", 1)]
            if data["name"].startswith("synthetic"):  # images worth cropping
                loaders += [("mongofeed-augment", n), ("keras-augment", n)]
        for loader, w in loaders:
            name = row_name(loader, w)
            if not only or any(fnmatch.fnmatch(key, pattern) for pattern in only
                               for key in (data["name"], name, loader, f"{data['name']}/{name}")):
                rows.append((data, loader, w))
    return rows


def row_name(loader: str, workers: int) -> str:
    daemon = loader in ("mongofeed", "mongofeed-window", "ceiling", "ceiling-tcp",
                        "mongofeed-augment")
    return f"{loader}-w{workers}" if daemon else loader


def _prod(shape) -> int:
    total = 1
    for d in shape:
        total *= d
    return total


# -- running a row -------------------------------------------------------------------------------

def run_process(spec: dict, entry: str, timeout: float) -> dict:
    """Run ``bench_peers.<entry>`` with ``spec``; sample its tree's memory; kill what is left."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p),
        "KERAS_BACKEND": keras_backend(),
        "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen(
        [sys.executable, "-c", f"from mongofeed.bench.rows import {entry}; {entry}()",
         json.dumps(spec)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env, **own_process_group())
    memory = MemorySampler(process.pid)
    result, tail = None, []

    def read():
        nonlocal result
        for line in process.stdout:
            if line.startswith("@baseline"):
                memory.start()
            elif line.startswith("@measured"):
                memory.stop()
            elif line.startswith("@result "):
                result = json.loads(line[len("@result "):])
            else:
                tail.append(line.rstrip())
                del tail[:-30]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        memory.stop()
        kill_process_group(process)  # its Keras pool, tensorpack runner, ...
        process.wait()
        reader.join(5)
    if result is None:
        return {"error": "row failed:\n    " + "\n    ".join(tail[-12:])}
    if memory.peak is not None:
        result["peak_mb"] = memory.peak / 1e6
    return result


class MemorySampler:
    """Peak memory (PSS, so pages shared by forked workers count once) that a row's process
    tree holds above what its own process held when its loader started."""

    def __init__(self, pid: int):
        self.pid = pid
        self.baseline = self.peak = None
        self.running = threading.Event()
        self.thread = None

    def tree_bytes(self) -> int:
        import psutil

        try:
            root = psutil.Process(self.pid)
            processes = [root] + root.children(recursive=True)
        except psutil.Error:
            return 0
        total = 0
        for p in processes:
            try:
                info = p.memory_full_info()
                total += getattr(info, "pss", info.rss)
            except psutil.Error:
                pass
        return total

    def start(self):
        try:
            import psutil  # noqa: F401
        except ImportError:
            return
        self.baseline = self.tree_bytes()
        self.peak = 0
        self.running.set()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self):
        while self.running.is_set():
            self.peak = max(self.peak, self.tree_bytes() - self.baseline)
            time.sleep(MEMORY_SAMPLE_S)

    def stop(self):
        self.running.clear()
        if self.thread is not None:
            self.thread.join()
            self.thread = None


def describe(result: dict) -> str:
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    if "error" in result:
        return result["error"]
    return (f"{result['samples_per_s']:>9.1f} samples/s  {result['mb_per_s']:>8.1f} MB/s  "
            f"({result['batches']:.0f} batches in {result['seconds']:.1f} s, "
            f"startup {result['startup_s']:.1f} s)")
