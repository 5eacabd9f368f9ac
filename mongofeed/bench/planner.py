"""``mongofeed bench --planner N``: the planner at N ids, without a database.

For each id type it builds a plan through the daemon's own code path: a real ``Supervisor``
plans the feed with ``SyntheticSource``, whose listing is the daemon's (raw replies of
``{_id}`` documents streamed into ``IdsBuilder``) with the server's cursor replaced by a
generator of such replies, in random order (an index scan gives them sorted, which skips the
sort). It reports:

- bytes per id the plan keeps (its arrays) and the peak while listing (traced allocations);
- listing (parsing the replies), sorting, and everything else until the plan is ready
  (the digest of the ids);
- the cost of one task's ids (the order at 256 positions and the rows there, as the loop
  plans a task) and of a whole epoch's order (all N positions);
- the loop's longest iteration while 8 consumers, each at another epoch, take batches as fast
  as stub workers (no database) make them.

``--legacy`` adds the figures of mongofeed 0.1's planner at the same N: the ids decoded into a
Python list, sorted with a Python key, and a numpy permutation per epoch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPLY_DOCS = 100_000
BATCH_SIZE = 256
CONSUMERS = 8
EPOCH_CHUNK = 1 << 20
PEAK_SAMPLE_S = 0.02
KINDS = ("objectid", "int64")


def replies(n: int, kind: str, seed: int = 0):
    """Raw replies of ``{_id}`` documents as a server sends them, ``REPLY_DOCS`` each, in
    random order: ObjectIds of random bytes, or distinct random int64s."""
    rng = np.random.default_rng(seed)
    for start in range(0, n, REPLY_DOCS):
        count = min(REPLY_DOCS, n - start)
        if kind == "objectid":
            rows = np.empty((count, 22), np.uint8)
            rows[:, :9] = np.frombuffer(b"\x16\x00\x00\x00\x07_id\x00", np.uint8)
            rows[:, 9:21] = rng.integers(0, 256, (count, 12), np.uint8)
        else:
            rows = np.empty((count, 18), np.uint8)
            rows[:, :9] = np.frombuffer(b"\x12\x00\x00\x00\x12_id\x00", np.uint8)
            values = (np.arange(start, start + count, dtype=np.int64) * 2_654_435_761) % 2**62
            rows[:, 9:17] = values.view(np.uint8).reshape(count, 8)
        rows[:, -1] = 0
        yield rows.tobytes()


class SyntheticSource:
    """A source that lists ``n`` synthetic ids through the daemon's listing code and makes
    no batches (the stub workers answer tasks). Picklable and small: workers get it too."""

    def __init__(self, n: int, kind: str):
        self.n, self.kind = n, kind
        self.timings = {}

    def connect(self, appname: str):
        return _NoClient()

    def list_ids(self, client, query: dict):
        from ..daemon.planner import IdsBuilder

        builder = IdsBuilder()
        parse = 0.0
        for raw in replies(self.n, self.kind):
            started = time.perf_counter()
            builder.add_reply(raw)
            parse += time.perf_counter() - started
        started = time.perf_counter()
        ids = builder.finish()
        self.timings = {"listing_s": parse, "sort_s": time.perf_counter() - started}
        return ids

    def reader(self, client, sample_bytes: int):
        return None


class _NoClient:
    def close(self):
        pass


CONSUMERS_SCRIPT = """
import sys, time
from mongofeed import Consumer
bind, seconds = sys.argv[1], float(sys.argv[2])
consumers, epochs = int(sys.argv[3]), int(sys.argv[4])
feeds = [Consumer(bind, start_epoch=k * epochs // consumers, timeout=120)
         for k in range(consumers)]
print("ready", flush=True)
taken, deadline = 0, time.monotonic() + seconds
while time.monotonic() < deadline:
    for feed in feeds:
        feed.get()
        taken += 1
print(taken, flush=True)
for feed in feeds:
    feed.close()
"""


def loop_under_consumers(supervisor, seconds: float, epochs: int) -> dict:
    """Step ``supervisor``'s loop while ``CONSUMERS`` consumers at epochs spread over
    ``epochs`` take batches in another process; its longest iteration once all are in."""
    from ..daemon.supervisor import LoopClock

    process = subprocess.Popen(
        [sys.executable, "-c", CONSUMERS_SCRIPT, supervisor.config.serve.bind, str(seconds),
         str(CONSUMERS), str(epochs)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p)})
    lines = []

    def stepped_until(condition, timeout: float):
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            supervisor.loop_once(timeout_ms=10)

    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    stepped_until(lambda: lines, 120)
    supervisor.loop_clock = LoopClock()  # from here: all consumers are in
    stepped_until(lambda: len(lines) > 1 or process.poll() is not None, seconds + 120)
    clock = supervisor.loop_clock.status()
    process.wait(30)
    taken = int(lines[1]) if len(lines) > 1 else 0
    return {"loop_longest_ms": clock["longest_ms"], "loop_longest_cpu_ms": clock["longest_cpu_ms"],
            "loop_iterations": clock["iterations"], "batches_per_s": taken / seconds}


def bench_one(n: int, kind: str, seconds: float, epochs: int) -> dict:
    """Plan ``n`` ids of ``kind`` in a real supervisor and measure it (see module doc)."""
    from ..daemon.config import parse_config
    from ..daemon.planner.order import epoch_order
    from ..daemon.supervisor import Supervisor
    from ..testing import free_port_pair, stub_worker

    port = free_port_pair()
    config = parse_config({
        "source": {"database": "synthetic", "collection": kind},
        "batch": {"size": BATCH_SIZE, "seed": 1},
        "fields": {"idx": {"decode": "scalar", "dtype": "int64"}},
        "serve": {"workers": 2, "bind": f"tcp://127.0.0.1:{port}", "plan_cache": "off"}})
    source = SyntheticSource(n, kind)
    supervisor = Supervisor(config, source=source, worker_main=stub_worker)
    before = rss_bytes()
    with PeakRss() as sampled:
        started = time.perf_counter()
        supervisor.start()  # plans the feed, binds the sockets, starts the workers
        ready_s = time.perf_counter() - started
    peak = sampled.peak - before
    try:
        plan = supervisor.plans["train"]
        result = {"n": n, "kind": kind, "bytes_per_id": plan.resident_bytes / n,
                  "rss_bytes_per_id": (rss_bytes() - before) / n,
                  "peak_bytes_per_id": peak / n, **source.timings, "plan_ready_s": ready_s}
        rng = np.random.default_rng(0)
        picks = rng.integers(0, plan.global_batches(), 200)
        started = time.perf_counter()
        for k, g in enumerate(picks.tolist()):
            plan.batch_rows(k, [g])  # what the loop does for a task
        result["batch_us"] = (time.perf_counter() - started) / len(picks) * 1e6
        order = epoch_order(1, 0, n)
        started = time.perf_counter()
        for start in range(0, n, EPOCH_CHUNK):
            order.at(np.arange(start, min(start + EPOCH_CHUNK, n)))
        result["epoch_order_s"] = time.perf_counter() - started
        started = time.monotonic()
        while not supervisor.pool.all_ready() and time.monotonic() - started < 60:
            supervisor.loop_once(timeout_ms=10)
        result.update(loop_under_consumers(supervisor, seconds, epochs))
    finally:
        supervisor.stop()
    return result


def bench_legacy(n: int, kind: str) -> dict:
    """mongofeed 0.1's planner at ``n`` ids: decoded into a list, sorted with a Python key,
    one numpy permutation per epoch (its figures, beside the new ones)."""
    import bson

    def sort_key(value):
        return (type(value).__name__, value)

    before = rss_bytes()
    with PeakRss() as sampled:
        started = time.perf_counter()
        ids = [doc["_id"] for raw in replies(n, kind) for doc in bson.decode_all(raw)]
        listing = time.perf_counter() - started
        started = time.perf_counter()
        ids.sort(key=sort_key)
        sorting = time.perf_counter() - started
    resident = rss_bytes() - before
    started = time.perf_counter()
    np.random.default_rng([1, 0]).permutation(n)
    return {"n": n, "kind": kind, "legacy": True, "bytes_per_id": resident / n,
            "peak_bytes_per_id": (sampled.peak - before) / n, "listing_s": listing,
            "sort_s": sorting, "epoch_order_s": time.perf_counter() - started}


def rss_bytes() -> int:
    """This process's resident memory (Linux's /proc; psutil elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


class PeakRss:
    """The highest resident memory of this process while the block runs (sampled every
    ``PEAK_SAMPLE_S``; the sort and the hash release the GIL, the rest yields it)."""

    def __enter__(self) -> PeakRss:
        self.peak = rss_bytes()
        self.running = threading.Event()
        self.running.set()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while self.running.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(PEAK_SAMPLE_S)

    def __exit__(self, *exc):
        self.running.clear()
        self.thread.join()
        self.peak = max(self.peak, rss_bytes())


def run_planner_bench(counts: list[int], kinds: list[str], seconds: float, epochs: int,
                      legacy: bool, output: str | None, echo) -> list[dict]:
    """Every (N, kind), each in its own process so one's memory does not weigh on the next."""
    results = []
    for n in counts:
        for kind in kinds:
            for old in ([False, True] if legacy else [False]):
                spec = {"n": n, "kind": kind, "seconds": seconds, "epochs": epochs,
                        "legacy": old}
                result = run_spec(spec)
                results.append(result)
                echo(describe(result))
    if output:
        os.makedirs(output, exist_ok=True)
        with open(os.path.join(output, "planner.json"), "w") as f:
            json.dump(results, f, indent=2)
    echo("\n" + format_table(results))
    return results


PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_spec(spec: dict) -> dict:
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.run(
            [sys.executable, "-c", "from mongofeed.bench.planner import spec_main; spec_main()",
             json.dumps(spec)], stdout=out, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p)})
        out.seek(0)
        lines = out.read().splitlines()
    found = [line for line in lines if line.startswith("@result ")]
    if process.returncode or not found:
        return {**spec, "error": "\n".join(lines[-12:])}
    return json.loads(found[-1][len("@result "):])


def spec_main():
    spec = json.loads(sys.argv[1])
    if spec["legacy"]:
        result = bench_legacy(spec["n"], spec["kind"])
    else:
        result = bench_one(spec["n"], spec["kind"], spec["seconds"], spec["epochs"])
    print("@result " + json.dumps(result), flush=True)
    os._exit(0)


def describe(r: dict) -> str:
    name = f"{r['n']:>11,} {r['kind']:<8}{' (0.1)' if r.get('legacy') else ''}"
    if "error" in r:
        return f"{name} failed:\n{r['error']}"
    return (f"{name} {r['bytes_per_id']:6.1f} B/id (peak {r['peak_bytes_per_id']:.0f}), "
            f"listing {r['listing_s']:.2f} s, sort {r['sort_s']:.2f} s, epoch order "
            f"{r['epoch_order_s']:.2f} s" + (
                "" if r.get("legacy") else
                f", ready {r['plan_ready_s']:.2f} s, task {r['batch_us']:.0f} µs, loop "
                f"longest {r['loop_longest_ms']:.1f} ms (CPU {r['loop_longest_cpu_ms']:.1f} ms; "
                f"{r['batches_per_s']:,.0f} batches/s)"))


def format_table(results: list[dict]) -> str:
    lines = ["| ids | type | planner | bytes/id (peak) | listing s | sort s | plan ready s | "
             "one task µs | epoch order s | loop longest ms, wall (CPU) |",
             "|" + "---|" * 10]

    def num(r, key, fmt):
        return "–" if r.get(key) is None else format(r[key], fmt)

    for r in results:
        if "error" in r:
            lines.append(f"| {r['n']:,} | {r['kind']} | failed | | | | | | | |")
            continue
        lines.append(
            f"| {r['n']:,} | {r['kind']} | {'0.1' if r.get('legacy') else 'this'} | "
            f"{r['bytes_per_id']:.1f} ({r['peak_bytes_per_id']:.0f}) | "
            f"{r['listing_s']:.2f} | {r['sort_s']:.2f} | {num(r, 'plan_ready_s', '.2f')} | "
            f"{num(r, 'batch_us', '.0f')} | {r['epoch_order_s']:.2f} | "
            f"{num(r, 'loop_longest_ms', '.1f')} ({num(r, 'loop_longest_cpu_ms', '.1f')}) |")
    return "\n".join(lines)
