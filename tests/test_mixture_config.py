"""A feed of sources in the config: the tables it reads, and every fault refused before
anything starts, naming the key and the file. A task's ids per source survive the wire."""

from __future__ import annotations

import numpy as np
import pytest

from mongofeed.daemon.config import load_config, parse_config
from mongofeed.daemon.planner import Weight
from mongofeed.errors import ConfigError, ProtocolError
from mongofeed.wire import SourceIds, TaskMessage, unpack_worker_command
from tests.support import REPO


def with_sources(sources: dict, **feed) -> dict:
    return {
        "source": {"uri": "mongodb://127.0.0.1:27017", "database": "d", "collection": "pets"},
        "feeds": {"train": {**feed, "sources": sources}},
        "fields": {"x": {"decode": "raw", "dtype": "float32", "shape": [4]}},
    }


def test_sources_read_with_their_defaults_and_the_feed_filter():
    config = parse_config(with_sources(
        {"cats": {"filter": {"y": 0}, "proportion": 0.25},
         "dogs": {"collection": "dogs", "proportion": 0.75}},
        filter={"split": "train"}, epoch_size=100))
    feed = config.feeds["train"]
    cats, dogs = feed.sources.values()
    assert (cats.collection, cats.weight, dogs.collection) == (
        "pets", Weight("proportion", 0.25), "dogs")
    assert feed.source_query(cats) == {"$and": [{"split": "train"}, {"y": 0}]}
    assert feed.source_query(dogs) == {"split": "train"}
    assert feed.epoch_size == 100 and feed.shuffle is True
    plain = parse_config({**with_sources({}), "feeds": {"val": {"filter": {"split": "v"}}}})
    assert plain.feeds["val"].sources == {} and plain.feeds["val"].epoch_size is None


@pytest.mark.parametrize("sources, feed, message", [
    ({"a": {"repeat": 1, "choose": 3}}, {}, "feeds.train.sources.a: give exactly one of "
                                            "proportion, repeat or choose, not repeat and choose"),
    ({"a": {"filter": {"y": 1}}}, {}, "feeds.train.sources.a: give exactly one .* not none"),
    ({"a": {"proportion": 0.5}, "b": {"filter": {"y": 1}, "proportion": 0.4}},
     {"epoch_size": 10}, "feeds.train.sources: the proportions sum to 0.9, not 1"),
    ({"a": {"proportion": 1.0}}, {}, "feeds.train.epoch_size is required"),
    ({"a": {"repeat": 1}}, {"epoch_size": 10}, "feeds.train.epoch_size applies to proportion"),
    ({"a": {"proportion": 0.5}, "b": {"filter": {"y": 1}, "repeat": 1}}, {"epoch_size": 10},
     "a has proportion, b has repeat"),
    ({"a": {"repeat": -1}}, {}, "feeds.train.sources.a.repeat must be a positive number"),
    ({"a": {"repeat": float("inf")}}, {}, "feeds.train.sources.a.repeat must be a positive"),
    ({"a": {"choose": 0}}, {}, "feeds.train.sources.a.choose must be at least 1"),
    ({"a": {"choose": 2.5}}, {}, "feeds.train.sources.a.choose must be an integer"),
    ({"a": {"proportion": 1.5}}, {"epoch_size": 10}, "from 0 to 1"),
    ({"a": {"repeat": 1}, "b": {"repeat": 2}}, {},
     "feeds.train.sources.b selects the same documents as feeds.train.sources.a"),
    ({"a": {"repeat": 1, "colour": 1}}, {}, "unknown key feeds.train.sources.a.colour"),
    ({"a": {"repeat": 1, "collection": "a$b"}}, {}, "feeds.train.sources.a.collection"),
    ({"a": {"repeat": 1}}, {"shuffle": "window"}, "feeds.train.shuffle = 'window' cannot "
                                                  "order a feed of sources .*windowed order"),
    ({"a": {"repeat": 1}}, {"shuffle": False}, "feeds.train.shuffle = False cannot order"),
    ({"a": {"proportion": 1.0}}, {"epoch_size": 0}, "feeds.train.epoch_size must be from 1"),
    ({"a": 3}, {}, r"\[feeds.train.sources.a\] must be a table"),
])
def test_faults_are_refused_naming_the_key(sources, feed, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(with_sources(sources, **feed))


def test_the_example_config_reads():
    config = load_config(REPO / "configs" / "balanced.toml")
    balanced = config.feeds["balanced"]
    assert len(balanced.sources) == 10 and balanced.epoch_size == 1000
    assert {s.weight.kind for s in config.feeds["zeros"].sources.values()} == {"repeat",
                                                                              "choose"}


def test_an_array_of_tables_and_epoch_size_without_sources_are_refused():
    raw = with_sources({})
    raw["feeds"]["train"]["sources"] = [{"repeat": 1}]
    with pytest.raises(ConfigError, match=r"named table, \[feeds.train.sources.NAME\]"):
        parse_config(raw)
    raw["feeds"]["train"] = {"epoch_size": 5}
    with pytest.raises(ConfigError, match="feeds.train.epoch_size applies to a feed of sources"):
        parse_config(raw)


def test_a_tasks_ids_per_source_survive_the_wire():
    rows = np.array([b"a" * 12, b"b" * 12], "S12")
    parts = (SourceIds("cats", rows, np.array([2, 0])), SourceIds("dogs", [7], [1]))
    task = unpack_worker_command(TaskMessage(5, "train", 1, 3, [], None, parts).pack())
    assert [(p.source, p.at) for p in task.parts] == [("cats", [2, 0]), ("dogs", [1])]
    assert [str(i) for i in task.parts[0].ids] == ["61" * 12, "62" * 12]
    assert task.parts[1].ids == [7] and task.ids == []
    for bad in [(SourceIds("cats", [1, 2], [0]),),  # fewer places than ids
                (SourceIds("cats", [1], [0]), SourceIds("dogs", [2], [0]))]:  # a place twice
        with pytest.raises(ProtocolError, match="malformed task parts"):
            unpack_worker_command(TaskMessage(5, "train", 1, 3, [], None, bad).pack())
