"""The optional Prometheus endpoint of `mongofeed serve --metrics-port`: the numbers of
`mongofeed status`, read at scrape time, from a real daemon."""

from __future__ import annotations

import urllib.request

import pytest

from mongofeed import Consumer
from mongofeed.daemon.config import parse_config
from mongofeed.errors import ConfigError
from mongofeed.testing import Daemon, free_port_pair, parse_prometheus
from tests.support import insert_samples, sample_config, write_toml

pytest.importorskip("prometheus_client", reason="the 'metrics' extra is not installed")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def test_metrics_match_status(mongo_uri, db, tmp_path):
    insert_samples(db.samples, 40, val=8)
    path = write_toml(tmp_path / "c.toml", sample_config(mongo_uri, db.name))
    port = free_port_pair()
    with Daemon(path, workers=2, args=["--metrics-port", str(port)]) as daemon:
        with Consumer(daemon.bind, feed="train") as consumer:
            batches = list(consumer.epoch())
            text = scrape(port)
            status = daemon.status()
        assert parse_prometheus(text, "mongofeed_sessions") == 1
        assert parse_prometheus(text, "mongofeed_failing_sessions") == 0
        assert parse_prometheus(text, "mongofeed_lingering_connections") == 0
        assert parse_prometheus(text, "mongofeed_sessions_opened_total") == 1
        assert 'mongofeed_worker_batches_total{worker="1"}' in text
        delivered = parse_prometheus(text, "mongofeed_session_delivered_batches_total")
        assert delivered >= len(batches) == 4
        produced = parse_prometheus(text, "mongofeed_worker_batches_total")
        assert produced <= sum(w["batches"] for w in status["workers"])
        assert produced >= delivered
        assert parse_prometheus(text, "mongofeed_worker_documents_total") >= 32
        assert "mongofeed_rejected_messages_total 0.0" in text
        for counter, value in status["counters"].items():
            assert f"\nmongofeed_{counter}_total {float(value)}\n" in text, counter


def test_metrics_port_is_checked():
    config = sample_config("mongodb://127.0.0.1", "db", serve={"metrics_port": 70000})
    with pytest.raises(ConfigError, match="serve.metrics_port"):
        parse_config(config)
