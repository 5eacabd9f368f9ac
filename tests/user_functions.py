"""User functions for the [transform] tests: imported by the daemon's workers from this folder
(``transform.paths``), the way a project's own module would be."""

from __future__ import annotations

import pickle

import numpy as np

VOCABULARY = {word: i + 1 for i, word in enumerate(
    "the a cat dog sat ran on mat fast slow red blue big small".split())}  # 0 pads
UNKNOWN = len(VOCABULARY) + 1


def forum_sample(fields, doc, rng):
    """The body of the forum Sequence's loop, for one sample (keras's to_categorical spelled
    in numpy, so that the workers need not import Keras)."""
    return {"X": pickle.loads(doc["frame"]).astype(np.float32),
            "y": np.eye(2, dtype=np.float32)[int(not doc["result"])]}


def crop_and_flip(fields, doc, rng):
    """A random 4x4 crop of the 6x6 image, flipped left-right half of the time; uint8."""
    image = fields["image"]
    top, left = rng.integers(0, 3, size=2)
    crop = image[top:top + 4, left:left + 4]
    return {"image": crop[:, ::-1] if rng.random() < 0.5 else crop}


def noisy_weights(arrays, rng):
    """A batch function: one random weight per sample."""
    return {"weight": rng.uniform(0.5, 1.5, len(arrays["image"])).astype(np.float32)}


def tokenise(arrays, rng):
    """A batch function over strings: one int32 token list per document, of its length."""
    return {"tokens": [np.array([VOCABULARY.get(w, UNKNOWN) for w in text.split()], np.int32)
                       for text in arrays["text"]]}


def fails_on_marked(fields, doc, rng):
    """Raises for the document marked ``bad``, passes ``i`` on for the others."""
    if doc["bad"]:
        raise ValueError(f"cannot use document {doc['i']}")
    return {"i": doc["i"]}


def fails_on_batch(arrays, rng):
    """Raises for a batch that holds the document marked ``poison``."""
    if arrays["poison"].any():
        raise RuntimeError("poisoned batch")
    return {}


def wrong_shape(fields, doc, rng):
    return {"i": np.zeros(3)}


def reads_unlisted(fields, doc, rng):
    return {"i": doc["unlisted"]}


def not_a_function():
    """Takes no arguments: the daemon refuses it at start."""


NOT_CALLABLE = 3


def flip_in_training(fields, doc, rng, feed):
    """Flips the image of the train feed only; other feeds pass the field on as it is."""
    return {"image": fields["image"][:, ::-1]} if feed == "train" else {}


def flip_some(fields, doc, rng):
    """Returns the image for odd _ids only: the batch's documents disagree on their keys."""
    return {"image": fields["image"][:, ::-1]} if doc["_id"] % 2 else {}
