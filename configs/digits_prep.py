"""Preprocessing for configs/digits-augment.toml, run by the daemon's workers.

The daemon imports this module because the config names it (``transform.paths = ["."]``
puts this folder on the workers' sys.path). Write it as you would a Sequence's
``__getitem__`` body, for one sample, and draw every random number from ``rng``: it is
seeded from (batch.seed, epoch, batch index, position), so each epoch is augmented the same
way on every run and whichever worker makes the batch.
"""

import numpy as np

MAX_SHIFT = 1  # pixels


def shift(fields, doc, rng, feed):
    """Move the 8x8 digit by up to one pixel in each direction (train only), filling with 0."""
    if feed != "train":
        return {}  # val: the decoded image goes out as it is
    image = fields["image"]  # uint8, [8, 8, 1]: as [fields.image] decodes it
    padded = np.pad(image, ((MAX_SHIFT, MAX_SHIFT), (MAX_SHIFT, MAX_SHIFT), (0, 0)))
    top, left = rng.integers(0, 2 * MAX_SHIFT + 1, size=2)
    return {"image": padded[top:top + 8, left:left + 8]}
