"""The per-sample transform of the bench's augment rows: a random crop, a flip, a brightness
jitter and Gaussian noise, uint8 image in, float32 image in [0, 1] out. The same function runs
in the daemon's workers (``transform.document``, ``mongofeed-augment``) and in the peer
Sequence's ``__getitem__`` (``keras-augment``)."""

from __future__ import annotations

import numpy as np

CROP_FRACTION = 8  # the crop leaves out 1/8 of the height and width
NOISE_STD = 0.02


def crop_shape(shape) -> list[int]:
    """The shape of an augmented image of ``shape`` (height, width, channels)."""
    height, width, channels = shape
    return [height - height // CROP_FRACTION, width - width // CROP_FRACTION, channels]


def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    height, width, _ = crop_shape(image.shape)
    top = rng.integers(0, image.shape[0] - height + 1)
    left = rng.integers(0, image.shape[1] - width + 1)
    crop = image[top:top + height, left:left + width]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    out = np.multiply(crop, np.float32(rng.uniform(0.8, 1.2) / 255), dtype=np.float32)
    out += NOISE_STD * rng.standard_normal(out.shape, dtype=np.float32)
    return np.clip(out, 0, 1, out=out)


def crop_flip_jitter(fields, doc, rng):
    """The document function of ``mongofeed-augment``."""
    return {"image": augment(fields["image"], rng)}
