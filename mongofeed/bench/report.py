"""The benchmark's report: the table, the targets (met or missed, by how much), the chart."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import click

CONNS_CONSTANT = 4  # target: connections accepted per epoch <= workers + this
MEMORY_LOADERS = ("ceiling", "ceiling-tcp", "zmq-loopback", "memcpy")
SHARED_MEMORY_CPU_MS = 0.05  # issue 14: the training process's CPU per batch, any batch size
OTHER_LOADERS = ("keras-forum-posted", "keras-forum-intended", "keras-best-practice",
                 "tensorpack")


def reference_rate(results: list, data: str, loader: str = "") -> float | None:
    """The best mongofeed rate of a data set, either order (the ceiling where no database is
    involved); for an augment row, the best ``mongofeed-augment``."""
    references = ((("mongofeed-augment",),) if loader.endswith("-augment") else
                  (("mongofeed", "mongofeed-window"), ("ceiling",)))
    for loaders in references:
        rates = [r["samples_per_s"] for r in results
                 if r["data"] == data and r["loader"] in loaders and "samples_per_s" in r]
        if rates:
            return max(rates)
    return None


def format_table(results: list) -> str:
    head = ("| data | loader | samples/s | MB/s | mongofeed × | train CPU ms/batch | "
            "conns/epoch | queries/epoch | peak MB |")
    lines = [head, "|" + "---|" * 9]

    def num(value, fmt):
        return "–" if value is None else format(value, fmt)

    for r in results:
        if "samples_per_s" not in r:
            why = r.get("skipped") or r.get("error", "").splitlines()[0]
            lines.append(f"| {r['data']} | {r['name']} | {why} | | | | | | |")
            continue
        ref = reference_rate(results, r["data"], r["loader"])
        ratio = ref / r["samples_per_s"] if ref and r["samples_per_s"] else None
        cpu = r.get("train_cpu_ms_per_batch")
        lines.append(
            f"| {r['data']} | {r['name']} | {r['samples_per_s']:,.0f} | {r['mb_per_s']:,.1f} | "
            f"{num(ratio, '.2f')} | {num(cpu, '.2f' if cpu is None or cpu >= 0.1 else '.3f')} | "
            f"{num(r.get('conns_per_epoch'), 'd')} | {num(r.get('queries_per_epoch'), 'd')} | "
            f"{num(r.get('peak_mb'), ',.0f')} |")
    return "\n".join(lines)


def fastest(rows: list) -> dict | None:
    """The row with the most samples per second, or None."""
    return max(rows, key=lambda r: r["samples_per_s"], default=None)


def first(rows: list) -> dict | None:
    return rows[0] if rows else None


def evaluate_targets(results: list, fit: dict | None) -> list:
    """The issues' targets, each with the measured value, the goal and whether it is met
    (issue 5's "loopback within 2x of the ceiling" gave way to issue 14's ceiling over tcp
    within 0.9x of the loopback)."""
    def rows(data, loader):
        return [r for r in results
                if r["data"] == data and r["loader"] == loader and "samples_per_s" in r]

    targets = []

    def add(name, value, goal, met, detail):
        targets.append({"target": name, "value": value, "goal": goal, "met": met,
                        "detail": detail})

    for data in dict.fromkeys(r["data"] for r in results):
        feed = fastest(rows(data, "mongofeed"))
        copy = first(rows(data, "memcpy"))
        if feed and copy:
            ratio = feed["train_cpu_ms_per_batch"] / copy["train_cpu_ms_per_batch"]
            add(f"{data}: training-side CPU per batch vs memcpy", ratio, "<= 1.5x",
                ratio <= 1.5, f"{feed['name']} {feed['train_cpu_ms_per_batch']:.2f} ms, "
                f"memcpy {copy['train_cpu_ms_per_batch']:.2f} ms")
        augment_target(data, rows, add)
        shared_memory_targets(data, rows, add)
        if not feed:
            continue
        others = [r for name in OTHER_LOADERS for r in rows(data, name)]
        if others:
            best = max(others, key=lambda r: r["samples_per_s"])
            ratio = feed["samples_per_s"] / best["samples_per_s"]
            add(f"{data}: mongofeed vs best other loader", ratio, ">= 1.5x", ratio >= 1.5,
                f"{feed['name']} {feed['samples_per_s']:,.0f}/s, {best['name']} "
                f"{best['samples_per_s']:,.0f}/s")
        for name in ("keras-forum-posted", "keras-forum-intended"):
            for r in rows(data, name):
                ratio = feed["samples_per_s"] / r["samples_per_s"]
                add(f"{data}: mongofeed vs {name}", ratio, ">= 3x", ratio >= 3,
                    f"{r['samples_per_s']:,.1f}/s")
        for r in rows(data, "mongofeed"):
            if r.get("conns_per_epoch") is not None:
                extra = r["conns_per_epoch"] - r["workers"]
                add(f"{data}: connections per epoch, {r['name']}", r["conns_per_epoch"],
                    f"<= W + {CONNS_CONSTANT}", extra <= CONNS_CONSTANT,
                    f"W + {extra} (startup {r['conns_startup']}, steady {r['conns_steady']})")
    for data in dict.fromkeys(r["data"] for r in results):
        windowed = fastest(rows(data, "mongofeed-window"))
        raw = first(rows(data, "raw-drain"))
        if windowed and raw and data.startswith("scale"):
            ratio = windowed["samples_per_s"] / raw["samples_per_s"]
            add(f"{data}: windowed order vs one raw cursor", ratio, ">= 0.5x", ratio >= 0.5,
                f"{windowed['name']} {windowed['samples_per_s']:,.0f}/s, raw-drain "
                f"{raw['samples_per_s']:,.0f}/s")
    if fit and "slowdown" in fit:
        add("digits: Keras fit slowdown from mongofeed vs in-memory numpy", fit["slowdown"],
            "<= 10%", fit["slowdown"] <= 0.10,
            f"epoch {fit['mongofeed_epoch_s']:.3f} s vs {fit['numpy_epoch_s']:.3f} s, "
            f"stall fraction {fit['stall_fraction']:.0%}; a PyDataset over the same arrays "
            f"{fit['pydataset_slowdown']:+.0%}, mongofeed from memory (no database) "
            f"{fit['memory_slowdown']:+.0%}")
    if fit and "memory_slowdown" in fit:
        add("digits: Keras fit slowdown from mongofeed serving from memory over shared memory "
            "vs in-memory numpy", fit["memory_slowdown"], "<= 10%", fit["memory_slowdown"] <= 0.10,
            f"epoch {fit['memory_epoch_s']:.3f} s vs {fit['numpy_epoch_s']:.3f} s"
            + (f" (numpy {fit['numpy_before_epoch_s']:.3f} s first, "
               f"{fit['numpy_after_epoch_s']:.3f} s last)" if "numpy_after_epoch_s" in fit else "")
            + f"; over tcp "
            f"{fit['memory_tcp_slowdown']:+.0%}, a PyDataset over the same arrays "
            f"{fit['pydataset_slowdown']:+.0%}")
    return targets


def shared_memory_targets(data: str, rows, add):
    """Issue 14's targets: the pipeline ceiling (the daemon from memory) near a memcpy over
    shared memory and near the ZeroMQ loopback over tcp, for the large batches; and the
    training process's CPU per batch over shared memory, for every batch size."""
    shm = fastest(rows(data, "ceiling"))
    tcp = fastest(rows(data, "ceiling-tcp"))
    copy = first(rows(data, "memcpy"))
    loop = first(rows(data, "zmq-loopback"))
    if shm and copy and data.endswith("-mem"):
        ratio = shm["samples_per_s"] / copy["samples_per_s"]
        add(f"{data}: pipeline ceiling over shared memory vs memcpy", ratio, ">= 0.8x",
            ratio >= 0.8, f"{shm['name']} {shm['mb_per_s']:,.0f} MB/s, memcpy "
            f"{copy['mb_per_s']:,.0f} MB/s")
    if tcp and loop:
        ratio = tcp["samples_per_s"] / loop["samples_per_s"]
        add(f"{data}: pipeline ceiling over tcp vs the ZeroMQ loopback", ratio, ">= 0.9x",
            ratio >= 0.9, f"{tcp['name']} {tcp['mb_per_s']:,.0f} MB/s, loopback "
            f"{loop['mb_per_s']:,.0f} MB/s")
    if shm and shm.get("train_cpu_ms_per_batch") is not None:
        cpu = shm["train_cpu_ms_per_batch"]
        add(f"{data}: training-process CPU per batch over shared memory", cpu * 1000,
            f"<= {SHARED_MEMORY_CPU_MS * 1000:.0f} us", cpu <= SHARED_MEMORY_CPU_MS,
            f"{shm['name']} {cpu * 1000:.0f} us ({shm['batch_bytes'] / 1e6:,.2f} MB batches"
            + (f", Consumer.get alone {shm['consumer_us']:.0f} us" if shm.get("consumer_us")
               else "") + "); "
            + (f"over tcp {tcp['train_cpu_ms_per_batch'] * 1000:,.0f} us; " if tcp else "")
            + wake_note(shm))


def wake_note(row: dict) -> str:
    """What this machine charges a trainer for waiting between batches (``wake_cost``) and
    what ZeroMQ, or a datagram, alone costs it per batch at that pace (``recv_cost``)."""
    if row.get("work_us") is None:
        return ""
    note = (f"this machine runs the same fixed Python work in {row['work_us']:.0f} us back to "
            f"back, {row['work_after_gap_us']:.0f} us after the row's "
            f"{row['wake_gap_ms']:.1f} ms wait per batch")
    if row.get("recv_us") is not None:
        note += (f"; a bare pyzmq recv of one small message every {row['recv_gap_ms']:.1f} ms "
                 f"costs {row['recv_us']:.0f} us of process CPU")
    if row.get("channel_us") is not None:
        note += f", a bare datagram recv {row['channel_us']:.0f} us"
    if row.get("channel_busy_us") is not None:
        note += f" ({row['channel_busy_us']:.0f} us with every CPU busy copying memory)"
    return note


def augment_target(data: str, rows, add):
    """Issue 11's target: with a CPU-heavy per-sample transform, mongofeed's training process
    spends at most 10% of the transform's cost in the data path (the transform runs in the
    daemon's workers), where the peer Sequence pays all of it in its ``__getitem__``."""
    feed = fastest(rows(data, "mongofeed-augment"))
    peer = first(rows(data, "keras-augment"))
    if not (feed and peer and feed.get("transform_ms_per_batch")):
        return
    cost = feed["transform_ms_per_batch"]
    share = feed["train_cpu_ms_per_batch"] / cost
    add(f"{data}: training-process CPU in the data path with a per-sample transform, "
        f"as a share of the transform's cost", share, "<= 10%", share <= 0.10,
        f"transform {cost:.1f} ms/batch; {feed['name']} {feed['train_cpu_ms_per_batch']:.2f} "
        f"ms/batch, keras-augment {peer['train_cpu_ms_per_batch']:.1f} ms/batch "
        f"({peer['train_cpu_ms_per_batch'] / cost:.0%}); {feed['samples_per_s']:,.0f} vs "
        f"{peer['samples_per_s']:,.0f} samples/s")


def format_targets(targets: list) -> str:
    lines = ["| target | measured | goal | met | detail |", "|---|---|---|---|---|"]
    for t in targets:
        value = t["value"]
        shown = (f"{value:+.0%}" if "slowdown" in t["target"] else
                 f"{value:.0%}" if t["goal"].endswith("%") else
                 f"{value:,.0f} us" if t["goal"].endswith(" us") else
                 f"{value:d}" if isinstance(value, int) else f"{value:.2f}x")
        lines.append(f"| {t['target']} | {shown} | {t['goal']} | "
                     f"{'yes' if t['met'] else '**no**'} | {t['detail']} |")
    return "\n".join(lines)


def write_chart(results: list, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        click.echo("(matplotlib is not installed: no chart)")
        return None
    groups = list(dict.fromkeys(r["data"] for r in results))
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 2.4 + 0.42 * len(results)),
                             squeeze=False)
    for ax, data in zip(axes[:, 0], groups, strict=True):
        mine = [r for r in results if r["data"] == data and "samples_per_s" in r]
        names = [r["name"] for r in mine]
        rates = [r["samples_per_s"] for r in mine]
        colors = ["tab:green" if r["loader"].startswith("mongofeed") else
                  "tab:gray" if r["loader"] in MEMORY_LOADERS + ("raw-drain",) else
                  "tab:orange" for r in mine]
        ax.barh(names, rates, color=colors)
        ax.set_xscale("log")
        if rates:  # bars start a decade below the slowest, so that lengths compare
            ax.set_xlim(left=min(rates) / 10)
        ax.invert_yaxis()
        ax.set_title(data)
        for y, rate in enumerate(rates):
            ax.text(rate, y, f" {rate:,.0f}", va="center", fontsize=8)
    axes[-1, 0].set_xlabel("samples/s (log scale); green: mongofeed, orange: other loaders, "
                           "gray: ceilings")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def server_name(build: dict) -> str:
    if "ferretdbVersion" in build:
        return f"FerretDB {build['ferretdbVersion']} (wire as MongoDB {build.get('version')})"
    return f"MongoDB {build.get('version')}"


def keras_backend() -> str:
    """The Keras backend of every row and of the fit: the caller's ``KERAS_BACKEND`` (``jax``
    on a machine without TensorFlow, say), else TensorFlow."""
    return os.environ.get("KERAS_BACKEND") or "tensorflow"


def machine(cpus: int) -> dict:
    from importlib import metadata

    versions = {}
    for package in ("numpy", "pymongo", "pyzmq", "keras", "tensorflow-cpu", "tensorflow",
                    "jax", "tensorpack"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": cpus, "processor": platform.processor(), "keras_backend": keras_backend(),
            "versions": versions}
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info
