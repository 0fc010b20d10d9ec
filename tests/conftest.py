"""Shared pytest fixtures: tiny real image files and ImageNet-style folders made with Pillow."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# The scripts are flat files at the repository root, not an installed package.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# The test process computes as every command does (threads, and MKL's code path on AMD, which
# MKL fixes at its first use): results of a command run in a subprocess and of the same code run
# in this process are then equal on every processor, whatever test ran first.
import cpu_setup  # noqa: E402

cpu_setup.configure()

# Base colour per class, so images of different classes really differ.
CLASS_COLOURS = ((200, 40, 40), (40, 160, 60), (50, 70, 210), (190, 170, 30), (120, 40, 160))


def photo_like_array(width: int, height: int, seed: int, colour=(128, 128, 128)) -> np.ndarray:
    """uint8 (height, width, 3): a colour gradient plus a bright disc plus noise, so resizing,
    cropping and every RandAugment op change it visibly."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    gradient = (xs / max(width - 1, 1))[..., None] * np.array([90, -40, 60], np.float32)
    gradient += (ys / max(height - 1, 1))[..., None] * np.array([-50, 80, 30], np.float32)
    center_x, center_y = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
    disc = ((xs - center_x) ** 2 + (ys - center_y) ** 2) < (0.2 * min(width, height)) ** 2
    pixels = np.asarray(colour, np.float32) + gradient + 60.0 * disc[..., None]
    pixels += rng.normal(0.0, 12.0, size=pixels.shape)
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def write_image(
    path, width: int = 40, height: int = 30, seed: int = 0, colour=(128, 128, 128)
) -> str:
    """Save a photo-like RGB image; the format follows the extension (JPEG, PNG, ...)."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    Image.fromarray(photo_like_array(width, height, seed, colour)).save(str(path))
    return str(path)


def write_image_folder(root, classes=("cat", "dog"), train_per_class=4, val_per_class=2,
                       size=(40, 30)) -> str:
    """root/train/<class>/*.JPEG and root/val/<class>/*.png; returns root as a string."""
    root = Path(root)
    seed = 0
    for class_index, name in enumerate(classes):
        colour = CLASS_COLOURS[class_index % len(CLASS_COLOURS)]
        for split, count, extension in (("train", train_per_class, "JPEG"),
                                        ("val", val_per_class, "png")):
            for image_index in range(count):
                seed += 1
                write_image(root / split / name / f"{name}_{image_index}.{extension}",
                            size[0], size[1], seed, colour)
    return str(root)


@pytest.fixture
def make_image_folder(tmp_path):
    """Factory: make_image_folder(classes=('cat', 'dog'), train_per_class=4, val_per_class=2,
    size=(40, 30)) -> root with root/train/<class>/*.JPEG and root/val/<class>/*.png."""
    def make(classes=("cat", "dog"), train_per_class=4, val_per_class=2, size=(40, 30), root=None):
        return write_image_folder(root if root is not None else tmp_path / "data", classes,
                                  train_per_class, val_per_class, size)
    return make


@pytest.fixture
def image_folder(make_image_folder):
    """A ready folder: classes cat and dog, 4 train JPEGs and 2 val PNGs each, 40x30."""
    return make_image_folder()


# The one tiny CycleNet of the tests, milliseconds to run: the shape of the official fixture
# (tests/fixtures/official_tiny.pth), written by the official code.
TINY_CONFIG = dict(layers=[1, 1, 2, 1], embed_dims=[8, 16, 24, 32], mlp_ratios=[2, 2, 2, 2])


def tiny_state(seed: int, num_classes: int = 3) -> dict:
    """The state dict (numpy) of a freshly initialised tiny CycleNet, seeded."""
    import paddle
    from cyclemlp import CycleNet
    paddle.seed(seed)
    model = CycleNet(num_classes=num_classes, **TINY_CONFIG)
    return {key: value.numpy() for key, value in model.state_dict().items()}


@pytest.fixture
def make_tiny_weights(tmp_path):
    """Factory: make_tiny_weights(name='tiny.pdparams', seed=0, class_names=('cat', 'dog', 'fox'),
    data_config=None) -> path of a .pdparams written by weights.write_weights with class_names
    and, when given, data_config: the .pdparams layout write_weights writes, saved as it is (so
    that metadata write_weights would refuse can be written too, as by hand)."""
    from weights import atomic_save

    def make(name="tiny.pdparams", seed=0, class_names=("cat", "dog", "fox"), data_config=None):
        path = str(tmp_path / name)
        meta = {"class_names": list(class_names)}
        if data_config:
            meta["data_config"] = data_config
        atomic_save({"model": tiny_state(seed, len(class_names)), **meta}, path)
        return path
    return make
