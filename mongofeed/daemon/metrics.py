"""An optional Prometheus endpoint for ``mongofeed serve --metrics-port PORT``.

The numbers are the ones ``mongofeed status`` shows, read on each scrape through a status
function (the supervisor's ``op_status``), so there is one source of truth and nothing to
keep in step. The HTTP server runs in a thread of the supervisor; the status function only
reads (it copies the containers it iterates). Needs ``prometheus-client``
(``pip install 'mongofeed[metrics]'``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..errors import ConfigError, SourceError

log = logging.getLogger(__name__)

METRICS_HOST = "127.0.0.1"  # status data stays on the host; a scraper elsewhere goes via a proxy

# status["workers"][i] key -> (metric name, help)
WORKER_COUNTERS = {
    "batches": ("mongofeed_worker_batches", "Batches a worker produced."),
    "docs": ("mongofeed_worker_documents", "Documents a worker read and decoded."),
    "bytes": ("mongofeed_worker_bytes", "Bytes of arrays a worker produced."),
    "restarts": ("mongofeed_worker_restarts", "Times the supervisor restarted a worker."),
    "skips": ("mongofeed_worker_skips", "Documents a worker skipped (on_error = 'skip')."),
    "errors": ("mongofeed_worker_errors", "Batches that failed with a decode error."),
}
# status["counters"] key -> (metric name, help)
DAEMON_COUNTERS = {
    "sessions_opened": ("mongofeed_sessions_opened", "Consumer sessions opened."),
    "rejected_messages": ("mongofeed_rejected_messages",
                          "Messages refused as malformed or from an unknown session."),
    "dropped_batches": ("mongofeed_dropped_batches",
                        "Batches dropped because their session ended or they were duplicates."),
    "evicted_sessions": ("mongofeed_evicted_sessions",
                         "Silent sessions replaced by a new hello when max_sessions were live."),
    "poison_tasks": ("mongofeed_poison_tasks",
                     "Batches not made again after their worker died twice making them."),
    "windows_read_ahead": ("mongofeed_windows_read_ahead",
                           "Windows of the windowed order read ahead by an idle worker."),
}


class StatusCollector:
    """A custom collector: turns one status dict into metric families on each scrape."""

    def __init__(self, status: Callable[[], dict]):
        self.status = status

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        status = self.status()
        for key, (name, doc) in WORKER_COUNTERS.items():
            family = CounterMetricFamily(name, doc, labels=["worker"])
            for worker in status["workers"]:
                family.add_metric([str(worker["slot"])], worker[key])
            yield family
        for key, (name, doc) in DAEMON_COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=status["counters"].get(key, 0))
        delivered = CounterMetricFamily("mongofeed_session_delivered_batches",
                                        "Batches delivered to a live consumer session.",
                                        labels=["session", "feed", "shard"])
        for session in status["sessions"]:
            delivered.add_metric([session["session"], session["feed"], session["shard"]],
                                 session["delivered"])
        yield delivered
        drawn = CounterMetricFamily("mongofeed_session_drawn_samples",
                                    "Samples delivered to a session of a feed of sources, "
                                    "per source.", labels=["session", "feed", "source"])
        for session in status["sessions"]:
            for source, samples in session.get("drawn", {}).items():
                drawn.add_metric([session["session"], session["feed"], source], samples)
        yield drawn
        yield GaugeMetricFamily("mongofeed_sessions", "Live consumer sessions.",
                                value=len(status["sessions"]))
        yield GaugeMetricFamily("mongofeed_failing_sessions",
                                "Live sessions with a batch that cannot be made: each fails "
                                "there once its consumer has the batches before it.",
                                value=sum(1 for s in status["sessions"] if s.get("failing")))
        yield GaugeMetricFamily("mongofeed_lingering_connections",
                                "Data connections of ended sessions still open (they count "
                                "against max_sessions until they close).",
                                value=status["lingering_connections"])
        yield GaugeMetricFamily("mongofeed_pending_tasks", "Tasks waiting for a free worker.",
                                value=status["pending_tasks"])
        yield GaugeMetricFamily("mongofeed_uptime_seconds", "Seconds since the daemon started.",
                                value=status["uptime_s"])


def start_metrics_server(port: int, status: Callable[[], dict]):
    """Serve ``status`` as Prometheus metrics on 127.0.0.1:``port``; returns the server
    (call ``shutdown()`` to stop it)."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        raise ConfigError("serve.metrics_port needs prometheus-client: "
                          "pip install 'mongofeed[metrics]'") from None
    registry = CollectorRegistry()
    registry.register(StatusCollector(status))
    try:
        server, _thread = start_http_server(port, addr=METRICS_HOST, registry=registry)
    except OSError as exc:
        raise SourceError(f"cannot serve metrics on {METRICS_HOST}:{port}: {exc.strerror}; "
                          f"choose another --metrics-port") from None
    log.info("metrics on http://%s:%d/metrics", METRICS_HOST, port)
    return server
