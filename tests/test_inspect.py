"""`mongofeed inspect` against the real server: counts, a sample, index hints, a dry run, and
the same clear errors as `serve` for a wrong config or a document that does not fit."""

from __future__ import annotations

import json

from click.testing import CliRunner

from mongofeed.daemon.config import parse_config
from mongofeed.tools.cli import main
from mongofeed.tools.inspect import format_report, inspect_source
from tests.support import insert_samples, sample_config, write_toml


def run_inspect(*args):
    return CliRunner().invoke(main, ["inspect", *args], catch_exceptions=False)


def test_report_counts_sample_and_dry_run(mongo_uri, db):
    insert_samples(db.samples, 50, val=10)
    report = inspect_source(parse_config(sample_config(mongo_uri, db.name)))
    assert report["source"]["documents"] == 50
    assert report["feeds"]["train"]["documents"] == 40
    assert report["feeds"]["train"]["batches_per_epoch"] == 5
    assert report["feeds"]["val"]["batches_per_epoch"] == 2
    assert report["sample"]["fields"]["x"] == {"type": "binary", "size": 16}
    dry = report["dry_run"]
    assert dry["feed"] == "train" and dry["documents"] == 8 and not dry["skipped"]
    assert dry["arrays"]["x"]["dtype"] == "float32" and dry["arrays"]["x"]["shape"] == [8, 4]
    assert dry["arrays"]["label"]["shape"] == [8, 3]
    assert 0 <= dry["arrays"]["idx"]["min"] <= dry["arrays"]["idx"]["max"] < 40
    text = format_report(report)
    assert "16 bytes" in text and "float32" in text


def test_index_hint_until_the_index_exists(mongo_uri, db):
    insert_samples(db.samples, 20, val=4)
    config = parse_config(sample_config(mongo_uri, db.name))
    feeds = inspect_source(config)["feeds"]
    assert feeds["train"]["unindexed"] == ["split"]
    assert feeds["train"]["suggestions"] == ["db['samples'].create_index('split')"]
    db.samples.create_index("split")
    assert inspect_source(config)["feeds"]["train"]["unindexed"] == []


def test_cli_text_and_json(mongo_uri, db, tmp_path):
    insert_samples(db.samples, 30, val=10)
    path = write_toml(tmp_path / "c.toml", sample_config(mongo_uri, db.name))
    result = run_inspect("--config", str(path), "--feed", "val")
    assert result.exit_code == 0, result.output
    assert "dry run: first batch of feed 'val'" in result.output
    assert "create_index('split')" in result.output
    result = run_inspect("--config", str(path), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["feeds"]["val"]["documents"] == 10


def test_wrong_config_is_a_usage_error_naming_key_and_file(mongo_uri, db, tmp_path):
    insert_samples(db.samples, 10)
    config = sample_config(mongo_uri, db.name)
    config["fields"]["x"]["shapes"] = [4]
    path = write_toml(tmp_path / "bad.toml", config)
    result = run_inspect("--config", str(path))
    assert result.exit_code == 2
    assert "fields.x.shapes" in result.output and str(path) in result.output


def test_unknown_feed_is_a_usage_error(mongo_uri, db, tmp_path):
    insert_samples(db.samples, 10)
    path = write_toml(tmp_path / "c.toml", sample_config(mongo_uri, db.name))
    result = run_inspect("--config", str(path), "--feed", "test")
    assert result.exit_code == 2 and "no feed 'test'" in result.output


def test_document_that_does_not_fit_names_id_and_field(mongo_uri, db, tmp_path):
    ids = insert_samples(db.samples, 8)
    db.samples.update_one({"_id": ids[3]}, {"$set": {"x": b"short"}})
    config = sample_config(mongo_uri, db.name, feeds={"all": {"filter": {}, "shuffle": False}})
    path = write_toml(tmp_path / "c.toml", config)
    result = run_inspect("--config", str(path))
    assert result.exit_code == 1
    assert str(ids[3]) in result.output and "field 'x'" in result.output
    assert "16 bytes" in result.output and "found 5 bytes" in result.output


def test_skipped_documents_are_reported(mongo_uri, db):
    ids = insert_samples(db.samples, 8)
    db.samples.update_one({"_id": ids[0]}, {"$unset": {"y": ""}})
    config = sample_config(mongo_uri, db.name, batch={"on_error": "skip"},
                           feeds={"all": {"filter": {}, "shuffle": False}})
    dry = inspect_source(parse_config(config))["dry_run"]
    assert dry["arrays"]["x"]["shape"] == [7, 4]
    assert len(dry["skipped"]) == 1 and "missing" in dry["skipped"][0]


def test_missing_collection_is_named(mongo_uri, db, tmp_path):
    path = write_toml(tmp_path / "c.toml", sample_config(mongo_uri, db.name, "nothing"))
    result = run_inspect("--config", str(path))
    assert result.exit_code == 1 and f"{db.name}.nothing does not exist" in result.output


def test_which_order_suits_the_server_and_a_windowed_dry_run(mongo_uri, db, mongo_client):
    insert_samples(db.samples, 30)
    config = sample_config(mongo_uri, db.name, feeds={"all": {"filter": {},
                                                              "shuffle": "window"}})
    report = inspect_source(parse_config(config))
    order = report["order"]
    ferretdb = "ferretdbVersion" in mongo_client.admin.command("buildInfo")
    # FerretDB reads the collection for every $in; 30 documents fit in any MongoDB's cache
    assert order["recommended"] == ("window" if ferretdb else True), order
    assert report["dry_run"]["documents"] == 8  # the first batch, cut from its window
    text = format_report(report)
    expected = '"window"' if ferretdb else "true"
    assert f"order: shuffle = {expected} suits" in text
