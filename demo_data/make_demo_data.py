"""Regenerate demo_data/ from scikit-learn's copy of the UCI handwritten digits (optdigits).

Writes every one of the 1,797 8x8 digit images as an 8-bit greyscale PNG at its native size,
into demo_data/train/<digit>/ or demo_data/val/<digit>/. The split is fixed and stratified:
within each digit, in scikit-learn's order, every fifth image (positions 4, 9, 14, ...) goes to
val, the rest to train (about 80/20). File names carry the image's index in load_digits().

Needs scikit-learn (`pip install scikit-learn`); the tests and training never run this script.
Usage: python demo_data/make_demo_data.py
"""

import os
import shutil

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

DEMO_ROOT = os.path.dirname(os.path.abspath(__file__))
VAL_EVERY = 5  # every fifth image of a digit is held out: an 80/20 split
DIGITS_MAX_VALUE = 16  # load_digits grey levels run 0..16 (ink counts in a 4x4 block)


def main() -> None:
    digits = load_digits()
    for split in ("train", "val"):
        shutil.rmtree(os.path.join(DEMO_ROOT, split), ignore_errors=True)
    position_in_class = {}
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        position = position_in_class.get(label, 0)
        position_in_class[label] = position + 1
        split = "val" if position % VAL_EVERY == VAL_EVERY - 1 else "train"
        folder = os.path.join(DEMO_ROOT, split, str(label))
        os.makedirs(folder, exist_ok=True)
        grey = np.round(pixels * 255.0 / DIGITS_MAX_VALUE).astype(np.uint8)
        Image.fromarray(grey).save(os.path.join(folder, f"{index:04d}.png"), optimize=True)


if __name__ == "__main__":
    main()
