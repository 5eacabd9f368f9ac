"""Command line: ``mongofeed serve | status | inspect | load | keygen | bench``.

Each command only builds the object that does the work and runs it. Every option can also
come from an environment variable (shown in ``--help``); options win over the environment,
which wins over the config file. Errors the user caused become one clear message.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import sys
import time

import click

from .. import __version__
from ..daemon.config import load_config, load_source
from ..errors import ConfigError, MongoFeedError
from ..portable import INTERNAL_TRANSPORT_ENV, INTERNAL_TRANSPORTS
from ..security import redact_uri

LOG_LEVELS = ("debug", "info", "warning", "error")


def config_options(func):
    """Options shared by every command that reads the config file."""
    options = [
        click.option("--config", "-c", "config_path", envvar="MONGOFEED_CONFIG",
                     type=click.Path(dir_okay=False), help="TOML config file."),
        click.option("--uri", envvar="MONGOFEED_URI", help="MongoDB URI (source.uri)."),
        click.option("--database", envvar="MONGOFEED_DATABASE", help="source.database"),
        click.option("--collection", envvar="MONGOFEED_COLLECTION", help="source.collection"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def log_option(func):
    @click.option("--log-level", envvar="MONGOFEED_LOG_LEVEL", default="warning",
                  type=click.Choice(LOG_LEVELS, case_sensitive=False), show_default=True,
                  help="How much to log (to stderr).")
    @functools.wraps(func)
    def wrapper(*args, log_level, **kwargs):
        level = getattr(logging, log_level.upper())
        logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        return func(*args, log_level=level, **kwargs)

    return wrapper


def source_overrides(uri, database, collection) -> dict:
    return {"source.uri": uri, "source.database": database, "source.collection": collection}


def user_errors(func):
    """Turn the errors a user can cause into one message and a non-zero exit."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            raise click.UsageError(str(exc)) from None
        except MongoFeedError as exc:
            raise click.ClickException(redact_uri(str(exc))) from None

    return wrapper


class LazyGroup(click.Group):
    """A group that imports some subcommands only when they are invoked or listed in help:
    the benchmark is not part of the daemon or the tools, and costs nothing until asked for."""

    def __init__(self, *args, lazy_subcommands: dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_subcommands = lazy_subcommands  # name -> "module:attribute"

    def list_commands(self, ctx) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy_subcommands])

    def get_command(self, ctx, name: str):
        if name not in self.lazy_subcommands:
            return super().get_command(ctx, name)
        module, attribute = self.lazy_subcommands[name].split(":")
        command = getattr(importlib.import_module(module), attribute)
        show_environment_variables(command)
        return command


@click.group(cls=LazyGroup, lazy_subcommands={"bench": "mongofeed.bench.command:bench"},
             context_settings={"auto_envvar_prefix": "MONGOFEED"},
             epilog="Example:\n\n\b\n  mongofeed load digits --uri mongodb://127.0.0.1:27017 "
             "--database mongofeed_demo --collection digits\n"
             "  mongofeed serve --config configs/digits.toml --workers 8\n"
             "  mongofeed status")
@click.version_option(__version__, "--version", prog_name="mongofeed")
def main():
    """Feed training data stored in MongoDB to Keras, fast and safely."""


@main.command(epilog="Example:\n\n\b\n  mongofeed serve --config configs/digits.toml --workers 8")
@config_options
@click.option("--workers", "-w", type=int, envvar="MONGOFEED_WORKERS",
              help="Producer processes, one MongoClient each (serve.workers).")
@click.option("--bind", envvar="MONGOFEED_BIND",
              help="Data endpoint consumers connect to (serve.bind), e.g. tcp://127.0.0.1:5555.")
@click.option("--control", envvar="MONGOFEED_CONTROL",
              help="Control endpoint (serve.control; default: bind port + 1).")
@click.option("--shard", envvar="MONGOFEED_SHARD", metavar="r/R",
              help="Serve part r of R of every epoch (serve.shard), e.g. 0/4 on the first of "
              "four trainer hosts.")
@click.option("--ordered/--unordered", default=None, envvar="MONGOFEED_ORDERED",
              help="Deliver batches in plan order (serve.ordered; default: ordered).")
@click.option("--metrics-port", type=click.IntRange(1, 65535), envvar="MONGOFEED_METRICS_PORT",
              help="Serve Prometheus metrics on 127.0.0.1:PORT (serve.metrics_port).")
@click.option("--server-key", envvar="MONGOFEED_SERVER_KEY", type=click.Path(dir_okay=False),
              help="CurveZMQ secret key file of the daemon (serve.server_key; from "
              "'mongofeed keygen').")
@click.option("--client-keys", envvar="MONGOFEED_CLIENT_KEYS", type=click.Path(file_okay=False),
              help="Folder of accepted client public keys, *.key (serve.client_keys).")
@click.option("--insecure", is_flag=True, default=None, envvar="MONGOFEED_INSECURE",
              help="Allow a non-loopback --bind without CurveZMQ keys (serve.insecure).")
@click.option("--internal-transport", type=click.Choice(INTERNAL_TRANSPORTS),
              envvar=INTERNAL_TRANSPORT_ENV,
              help="Sockets between the daemon's own processes (serve.internal_transport; "
              "default auto: ipc where ZeroMQ has it, else loopback tcp).")
@log_option
@user_errors
def serve(config_path, uri, database, collection, workers, bind, control, shard, ordered,
          metrics_port, server_key, client_keys, insecure, internal_transport, log_level):
    """Serve batches from MongoDB until stopped with Ctrl-C or SIGTERM."""
    from ..daemon.supervisor import Supervisor

    config = load_config(config_path, {
        **source_overrides(uri, database, collection), "serve.workers": workers,
        "serve.bind": bind, "serve.control": control, "serve.ordered": ordered,
        "serve.shard": shard, "serve.metrics_port": metrics_port,
        "serve.server_key": server_key, "serve.client_keys": client_keys,
        "serve.insecure": insecure, "serve.internal_transport": internal_transport,
    })
    supervisor = Supervisor(config, log_level=log_level)
    supervisor.serve(on_ready=lambda: announce_ready(supervisor))
    click.echo("mongofeed stopped")


def announce_ready(supervisor):
    """The one line that tells scripts the daemon serves (they wait for its prefix)."""
    config = supervisor.config
    feeds = ", ".join(f"{name} ({plan.batches_per_epoch(config.serve.shard)} batches/epoch)"
                      for name, plan in supervisor.plans.items())
    click.echo(f"mongofeed ready: data {config.serve.bind} control {config.serve.control} "
               f"workers {config.serve.workers} feeds {feeds}")
    sys.stdout.flush()


@main.command(epilog="Example:\n\n\b\n  mongofeed keygen daemon --dir keys\n"
              "  mongofeed keygen trainer1 --dir keys/clients")
@click.argument("name")
@click.option("--dir", "folder", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Folder for NAME.key (public) and NAME.key_secret (private).")
def keygen(name, folder):
    """Write a CurveZMQ key pair for the daemon (--server-key) or a client (its public key
    goes in the daemon's --client-keys folder)."""
    from ..security import keygen as write_keys

    public, secret = write_keys(folder, name)
    click.echo(f"public key {public}\nsecret key {secret} (keep it private)")


@main.command(epilog="Example:\n\n\b\n  mongofeed status --control tcp://127.0.0.1:5556 --watch")
@click.option("--control", envvar="MONGOFEED_CONTROL", default="tcp://127.0.0.1:5556",
              show_default=True, help="The daemon's control endpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
@click.option("--watch", is_flag=True, help="Refresh every --interval seconds until Ctrl-C.")
@click.option("--interval", default=2.0, show_default=True, help="Seconds between refreshes.")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for an answer.")
@click.option("--server-key", envvar="MONGOFEED_SERVER_KEY", type=click.Path(dir_okay=False),
              help="The daemon's CurveZMQ public key file (.key), if it uses keys.")
@click.option("--client-key", envvar="MONGOFEED_CLIENT_KEY", type=click.Path(dir_okay=False),
              help="This client's CurveZMQ secret key file (.key_secret), listed by the "
              "daemon's --client-keys.")
@user_errors
def status(control, as_json, watch, interval, timeout, server_key, client_key):
    """Show the daemon's workers, sessions and feeds."""
    from ..consumer import daemon_status

    if bool(server_key) != bool(client_key):
        raise click.UsageError("--server-key and --client-key go together (a daemon with "
                               "CurveZMQ keys needs both; one without needs neither)")
    previous = None
    while True:
        current = daemon_status(control, timeout, server_key, client_key)
        if as_json:
            click.echo(json.dumps(current, indent=2))
        else:
            if watch:
                click.clear()
            click.echo(format_status(current, previous, interval))
        if not watch:
            return
        previous = current
        time.sleep(interval)


def format_status(status: dict, previous: dict | None, interval: float) -> str:
    """A human table; rates come from the previous sample, or the average since start."""
    span = interval if previous else max(status["uptime_s"], 1e-9)
    before = {w["slot"]: w for w in previous["workers"]} if previous else {}
    source = status["source"]
    lines = [(f"mongofeed {status['version']} pid {status['pid']} up {status['uptime_s']:.0f} s"
              f"  source {source['uri']} {source['database']}.{source['collection']}"),
             (f"data {status['endpoints']['data']}  control {status['endpoints']['control']}  "
              f"pending tasks {status['pending_tasks']}  memory bound "
              f"{status['memory_bound_bytes'] / 2**20:.1f} MiB"),
             "",
             (f"{'worker':>6} {'pid':>7} {'state':<20} {'batches':>8} {'docs/s':>9} "
              f"{'MB/s':>7} {'restarts':>8} {'skips':>6} {'errors':>6}")]
    for w in status["workers"]:
        old = before.get(w["slot"], {"docs": 0, "bytes": 0})
        lines.append(f"{w['slot']:>6} {w['pid'] or '-':>7} {w['state']:<20} {w['batches']:>8} "
                     f"{(w['docs'] - old['docs']) / span:>9.0f} "
                     f"{(w['bytes'] - old['bytes']) / span / 1e6:>7.1f} {w['restarts']:>8} "
                     f"{w['skips']:>6} {w['errors']:>6}")
    lines += ["", f"{'feed':<10} {'documents':>10} {'batches/epoch':>14}"]
    for name, feed in status["feeds"].items():
        lines.append(f"{name:<10} {feed['samples_per_epoch']:>10} {feed['batches_per_epoch']:>14}")
        for source in feed.get("sources", []):
            lines.append(f"  source {source['name']}: {source['draws']} of {source['documents']}"
                         f" documents per epoch ({source['copies']:.3g} copies)")
    lines += ["", (f"{'session':<17} {'feed':<8} {'shard':<6} {'epoch':>6} {'progress':>12} "
                   f"{'waiting':>8} {'skips':>6} {'idle s':>7}")]
    for s in status["sessions"]:
        lines.append(f"{s['session']:<17} {s['feed']:<8} {s['shard']:<6} {s['epoch']:>6} "
                     f"{s['batch']:>5}/{s['batches_per_epoch']:<6} {s['waiting']:>8} "
                     f"{s['skips']:>6} {s['idle_s']:>7}")
    for s in status["sessions"]:
        drawn = s.get("drawn") or {}
        total = sum(drawn.values())
        if total:
            lines.append(f"{s['session']} drawn: " + ", ".join(
                f"{name} {count} ({count / total:.1%})" for name, count in drawn.items()))
    for s in status["sessions"]:
        failing = s.get("failing")
        if failing:
            lines.append(f"{s['session']} fails at epoch {failing['epoch']}, batch "
                         f"{failing['batch']}, when its consumer gets there: {failing['error']}")
    if not status["sessions"]:
        lines.append("(no consumer connected)")
    counters = ", ".join(f"{k} {v}" for k, v in status["counters"].items())
    lines += ["", f"counters: {counters}"]
    lines += [f"error: {e}" for e in status["errors"][-5:]]
    return "\n".join(lines)


@main.command(epilog="Example:\n\n\b\n  mongofeed inspect --config configs/digits.toml --feed val")
@config_options
@click.option("--feed", help="Feed whose first batch the dry run decodes (default: the first).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@user_errors
def inspect(config_path, uri, database, collection, feed, as_json):
    """Check the config against the data: counts, a sample document, one decoded batch."""
    from .inspect import format_report, inspect_source

    config = load_config(config_path, source_overrides(uri, database, collection))
    report = inspect_source(config, feed)
    click.echo(json.dumps(report, indent=2, default=str) if as_json else format_report(report))


@main.group(epilog="Example:\n\n\b\n  mongofeed load digits --config configs/digits.toml --drop")
def load():
    """Put training data into MongoDB (digits, .npz files, synthetic data, image folders)."""


def load_command(name):
    """Shared wiring of every `load` subcommand: target collection, --drop, a progress bar."""
    def decorate(func):
        @load.command(name)
        @config_options
        @click.option("--drop", is_flag=True, help="Drop the collection first (start afresh).")
        @click.option("--seed", default=0, show_default=True, help="Seed of the split/data.")
        @user_errors
        @functools.wraps(func)
        def command(config_path, uri, database, collection, drop, seed, **kwargs):
            import pymongo

            source = load_source(config_path, source_overrides(uri, database, collection))
            client = pymongo.MongoClient(source.uri, serverSelectionTimeoutMS=5000)
            try:
                target = client[source.database][source.collection]
                with click.progressbar(length=1, label=f"loading {name}") as bar:
                    def progress(done, total):
                        bar.length = total
                        bar.update(done - bar.pos)
                    counts = func(target, drop=drop, seed=seed, progress=progress, **kwargs)
            except (ValueError, OSError) as exc:
                raise click.ClickException(str(exc)) from None
            except pymongo.errors.PyMongoError as exc:
                from ..daemon.source import describe_failure

                raise click.ClickException(describe_failure(source, exc)) from None
            finally:
                client.close()
            summary = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "classes")
            click.echo(f"loaded into {source.database}.{source.collection}: {summary}")
        return command
    return decorate


@load_command("digits")
@click.option("--val-fraction", default=0.2, show_default=True)
def load_digits_command(target, val_fraction, **kwargs):
    """scikit-learn's bundled 8x8 digits (1797 images), split into train and val."""
    from .load import load_digits

    return load_digits(target, val_fraction=val_fraction, **kwargs)


@load_command("npz")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--split", help="Put every document in this split (default: random by "
              "--val-fraction).")
@click.option("--val-fraction", default=0.0, show_default=True)
def load_npz_command(target, path, split, val_fraction, **kwargs):
    """Arrays of an .npz file: one document per row, one field per array."""
    from .load import load_npz

    return load_npz(target, path, split=split, val_fraction=val_fraction, **kwargs)


@load_command("synthetic")
@click.argument("count", type=click.IntRange(min=1))
@click.option("--shape", default="64,64,3", show_default=True, help="Image shape, e.g. 224,224,3.")
@click.option("--classes", default=10, show_default=True)
@click.option("--val-fraction", default=0.1, show_default=True)
def load_synthetic_command(target, count, shape, classes, val_fraction, **kwargs):
    """COUNT random uint8 images with integer labels, for benchmarks."""
    from .load import load_synthetic

    try:
        dims = tuple(int(d) for d in shape.split(","))
    except ValueError:
        raise click.BadParameter(f"{shape!r} is not like 64,64,3", param_hint="--shape") from None
    return load_synthetic(target, count, shape=dims, classes=classes, val_fraction=val_fraction,
                          **kwargs)


@load_command("images")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--val-fraction", default=0.2, show_default=True)
def load_images_command(target, folder, val_fraction, **kwargs):
    """An image folder with one sub-folder per class (JPEG/PNG files)."""
    from .load import load_images

    return load_images(target, folder, val_fraction=val_fraction, **kwargs)


def show_environment_variables(command: click.Command):
    """Every option names its environment variable in --help (set explicitly for the shared
    ones like MONGOFEED_URI, else derived: MONGOFEED_<COMMAND>_<OPTION>)."""
    for param in command.params:
        if isinstance(param, click.Option) and param.name not in ("help", "version"):
            param.show_envvar = True
    for sub in getattr(command, "commands", {}).values():
        show_environment_variables(sub)


show_environment_variables(main)
