"""mongofeed.tools.load against a real server (FerretDB in the test suite), through the db
fixture."""

import bson
import numpy as np
import pytest

from mongofeed.tools import load_checks
from mongofeed.tools.load import LoadError, load_digits, load_images, load_npz, load_synthetic

sklearn_datasets = pytest.importorskip("sklearn.datasets")


def in_order(collection, **query):
    """The documents in insertion order (ObjectIds from one insert_many run increase)."""
    return list(collection.find(query).sort("_id", 1))


def split_index_exists(collection) -> bool:
    return any(list(ix["key"]) == ["split"] for ix in collection.list_indexes())


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_layout_split_and_round_trip(db):
    calls = []
    counts = load_digits(db.digits, progress=lambda done, total: calls.append((done, total)))

    bunch = sklearn_datasets.load_digits()
    assert counts["total"] == 1797 == db.digits.count_documents({})
    assert counts["train"] + counts["val"] == 1797
    assert counts["val"] == round(1797 * 0.2)
    assert db.digits.count_documents({"split": "val"}) == counts["val"]
    assert calls[-1] == (1797, 1797)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)

    docs = in_order(db.digits)
    assert set(docs[0]) == {"_id", "split", "pixels", "target"}
    pixels = np.stack([np.frombuffer(d["pixels"], dtype=np.uint8) for d in docs])
    assert np.array_equal(pixels.reshape(-1, 8, 8, 1), bunch.images.reshape(-1, 8, 8, 1))
    assert [d["target"] for d in docs] == bunch.target.tolist()
    assert all(isinstance(d["target"], int) for d in docs)
    assert split_index_exists(db.digits)


def test_digits_drop_makes_reload_idempotent_and_plain_load_appends(db):
    first = load_digits(db.digits, seed=3)
    val_before = {d["pixels"] + bytes([d["target"]]) for d in db.digits.find({"split": "val"})}

    again = load_digits(db.digits, seed=3, drop=True)
    assert again == first
    assert db.digits.count_documents({}) == 1797
    val_after = {d["pixels"] + bytes([d["target"]]) for d in db.digits.find({"split": "val"})}
    assert val_after == val_before  # the split is deterministic by seed

    load_digits(db.digits, seed=3)
    assert db.digits.count_documents({}) == 2 * 1797


# ---------------------------------------------------------------------------------------------
# npz


def test_npz_round_trip(db, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4, 3)).astype(np.float32)
    x_be = rng.integers(0, 1000, size=(30, 5)).astype(">i4")  # big-endian, stored as LE
    y = np.arange(30, dtype=np.int64)
    w = np.linspace(0, 1, 30)
    flag = np.arange(30) % 2 == 0
    name = np.array([f"s{i}" for i in range(30)])
    path = tmp_path / "data.npz"
    np.savez(path, x=x, x_be=x_be, y=y, w=w, flag=flag, name=name)

    counts = load_npz(db.samples, path, val_fraction=0.5, seed=1)
    assert counts == {"train": 15, "val": 15, "total": 30}

    docs = in_order(db.samples)
    assert set(docs[0]) == {"_id", "split", "x", "x_be", "y", "w", "flag", "name"}
    got = np.stack([np.frombuffer(d["x"], dtype=np.float32).reshape(4, 3) for d in docs])
    assert np.array_equal(got, x)
    got_be = np.stack([np.frombuffer(d["x_be"], dtype="<i4") for d in docs])
    assert np.array_equal(got_be, x_be)
    assert [d["y"] for d in docs] == y.tolist()
    assert [d["w"] for d in docs] == w.tolist()
    assert [d["flag"] for d in docs] == flag.tolist()
    assert [d["name"] for d in docs] == name.tolist()
    assert type(docs[0]["y"]) is int and type(docs[0]["flag"]) is bool


def test_npz_given_split(db, tmp_path):
    path = tmp_path / "test.npz"
    np.savez(path, x=np.zeros((7, 2, 2), np.uint8), y=np.ones(7, np.int32))
    assert load_npz(db.samples, path, split="test") == {
        "train": 0, "val": 0, "test": 7, "total": 7}
    assert db.samples.count_documents({"split": "test"}) == 7
    with pytest.raises(LoadError, match="not both"):
        load_npz(db.samples, path, split="test", val_fraction=0.2)


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((5, 2)), "y": np.zeros(4)}, r"array 'y' has 4 rows but array 'x' has 5"),
    ({"x": np.zeros((5, 2)), "meta": np.array([{}, 1, "a", None, 2.0], dtype=object)},
     r"array 'meta' is an object array"),
    ({"x": np.where(np.arange(10).reshape(5, 2) == 7, np.nan, 0.0)},
     r"array 'x' holds NaN at index \(3, 1\) \(sample 3\)"),
    ({"w": np.array([0.0, 1.0, np.inf], np.float32)}, r"array 'w' holds infinity at index 2"),
    ({"split": np.zeros(3)}, r"array 'split' clashes"),
    ({"c": np.zeros((3, 2), np.complex64)}, r"array 'c' has dtype complex64"),
])
def test_npz_refusals_name_the_array_and_write_nothing(db, tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    db.samples.insert_one({"keep": 1})
    with pytest.raises(LoadError, match=message):
        load_npz(db.samples, path, drop=True)
    assert db.samples.count_documents({}) == 1  # checked before the drop


def test_npz_refusal_is_a_value_error(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.array([np.nan]))
    with pytest.raises(ValueError, match="FerretDB closes the connection on NaN"):
        load_npz(None, path)


# ---------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_layout_and_determinism(db):
    counts = load_synthetic(db.a, 150, shape=(8, 6, 3), classes=4, val_fraction=0.2, seed=5)
    assert counts == {"train": 120, "val": 30, "total": 150}
    docs = in_order(db.a)
    assert set(docs[0]) == {"_id", "split", "image", "label"}
    assert all(len(d["image"]) == 8 * 6 * 3 for d in docs)
    labels = [d["label"] for d in docs]
    assert set(labels) <= set(range(4)) and len(set(labels)) == 4
    # The label's band of rows is bright, the rest is not.
    image = np.frombuffer(docs[0]["image"], np.uint8).reshape(8, 6, 3)
    band = slice(labels[0] * 2, labels[0] * 2 + 2)
    assert (image[band] >= 128).all() and (np.delete(image, band, axis=0) < 128).all()

    load_synthetic(db.b, 150, shape=(8, 6, 3), classes=4, val_fraction=0.2, seed=5)
    load_synthetic(db.c, 150, shape=(8, 6, 3), classes=4, val_fraction=0.2, seed=6)
    strip = [{k: d[k] for k in ("split", "image", "label")} for d in docs]
    assert [{k: d[k] for k in ("split", "image", "label")} for d in in_order(db.b)] == strip
    assert [{k: d[k] for k in ("split", "image", "label")} for d in in_order(db.c)] != strip


class SpyCollection:
    """Forwards to a Collection and records the BSON bytes of each insert_many call."""

    def __init__(self, collection):
        self.collection = collection
        self.inserts = []

    def insert_many(self, docs, **kwargs):
        self.inserts.append((len(docs), sum(len(bson.encode(d)) for d in docs)))
        return self.collection.insert_many(docs, **kwargs)

    def __getattr__(self, name):
        return getattr(self.collection, name)


def test_large_load_is_split_into_batches_under_16mb(db):
    spy = SpyCollection(db.big)
    counts = load_synthetic(spy, 200, shape=(224, 224, 3), val_fraction=0.0)  # ~30 MB
    assert counts == {"train": 200, "val": 0, "total": 200}
    assert db.big.count_documents({}) == 200
    assert len(spy.inserts) >= 3
    assert sum(n for n, _ in spy.inserts) == 200
    assert max(size for _, size in spy.inserts) < 16 * 1024 * 1024


def test_batches_hold_at_most_1000_documents(db):
    spy = SpyCollection(db.small)
    calls = []
    load_synthetic(spy, 2500, shape=(2,), progress=lambda *a: calls.append(a))
    assert [n for n, _ in spy.inserts] == [1000, 1000, 500]
    assert calls == [(1000, 2500), (2000, 2500), (2500, 2500)]


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, "n must be"),
    ({"n": 5, "shape": (0, 3)}, "shape must be"),
    ({"n": 5, "val_fraction": 1.5}, "val_fraction must be"),
    ({"n": 5, "seed": -1}, "seed must be"),
])
def test_synthetic_refuses_bad_arguments(kwargs, message):
    with pytest.raises(LoadError, match=message):
        load_synthetic(None, **kwargs)


# ---------------------------------------------------------------------------------------------
# images


def make_image_folder(root):
    image_module = pytest.importorskip("PIL.Image")
    files = {}
    for cls, count, color in (("zebra", 2, (0, 0, 0)), ("cat", 3, (255, 0, 0))):
        (root / cls).mkdir(parents=True)
        for i in range(count):
            path = root / cls / f"{i}.png"
            image_module.new("RGB", (5, 4), color).save(path)
            files[f"{cls}/{i}.png"] = path.read_bytes()
    (root / "cat" / "notes.txt").write_text("not an image")
    return files


def test_images_labels_by_sorted_class_names_and_bytes_unchanged(db, tmp_path):
    files = make_image_folder(tmp_path / "pics")
    counts = load_images(db.pics, tmp_path / "pics", shape=(4, 5, 3), val_fraction=0.4)
    assert counts == {"train": 3, "val": 2, "total": 5, "classes": ["cat", "zebra"]}

    docs = {d["filename"]: d for d in db.pics.find()}
    assert set(docs) == set(files)
    for filename, data in files.items():
        doc = docs[filename]
        assert doc["image"] == data
        assert doc["class"] == filename.split("/")[0]
        assert doc["label"] == {"cat": 0, "zebra": 1}[doc["class"]]
    assert split_index_exists(db.pics)


def test_images_shape_mismatch_and_broken_files_are_refused(db, tmp_path):
    make_image_folder(tmp_path / "pics")
    with pytest.raises(LoadError, match=r"cat/0.png: the image is 4x5 .* asks for 5x5"):
        load_images(db.pics, tmp_path / "pics", shape=(5, 5))
    (tmp_path / "pics" / "cat" / "9.jpg").write_bytes(b"no jpeg")
    with pytest.raises(LoadError, match="cat/9.jpg: Pillow cannot decode it"):
        load_images(db.pics, tmp_path / "pics", shape=(4, 5))
    assert db.pics.count_documents({}) == 0
    with pytest.raises(LoadError, match="no class sub-folders"):
        load_images(db.pics, tmp_path / "pics" / "cat")


def test_missing_dependency_names_the_extra(monkeypatch):
    def refuse(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(load_checks.importlib, "import_module", refuse)
    with pytest.raises(load_checks.MissingDependencyError,
                       match=r"pip install 'mongofeed\[load\]'"):
        load_digits(None)
