"""The committed configuration reference is exactly what config.SCHEMA generates, and the
other documents exist and name the commands they describe."""

from __future__ import annotations

from pathlib import Path

from mongofeed.daemon.config import SCHEMA
from mongofeed.tools.docs import reference_markdown

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_configuration_reference_is_generated_from_the_schema():
    committed = (DOCS / "configuration.md").read_text()
    assert committed == reference_markdown(), (
        "docs/configuration.md is stale: "
        "run python -m mongofeed.tools.docs > docs/configuration.md")


def test_reference_names_every_key():
    text = reference_markdown()
    for section, keys in SCHEMA.items():
        for key in keys:
            assert f"| `{key}` |" in text, f"{section}.{key} missing"


def test_guides_exist():
    assert "MongoSequence" in (DOCS / "migration.md").read_text()
    architecture = (DOCS / "architecture.md").read_text()
    assert "supervisor" in architecture and "sink" in architecture
    assert "_MONGOFEED_COMPLETE=bash_source" in (DOCS / "cli.md").read_text()
