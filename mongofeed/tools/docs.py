"""The configuration reference (docs/configuration.md), generated from ``config.SCHEMA`` so
it cannot drift from the code; a test compares the committed file with this output.

Regenerate with ``python -m mongofeed.tools.docs > docs/configuration.md``.
"""

from __future__ import annotations

import json

from ..daemon.config import REQUIRED, SCHEMA, _type_name

INTRO = """\
# Configuration reference

<!-- Generated from mongofeed/daemon/config.py (SCHEMA)
     by `python -m mongofeed.tools.docs`; do not edit. -->

mongofeed reads one TOML file (`mongofeed serve --config FILE`, env `MONGOFEED_CONFIG`).
Precedence: command-line option > environment variable > config file > default. Unknown
sections and keys are refused with a message that names them, so a typo never passes
silently. Check a config against the data before training with
`mongofeed inspect --config FILE`.
"""

TABLE_NOTES = {
    "feeds.*": "One table per feed, e.g. `[feeds.train]`; one daemon serves them all. "
               "Without any, a single feed `train` selects every document.",
    "feeds.*.sources.*": "One table per source of a feed, e.g. `[feeds.train.sources.cats]`: "
                         "the feed is then a mixture of its sources ([feeds.md]"
                         "(feeds.md#mixing-sources-weighted-feeds-and-class-balance)). "
                         "Each source has exactly one weight: `proportion` (on "
                         "every source of the feed, summing to 1, with the feed's "
                         "`epoch_size`: the shares `p * epoch_size` are rounded down, and the "
                         "samples left over go one each to the sources with the largest "
                         "remainders), or `repeat` (rounded half up) and `choose`. All sources "
                         "read `source.database`, and their documents must fit the declared "
                         "fields: `serve` checks three of each (the first, middle and last "
                         "`_id`) before it starts.",
    "fields.*": "One table per value read from each document, e.g. `[fields.image]`; "
                "without `[arrays.*]` each is an array of every batch (then at least one).",
    "transform": "Your own preprocessing, run in every worker of the daemon: see "
                 "[transforms.md](transforms.md). The config is code: the daemon imports the "
                 "modules it names, so keep it as safe as the code it runs.",
    "arrays.*": "The arrays of every batch as the `[transform]` functions return them, e.g. "
                "`[arrays.image]`; without any, the fields are the arrays.",
}


def reference_markdown() -> str:
    """The Markdown text of docs/configuration.md."""
    parts = [INTRO]
    for section, keys in SCHEMA.items():
        name = section.replace(".*", ".NAME")
        parts.append(f"\n## [{name}]\n")
        if section in TABLE_NOTES:
            parts.append(f"\n{TABLE_NOTES[section]}\n")
        parts.append("\n| key | type | default | meaning |\n|---|---|---|---|\n")
        for key, spec in keys.items():
            meaning = spec.doc
            if spec.choices:
                meaning += " One of: " + ", ".join(f"`{c}`" for c in spec.choices) + "."
            parts.append(f"| `{key}` | {_type_name(spec.type)} | {_default(spec.default)} | "
                         f"{meaning.replace('|', '&#124;')} |\n")
    return "".join(parts)


def _default(value) -> str:
    if value is REQUIRED:
        return "**required**"
    if value is None:
        return "—"
    return f"`{json.dumps(value)}`"


if __name__ == "__main__":
    print(reference_markdown(), end="")
