"""The [transform] machinery as pure logic: config checks, loading the functions, the seeded
generators, the projection, and BatchMaker on documents in memory (no server, no daemon)."""

from __future__ import annotations

import numpy as np
import pytest

from mongofeed.consumer import model_io
from mongofeed.daemon.config import load_config, parse_config
from mongofeed.daemon.functions import load_functions
from mongofeed.daemon.transform import (
    BATCH,
    DOCUMENT,
    BatchFunctionError,
    BatchMaker,
    FunctionError,
    ProjectedDocument,
    generator,
    projection,
)
from mongofeed.errors import ConfigError, ProtocolError
from mongofeed.wire import (
    PROTOCOL_VERSION,
    ArraySpec,
    Conversion,
    hello_schema,
    pack_batch,
    unpack_batch,
)
from tests.support import REPO

TESTS = str(REPO / "tests")


def config(transform=None, arrays=None, fields=None, output=None, batch=None):
    raw = {
        "source": {"database": "d", "collection": "c"},
        "batch": {"size": 4, **(batch or {})},
        "fields": fields if fields is not None else {
            "i": {"decode": "scalar", "dtype": "int64"}},
        "transform": {"paths": [TESTS], **(transform or {})},
    }
    if arrays is not None:
        raw["arrays"] = arrays
    if output is not None:
        raw["output"] = output
    return parse_config(raw, "conf/t.toml")


def docs(*values, **extra):
    return [(position, {"_id": 100 + position, "i": value, **extra})
            for position, value in enumerate(values)]


# -- config ----------------------------------------------------------------------------------

@pytest.mark.parametrize("transform, arrays, message", [
    ({"document": "user_functions"}, {"i": {"dtype": "int64"}}, "transform.document"),
    ({"document": "a:b", "paths": ["nowhere"]}, {"i": {"dtype": "int64"}}, "transform.paths"),
    ({"reads": ["x"]}, None, "transform.reads"),
    ({}, {"i": {"dtype": "int64"}}, "set transform.document or transform.batch"),
    ({"document": "m:f"}, {"t": {"dtype": "int32", "shape": [-1]}}, "arrays.t.max_length"),
    ({"document": "m:f"}, {"t": {"dtype": "int32", "shape": [-2]}}, "arrays.t.shape"),
    ({"document": "m:f"}, {"t": {"dtype": "int32", "shape": [-1], "max_length": 9,
                                 "pad_to": "most"}}, "arrays.t.pad_to"),
    ({"document": "m:f"}, {"t": {"dtype": "uint8", "shape": [-1], "max_length": 9,
                                 "pad_value": -1}}, "arrays.t.pad_value"),
    ({"document": "m:f"}, {"t": {"dtype": "int32", "shape": [3], "lengths": "n"}},
     "arrays.t: lengths"),
    ({"document": "m:f"}, {"t": {"dtype": "int32", "shape": [-1], "max_length": 9,
                                 "lengths": "t"}}, "arrays.t.lengths"),
    ({"document": "m:f"}, {"t": {"dtype": "uint8", "scale": 0.5}}, "arrays.t.scale"),
])
def test_bad_transform_config_is_refused_naming_the_key(transform, arrays, message):
    with pytest.raises(ConfigError, match="conf/t.toml: ") as refused:
        config(transform, arrays)
    assert message in str(refused.value)


def test_text_fields_and_output_checks():
    text = {"text": {"decode": "string"}}
    with pytest.raises(ConfigError, match="fields.text: decode = 'string'.*remove dtype"):
        config(fields={"text": {"decode": "string", "dtype": "uint8"}})
    with pytest.raises(ConfigError, match="'text'.*declare the arrays"):
        config(fields=text)
    with pytest.raises(ConfigError, match="fields.x.dtype is required"):
        config(fields={"x": {"decode": "raw", "shape": [2]}})
    with pytest.raises(ConfigError, match="one_hot runs in the daemon"):
        config(fields={"y": {"decode": "scalar", "dtype": "int64", "one_hot": 3,
                             "cast_on": "consumer"}})
    arrays = {"w": {"dtype": "float32"}, "t": {"dtype": "int32", "shape": [2]}}
    with pytest.raises(ConfigError, match="output.sample_weight needs output.targets"):
        config({"batch": "m:f"}, arrays, output={"inputs": ["t"], "sample_weight": "w"})
    with pytest.raises(ConfigError, match="one number per sample"):
        config({"batch": "m:f"}, arrays,
               output={"inputs": ["w"], "targets": ["w"], "sample_weight": "t"})
    with pytest.raises(ConfigError, match="output.inputs names 'i', which is not an array"):
        config({"batch": "m:f"}, arrays, output={"inputs": ["i"]})


def test_announced_arrays():
    c = config({"batch": "m:f"}, {
        "tokens": {"dtype": "int32", "shape": [-1, 2], "max_length": 50, "lengths": "n"},
        "fixed": {"dtype": "int32", "shape": [-1], "max_length": 8, "pad_to": "max_length"},
        "image": {"dtype": "uint8", "shape": [4], "cast": "float32", "scale": 0.5,
                  "cast_on": "consumer"}})
    assert [a.spec() for a in c.arrays.values()] == [
        ArraySpec("tokens", "int32", (None, 2), (50, 2)), ArraySpec("fixed", "int32", (8,)),
        ArraySpec("image", "uint8", (4,)), ArraySpec("n", "int32", ())]
    assert c.arrays["image"].conversion() == Conversion("image", "float32", 0.5)
    assert c.batch_nbytes == 4 * (50 * 2 * 4 + 8 * 4 + 4 + 4)


# -- loading, seeds, projection ----------------------------------------------------------------

@pytest.mark.parametrize("ref, message", [
    ("no_such_module:f", "no module 'no_such_module' in transform.paths"),
    ("user_functions:missing", "has no 'missing'"),
    ("user_functions:NOT_CALLABLE", "is a int, not a function"),
    ("user_functions:not_a_function", "must take (fields, doc, rng)"),
])
def test_a_wrong_reference_is_a_config_error(ref, message):
    c = config({"document": ref}, {"i": {"dtype": "int64"}})
    with pytest.raises(ConfigError) as refused:
        load_functions(c.transform, c.path)
    assert str(refused.value).startswith(f"conf/t.toml: transform.document = {ref!r}: ")
    assert message in str(refused.value)


def test_paths_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "prep").mkdir()
    (tmp_path / "prep" / "relative_prep.py").write_text(
        "import not_installed_anywhere\n")
    raw = {"source": {"database": "d", "collection": "c"},
           "fields": {"i": {"decode": "scalar", "dtype": "int64"}},
           "transform": {"document": "relative_prep:f", "paths": ["prep"]},
           "arrays": {"i": {"dtype": "int64"}}}
    c = parse_config(raw, str(tmp_path / "feed.toml"))
    assert c.transform.paths == (str(tmp_path / "prep"),)
    with pytest.raises(ConfigError, match="importing relative_prep failed: ModuleNotFoundError"):
        load_functions(c.transform, c.path)


def test_generators_depend_on_the_seed_tuple_only():
    draw = lambda *key: generator(*key).integers(0, 2**62, 4).tolist()  # noqa: E731
    assert draw(7, 2, 3, DOCUMENT, 5) == draw(7, 2, 3, DOCUMENT, 5)
    keys = [(7, 2, 3, DOCUMENT, 5), (7, 2, 3, DOCUMENT, 6), (7, 2, 4, DOCUMENT, 5),
            (7, 3, 3, DOCUMENT, 5), (8, 2, 3, DOCUMENT, 5), (7, 2, 3, BATCH, 0),
            (7, 2, 3, DOCUMENT, 0), (2**32, 5, 0, 0, 0), (0, 1, 5, 0, 0)]
    assert len({tuple(draw(*key)) for key in keys}) == len(keys)


def test_projection_reads_only_what_is_used():
    c = config({"document": "m:f", "reads": ["meta.source", "meta", "tags.0.name", "z"]},
               {"i": {"dtype": "int64"}},
               fields={"i": {"decode": "scalar", "dtype": "int64"},
                       "deep": {"path": "a.b.c", "decode": "scalar", "dtype": "int64"}})
    assert projection(c) == {"_id": 1, "a.b.c": 1, "i": 1, "meta": 1, "tags": 1, "z": 1}
    nothing = config({"document": "m:f"}, {"i": {"dtype": "int64"}}, fields={})
    assert projection(nothing) == {"_id": 1}  # not {}, which would read whole documents
    doc = ProjectedDocument({"_id": 1, "i": 2, "other": 3}, frozenset(["_id", "i", "z"]))
    assert dict(doc) == {"_id": 1, "i": 2}
    with pytest.raises(KeyError, match="'other' is not read: add it to transform.reads"):
        doc["other"]
    with pytest.raises(KeyError, match="'z': the document has no such key"):
        doc["z"]


# -- BatchMaker --------------------------------------------------------------------------------

def test_document_function_errors_name_the_document_and_skip_or_fail():
    arrays = {"i": {"dtype": "int64"}}
    for on_error in ("skip", "fail"):
        c = config({"document": "user_functions:fails_on_marked", "reads": ["bad"]}, arrays,
                   batch={"on_error": on_error})
        maker = BatchMaker(c)
        batch = [(p, {**doc, "bad": doc["i"] == 2}) for p, doc in docs(1, 2, 3)]
        if on_error == "fail":
            with pytest.raises(FunctionError, match=r"_id 101: transform.document "
                               r"'user_functions:fails_on_marked': raised ValueError: cannot "
                               r"use document 2 \(at .*user_functions.py:\d+ in fails_on_"):
                maker.make("train", 0, 0, batch)
            continue
        out, problems = maker.make("train", 0, 0, batch)
        assert out["i"].tolist() == [1, 3]
        assert len(problems) == 1 and problems[0].doc_id == 101
        out, problems = maker.make("train", 0, 0, [batch[1]])  # all skipped: an empty batch
        assert out["i"].shape == (0,) and len(problems) == 1


def test_a_value_that_does_not_fit_is_named():
    maker = BatchMaker(config({"document": "user_functions:wrong_shape"},
                              {"i": {"dtype": "int64"}}))
    with pytest.raises(FunctionError, match=r"_id 100: transform.document 'user_functions:"
                       r"wrong_shape': returned array 'i': expected int64 of shape \(\), "
                       r"found shape \(3,\)"):
        maker.make("train", 0, 0, docs(1))
    maker = BatchMaker(config({"document": "user_functions:reads_unlisted"},
                              {"i": {"dtype": "int64"}}))
    with pytest.raises(FunctionError, match="'unlisted' is not read: add it to transform.reads"):
        maker.make("train", 0, 0, docs(1))


def test_batch_function_errors_fail_the_batch():
    c = config({"batch": "user_functions:fails_on_batch"},
               {"i": {"dtype": "int64"}, "poison": {"dtype": "bool"}},
               fields={"i": {"decode": "scalar", "dtype": "int64"},
                       "poison": {"decode": "scalar", "dtype": "bool"}})
    maker = BatchMaker(c)
    out, _ = maker.make("train", 0, 0, docs(1, 2, poison=False))
    assert out["i"].tolist() == [1, 2] and out["poison"].dtype == bool
    with pytest.raises(BatchFunctionError, match="transform.batch 'user_functions:"
                       "fails_on_batch' raised RuntimeError: poisoned batch"):
        maker.make("train", 0, 0, docs(1, 2, poison=True))
    missing = BatchMaker(config({"batch": "user_functions:fails_on_batch"},
                                {"i": {"dtype": "int64"}, "weight": {"dtype": "float32"}},
                                fields={"i": {"decode": "scalar", "dtype": "int64"},
                                        "poison": {"decode": "scalar", "dtype": "bool"}}))
    with pytest.raises(BatchFunctionError, match="array 'weight' .* is neither a field nor "
                       "returned by transform.batch"):
        missing.make("train", 0, 0, docs(1, poison=False))


def test_text_is_tokenised_padded_and_measured():
    def make(**token_options):
        c = config({"batch": "user_functions:tokenise"},
                   {"tokens": {"dtype": "int32", "shape": [-1], "max_length": 6,
                               "lengths": "length", **token_options}},
                   fields={"text": {"decode": "string"}})
        texts = ["the cat", "a big red dog ran", "", "fast"]
        return BatchMaker(c).make("train", 0, 0, [(p, {"_id": p, "text": t})
                                         for p, t in enumerate(texts)])[0]

    out = make()
    assert out["tokens"].tolist() == [[1, 3, 0, 0, 0], [2, 13, 11, 4, 6], [0] * 5, [9, 0, 0, 0, 0]]
    assert out["length"].tolist() == [2, 5, 0, 1] and out["length"].dtype == np.int32
    assert make(pad_to=4)["tokens"].shape == (4, 6)  # 8, at most max_length
    assert make(pad_to=3, pad_value=-1)["tokens"][0].tolist() == [1, 3, -1, -1, -1, -1]
    assert make(pad_to="max_length")["tokens"].shape == (4, 6)
    c = config({"batch": "user_functions:tokenise"},
               {"tokens": {"dtype": "int32", "shape": [-1], "max_length": 3}},
               fields={"text": {"decode": "string"}})
    with pytest.raises(BatchFunctionError, match=r"array 'tokens' from transform.batch .*"
                       r"expected int32 of shape \('any',\), lengths up to 3, found shape \(5,\)"):
        BatchMaker(c).make("train", 0, 0, [(0, {"_id": 0, "text": "a b c d e"})])


def test_augmentation_is_seeded_by_its_place_in_the_plan():
    c = config({"document": "user_functions:crop_and_flip"},
               {"image": {"dtype": "uint8", "shape": [4, 4]}},
               fields={"image": {"decode": "list", "dtype": "uint8", "shape": [6, 6]}},
               batch={"seed": 3})
    image = np.arange(36, dtype=np.uint8).reshape(6, 6).tolist()
    batch = [(p, {"_id": p, "image": image}) for p in range(4)]
    first = BatchMaker(c).make("train", 1, 2, batch)[0]["image"]
    assert np.array_equal(first, BatchMaker(c).make("train", 1, 2, batch)[0]["image"])
    assert len({row.tobytes() for row in first}) > 1  # each position draws its own
    assert not np.array_equal(first, BatchMaker(c).make("train", 2, 2, batch)[0]["image"])
    # position, not order of arrival: the same document at the same position, alone
    assert np.array_equal(BatchMaker(c).make("train", 1, 2, batch[2:3])[0]["image"][0], first[2])


def test_a_function_may_ask_for_the_feed():
    c = config({"document": "user_functions:flip_in_training"},
               {"image": {"dtype": "uint8", "shape": [2, 2]}},
               fields={"image": {"decode": "list", "dtype": "uint8", "shape": [2, 2]}})
    batch = [(0, {"_id": 0, "image": [[1, 2], [3, 4]]})]
    assert BatchMaker(c).make("train", 0, 0, batch)[0]["image"].tolist() == [[[2, 1], [4, 3]]]
    assert BatchMaker(c).make("val", 0, 0, batch)[0]["image"].tolist() == [[[1, 2], [3, 4]]]
    c = config({"document": "user_functions:flip_some"},
               {"image": {"dtype": "uint8", "shape": [2, 2]}},
               fields={"image": {"decode": "list", "dtype": "uint8", "shape": [2, 2]}})
    with pytest.raises(FunctionError, match=r"_id 1: .* returned the keys \['image'\], the "
                       r"batch's other documents \[\]"):
        BatchMaker(c).make("train", 0, 0, [(p, {**batch[0][1], "_id": p}) for p in range(2)])


def test_the_example_config_augments_train_only():
    c = load_config(REPO / "configs" / "digits-augment.toml")
    maker = BatchMaker(c)
    digit = {"_id": 0, "pixels": np.arange(64, dtype=np.uint8).tobytes(), "target": 3}
    batches = {feed: maker.make(feed, 0, 0, [(p, digit) for p in range(8)])[0]
               for feed in ("train", "val")}
    assert all(b["image"].dtype == np.uint8 and b["image"].shape == (8, 8, 8, 1)
               for b in batches.values())
    assert (batches["val"]["image"][:, :, :, 0] == np.arange(64).reshape(8, 8)).all()
    assert len({image.tobytes() for image in batches["train"]["image"]}) > 1
    assert c.arrays["image"].conversion() == Conversion("image", "float32", 0.0625)


# -- wire and consumer ---------------------------------------------------------------------------

def test_variable_arrays_and_conversions_on_the_wire():
    reply = {"protocol": PROTOCOL_VERSION, "feed": "f", "batch_size": 4, "token": "t" * 32,
             "arrays": [["t", "int32", [None], [6]], ["image", "uint8", [2]]],
             "convert": [["image", "float32", 0.5]]}
    schema = hello_schema(reply)
    assert schema.delivered == (ArraySpec("t", "int32", (None,), (6,)),
                                ArraySpec("image", "float32", (2,)))
    frames = pack_batch(0, 0, {"t": np.ones((2, 5), np.int32),
                               "image": np.array([[2, 4], [6, 8]], np.uint8)}, schema.arrays)
    _, arrays = unpack_batch([bytes(memoryview(f)) for f in frames], schema)
    assert arrays["t"].shape == (2, 5)
    assert arrays["image"].dtype == np.float32 and arrays["image"].tolist() == [[1, 2], [3, 4]]
    too_long = pack_batch(0, 0, {"t": np.ones((2, 7), np.int32),
                                 "image": np.zeros((2, 2), np.uint8)}, schema.arrays)
    with pytest.raises(ProtocolError, match="exceeds the announced"):
        unpack_batch([bytes(memoryview(f)) for f in too_long], schema)
    for bad in ([["t", "int32", [None]]], [["t", "int32", [None], [6, 1]]],
                [["t", "int32", [5], [6]]]):
        with pytest.raises(ProtocolError):
            hello_schema({**reply, "arrays": bad, "convert": []})


def test_model_io_with_sample_weight():
    arrays = {"x": 1, "y": 2, "w": 3}
    assert model_io(arrays, ["x"], ["y"], "w") == (1, 2, 3)
    assert model_io(arrays, ["x"], ["y"]) == (1, 2)
