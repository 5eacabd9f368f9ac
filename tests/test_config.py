"""Bad configs are refused before anything starts, with a message naming the key and file."""

from __future__ import annotations

import datetime
import math
import sys

import pytest

from mongofeed.consumer import DEFAULT_TIMEOUT_S
from mongofeed.daemon.config import MAX_BATCH_BYTES, load_config, parse_config
from mongofeed.errors import ConfigError
from mongofeed.security import SECRET_URI_OPTIONS, redact_uri
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
    # Values that used to pass here and fail only later (issue 9, item 5), key by key:
    ("batch", "seed", -1, "batch.seed"),
    ("batch", "seed", 2**63, "batch.seed"),
    ("batch", "size", MAX_BATCH_BYTES // 16 + 1, "batch.size"),
    ("source", "uri", "mongodb://u:p@ss@h/", "source.uri"),
    ("source", "uri", "mongodb://h:99999/", "source.uri"),
    ("source", "uri", "mongodb+srv://h:27017/", "source.uri"),
    ("source", "uri", "postgres://h/", "source.uri"),
    ("source", "database", "", "source.database"),
    ("source", "database", "a.b", "source.database"),
    ("source", "database", "d" * 64, "source.database"),
    ("source", "collection", "", "source.collection"),
    ("source", "collection", "a$b", "source.collection"),
    ("feeds.train", "filter", {"when": datetime.date(2020, 1, 1)}, "feeds.train.filter"),
    ("feeds.train", "filter", {"when": datetime.time(12, 0)}, "feeds.train.filter"),
    ("fields.x", "shape", [1] * 32, "fields.x.shape"),
    ("fields.x", "path", "a..b", "fields.x.path"),
    ("fields.x", "path", "", "fields.x.path"),
    ("fields.x", "path", "$where", "fields.x.path"),
    ("output", "inputs", [], "output.inputs"),
    ("output", "inputs", [["x"]], "output.inputs"),
    ("output", "inputs", ["x", "x"], "output.inputs"),
    ("output", "targets", [1], "output.targets"),
    ("serve", "max_pending", 10**6, "serve.max_pending"),
    ("serve", "max_sessions", 0, "serve.max_sessions"),
    ("serve", "session_timeout", 1, "serve.session_timeout"),
    ("serve", "session_timeout", math.nan, "serve.session_timeout"),
    ("serve", "stall_timeout", math.inf, "serve.stall_timeout"),
    ("serve", "stall_timeout", 0.5, "serve.stall_timeout"),
    ("serve", "server_key", "/nonexistent/daemon.key_secret", "serve.server_key"),
    ("serve", "bind", "ipc:///nonexistent/folder/data", "serve.bind"),
    ("serve", "bind", "ipc:///tmp/" + "x" * 120, "serve.bind"),
])
def test_bad_value_is_refused_naming_key_and_file(section, key, value, named):
    with pytest.raises(ConfigError) as refused:
        parse_config(with_(section, key, value), "conf/train.toml")
    assert str(refused.value).startswith("conf/train.toml: ")
    assert named in str(refused.value)


def test_a_gridfs_bucket_must_be_a_collection_name():
    raw = with_("fields.x", "gridfs", True)
    raw["fields"]["x"]["bucket"] = ""
    with pytest.raises(ConfigError, match="fields.x.bucket"):
        parse_config(raw, "t.toml")


def test_client_keys_must_be_a_folder(tmp_path):
    key = tmp_path / "daemon.key_secret"
    key.write_text("")
    raw = with_("serve", "server_key", str(key))
    raw["serve"]["client_keys"] = str(tmp_path / "absent")
    with pytest.raises(ConfigError, match="serve.client_keys .*absent is not a folder"):
        parse_config(raw, "t.toml")


def test_defaults_compose_a_hung_worker_is_replaced_before_a_consumer_gives_up():
    """Issue 9, item 8: the stall timeout (then a restart and a re-read) must fit well
    within the consumer's default timeout, or training ends before the daemon recovers."""
    serve = parse_config(good()).serve
    assert serve.stall_timeout <= DEFAULT_TIMEOUT_S / 2
    assert serve.session_timeout < DEFAULT_TIMEOUT_S


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


@pytest.mark.parametrize("text, expected", [
    ("mongodb://h/?tls=true&tlsCertificateKeyFilePassword=kf-secret&appname=a",
     "mongodb://h/?tls=true&tlsCertificateKeyFilePassword=***&appname=a"),
    ("mongodb://h/?TLSCERTIFICATEKEYFILEPASSWORD=kf-secret",
     "mongodb://h/?TLSCERTIFICATEKEYFILEPASSWORD=***"),
    ("mongodb://h/?proxyHost=p&proxyUsername=pu-secret&proxyPassword=pp-secret",
     "mongodb://h/?proxyHost=p&proxyUsername=***&proxyPassword=***"),
    ("mongodb://h/?sslPEMKeyPassword=old-secret", "mongodb://h/?sslPEMKeyPassword=***"),
    ("mongodb://h/?ssl_pem_passphrase=old-secret", "mongodb://h/?ssl_pem_passphrase=***"),
    ("mongodb://AKIA:sk-secret@h/?authMechanism=MONGODB-AWS&authMechanismProperties="
     "AWS_SESSION_TOKEN:st-secret", "mongodb://AKIA:***@h/?authMechanism=MONGODB-AWS&"
     "authMechanismProperties=AWS_SESSION_TOKEN:***"),
    ("mongodb://h/?authMechanismProperties=AWS_SESSION_TOKEN%3Ast-secret%2CSERVICE_NAME%3Amongo",
     "mongodb://h/?authMechanismProperties=AWS_SESSION_TOKEN:***,SERVICE_NAME:mongo"),
    ("mongodb://h/?authMechanismProperties=SERVICE_NAME:mongodb,CANONICALIZE_HOST_NAME:true",
     "mongodb://h/?authMechanismProperties=SERVICE_NAME:mongodb,CANONICALIZE_HOST_NAME:true"),
    ("mongodb://h/?authMechanismProperties=SOME_FUTURE_SECRET:fs-secret",
     "mongodb://h/?authMechanismProperties=SOME_FUTURE_SECRET:***"),
    # Passwords with characters a URI should escape, as a typo leaves them in a message:
    ("mongodb://u:p/w-secret@h/db", "mongodb://u:***@h/db"),
    ("mongodb://u:p?w-secret@h/db", "mongodb://u:***@h/db"),
    ("mongodb://u:p@w-secret@h/db?appname=a@b", "mongodb://u:***@h/db?appname=a@b"),
    ("error at 'mongodb://u:pw-secret@h/?tlsCertificateKeyFilePassword=kf-secret': refused",
     "error at 'mongodb://u:***@h/?tlsCertificateKeyFilePassword=***': refused"),
    ("mongodb://h/db?appname=a@b", "mongodb://h/db?appname=a@b"),
])
def test_secret_uri_options_are_redacted(text, expected):
    assert redact_uri(text) == expected
    assert "secret" not in redact_uri(text)


def test_every_option_pymongo_calls_sensitive_is_redacted():
    """A new pymongo that knows another secret option makes this fail: add it."""
    from pymongo.common import SENSITIVE_OPTIONS_FOR_REPR

    assert SENSITIVE_OPTIONS_FOR_REPR <= SECRET_URI_OPTIONS
    for option in SENSITIVE_OPTIONS_FOR_REPR:
        assert "hidden" not in redact_uri(f"mongodb://h/?{option}=hidden")
