"""Bad configs are refused before anything starts, with a message naming the key and file."""

from __future__ import annotations

import sys

import pytest

from mongofeed.daemon.config import load_config, parse_config, redact_uri
from mongofeed.errors import ConfigError
from tests.support import REPO


def good() -> dict:
    return {
        "source": {"uri": "mongodb://127.0.0.1:27017", "database": "d", "collection": "c"},
        "fields": {"x": {"decode": "raw", "dtype": "float32", "shape": [4]}},
    }


def with_(section: str, key: str, value) -> dict:
    raw = good()
    table = raw
    for part in section.split("."):
        table = table.setdefault(part, {})
    table[key] = value
    return raw


@pytest.mark.parametrize("section, key, value, named", [
    ("serve", "wokers", 2, "serve.wokers"),
    ("serve", "workers", -1, "serve.workers"),
    ("serve", "workers", 0, "serve.workers"),
    ("serve", "workers", "8", "serve.workers"),
    ("serve", "workers", True, "serve.workers"),
    ("serve", "bind", "tcp://127.0.0.1", "serve.bind"),
    ("serve", "bind", "http://x:1", "serve.bind"),
    ("serve", "session_timeout", -1, "serve.session_timeout"),
    ("serve", "max_pending", 0, "serve.max_pending"),
    ("serve", "shard", "3/2", "serve.shard"),
    ("batch", "size", 0, "batch.size"),
    ("batch", "on_error", "ignore", "batch.on_error"),
    ("fields.x", "shape", [0], "fields.x.shape"),
    ("fields.x", "shape", [-4], "fields.x.shape"),
    ("fields.x", "dtype", "object", "fields.x.dtype"),
    ("fields.x", "decode", "pickle", "fields.x"),
    ("fields.x", "colour", 1, "fields.x.colour"),
    ("source", "url", "mongodb://h", "source.url"),
])
def test_bad_value_is_refused_naming_key_and_file(section, key, value, named):
    with pytest.raises(ConfigError) as refused:
        parse_config(with_(section, key, value), "conf/train.toml")
    assert str(refused.value).startswith("conf/train.toml: ")
    assert named in str(refused.value)


def test_unknown_section_and_missing_fields_are_refused():
    with pytest.raises(ConfigError, match=r"train.toml: unknown section \[sevre\]"):
        parse_config({**good(), "sevre": {}}, "train.toml")
    with pytest.raises(ConfigError, match="train.toml: no \\[fields.NAME\\]"):
        parse_config({**good(), "fields": {}}, "train.toml")


def test_missing_file_and_broken_toml_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml does not exist"):
        load_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[serve\nworkers = 2\n")
    with pytest.raises(ConfigError, match="broken.toml: not valid TOML"):
        load_config(broken)


def test_serve_refuses_a_bad_config_with_a_usage_error_before_starting(tmp_path):
    import subprocess

    path = tmp_path / "bad.toml"
    path.write_text('[source]\ndatabase = "d"\ncollection = "c"\n'
                    '[fields.x]\ndtype = "float32"\nshape = [4]\n[serve]\nworkers = -2\n')
    done = subprocess.run([sys.executable, "-m", "mongofeed", "serve", "--config", str(path)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 2  # click's usage error
    assert f"{path}: serve.workers must be between" in done.stderr
    assert "mongofeed ready" not in done.stdout


@pytest.mark.parametrize("text, expected", [
    ("mongodb://u:pw@h:1/db", "mongodb://u:***@h:1/db"),
    ("mongodb+srv://u:p%40w@c.example/?x=1", "mongodb+srv://u:***@c.example/?x=1"),
    ("mongodb://h:27017/", "mongodb://h:27017/"),
    ("mongodb://u@h/", "mongodb://u@h/"),
    ("ServerSelectionTimeoutError: mongodb://a:secret@h1,h2/ timed out, "
     "retry mongodb://b:other@h3", "ServerSelectionTimeoutError: mongodb://a:***@h1,h2/ "
     "timed out, retry mongodb://b:***@h3"),
])
def test_passwords_are_redacted_also_inside_messages(text, expected):
    assert redact_uri(text) == expected
