"""Small datasets bundled with bnfast, read without any download.

digits.npz: the UCI "Optical Recognition of Handwritten Digits" test set
(E. Alpaydin and C. Kaynak, 1998; UCI Machine Learning Repository,
https://doi.org/10.24432/C50P49, CC BY 4.0), as scikit-learn ships it: 1,797
images of 8x8 pixels, each pixel the count (0..16) of set pixels in a 4x4
block of a 32x32 bitmap, with labels 0..9. Stored as uint8.
"""
import os

import numpy as np

_DIR = os.path.dirname(os.path.abspath(__file__))


def load_digits():
    """The bundled digits: ``images`` (1797, 8, 8) float64 in [0, 16], ``labels`` (1797,) int64."""
    with np.load(os.path.join(_DIR, "digits.npz"), allow_pickle=False) as data:
        images = data["images"].astype(np.float64)
        labels = data["labels"].astype(np.int64)
    return images, labels
