"""Tests of data.py on tiny real image files written with Pillow.

Expected values come from independent recomputations (numpy, plain Pillow calls), never from
data.py itself.
"""

import logging
import math
import os
import re
import shutil
import threading
from types import SimpleNamespace

import numpy as np
import paddle
import pytest
from PIL import Image

import augment
import data
from conftest import photo_like_array, write_image

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def make_args(data_path, **overrides):
    args = dict(
        data_path=data_path, train_list=None, val_list=None, input_size=16,
        aa="rand-m9-mstd0.5-inc1", color_jitter=0.4, train_interpolation="bicubic",
        reprob=0.25, remode="pixel", recount=1, scale=(0.08, 1.0), hflip=0.5,
    )
    args.update(overrides)
    return SimpleNamespace(**args)


def build(is_train, args):
    """data.build_dataset with the transform train.py gives it."""
    transform = augment.train_transform(args) if is_train else data.eval_transform(args.input_size)
    return data.build_dataset(is_train, args, transform)


def photo(width=32, height=24, seed=0):
    return Image.fromarray(photo_like_array(width, height, seed))


def pixels(img):
    return np.asarray(img).astype(np.int32)


def _save(img, path, **kwargs):
    img.save(str(path), **kwargs)
    return str(path)


def test_load_image_modes(tmp_path):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    rgb = photo_like_array(8, 6, seed=3)

    path = _save(Image.fromarray(grey), tmp_path / "grey.png")
    assert np.array_equal(pixels(data.load_image(path)), np.repeat(grey[..., None], 3, 2))

    palette = Image.fromarray(rgb).quantize(colors=16)
    path = _save(palette, tmp_path / "palette.png")
    assert np.array_equal(pixels(data.load_image(path)), pixels(palette.convert("RGB")))

    transparent = palette.copy()
    transparent.info["transparency"] = 0
    path = _save(transparent, tmp_path / "palette_transparent.png")
    assert np.array_equal(pixels(data.load_image(path)), pixels(palette.convert("RGB")))

    alpha = Image.fromarray(np.dstack([rgb, np.full((6, 8), 30, np.uint8)]))
    path = _save(alpha, tmp_path / "alpha.png")
    assert np.array_equal(pixels(data.load_image(path)), rgb)  # alpha dropped, colours kept

    path = _save(Image.new("LA", (8, 6), (77, 10)), tmp_path / "grey_alpha.png")
    assert (pixels(data.load_image(path)) == 77).all()

    path = _save(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), tmp_path / "cmyk.jpg")
    assert np.abs(pixels(data.load_image(path)) - [255, 0, 0]).max() <= 3  # pure red

    sixteen = np.array([[0, 257 * 100, 65535]], np.uint16)
    path = _save(Image.fromarray(sixteen), tmp_path / "sixteen.png")
    assert pixels(data.load_image(path))[0, :, 0].tolist() == [0, 100, 255]

    path = _save(Image.fromarray(np.array([[257 * 50]], np.int32)), tmp_path / "int32.tif")
    assert pixels(data.load_image(path))[0, 0].tolist() == [50, 50, 50]

    path = _save(Image.fromarray(np.array([[100.0]], np.float32)), tmp_path / "float.tif")
    assert pixels(data.load_image(path))[0, 0].tolist() == [100, 100, 100]

    path = _save(Image.fromarray(grey > 100), tmp_path / "bilevel.png")
    assert np.array_equal(pixels(data.load_image(path))[..., 0], np.where(grey > 100, 255, 0))

    for name in os.listdir(tmp_path):
        img = data.load_image(str(tmp_path / name))
        assert img.mode == "RGB", name


def test_load_image_applies_exif_orientation_only_when_asked(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide, 20 high
    stored[:, :20] = (255, 0, 0)  # left half red
    stored[:, 20:] = (0, 0, 255)  # right half blue
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: display rotated 90 degrees clockwise
    path = _save(img, tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)

    assert data.load_image(path).size == (40, 20)  # as stored, like the official loader
    loaded = data.load_image(path, exif_orientation=True)

    assert loaded.size == (20, 40)  # now 20 wide, 40 high
    top, bottom = pixels(loaded)[5, 10], pixels(loaded)[34, 10]
    assert top[0] > 200 and top[2] < 60  # the stored left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_image_folder_classes_and_samples(make_image_folder):
    root = make_image_folder(classes=("zebra", "ant", "cat"), train_per_class=2, val_per_class=1)
    write_image(os.path.join(root, "train", "ant", "upper.PNG"))
    open(os.path.join(root, "train", "ant", "notes.txt"), "w").close()

    train = build(True, make_args(root))
    val = build(False, make_args(root))

    assert train.classes == ["ant", "cat", "zebra"] and val.classes == train.classes
    assert len(train) == 7 and len(val) == 3
    names = {os.path.basename(path): label for path, label in train.samples}
    assert names["upper.PNG"] == 0 and names["zebra_0.JPEG"] == 2 and "notes.txt" not in names
    image, label = val[0]
    assert image.shape == (3, 16, 16) and image.dtype == np.uint8
    assert label.dtype == np.int64 and int(label) == 0


def write_broken(path, kind):
    """A file the evaluation transform cannot take, of one kind; its path."""
    if kind == "truncated":
        jpeg = open(write_image(path), "rb").read()
        open(path, "wb").write(jpeg[: len(jpeg) // 2])
    elif kind == "not an image":
        open(path, "w").write("this is not an image")
    else:
        Image.new("RGB", (300_000, 1)).save(path, format="PNG")   # resizes to 18 x 5.4M: too many pixels
    return str(path)


@pytest.mark.parametrize("kind, skipped", [("truncated", True), ("not an image", True), ("elongated", False)])
def test_unreadable_training_images_are_skipped_once_and_counted(make_image_folder, caplog, kind, skipped):
    root = make_image_folder(classes=("a", "b"), train_per_class=2, val_per_class=1)
    bad = write_broken(os.path.join(root, "train", "a", "a_1.JPEG"), kind)
    dataset = build(True, make_args(root))
    index = [path for path, _ in dataset.samples].index(bad)

    with caplog.at_level(logging.WARNING, logger="data"):
        images, labels = zip(*(dataset[index, key] for key in range(3)))

    assert images[0].shape == (3, 16, 16)
    # a broken file is replaced by the next sample (b_0, class 1); an elongated one is cropped
    assert [int(label) for label in labels] == [1 if skipped else 0] * 3
    assert dataset.skipped == int(skipped)
    assert sum(bad in record.getMessage() for record in caplog.records) == int(skipped)  # once


def test_unreadable_counted_across_loader_workers(make_image_folder):
    root = make_image_folder(classes=("a", "b"), train_per_class=4, val_per_class=1)
    for name in ("a/a_1.JPEG", "b/b_2.JPEG"):
        write_broken(os.path.join(root, "train", name), "not an image")
    dataset = build(True, make_args(root))
    # Without repeated augmentation every index is visited once per epoch.
    loader = data.build_loader(dataset, True, batch_size=2, num_workers=2, repeated_aug=False)

    batches = list(loader)

    assert len(batches) == 4  # 8 samples, nothing lost: bad ones were replaced
    assert dataset.skipped == 2  # counted in the workers, visible in this process


def test_augmentations_depend_on_the_sample_not_on_the_worker(tmp_path):
    for index in range(4):  # identical images: only the augmentation tells batches apart
        write_image(tmp_path / "train" / "only" / f"{index}.png", seed=0)
    dataset = build(True, make_args(str(tmp_path)))

    def batches(num_workers):
        loader = data.build_loader(dataset, True, batch_size=1, num_workers=num_workers,
                                   repeated_aug=False)
        return [images.numpy() for images, _ in data.iterate(loader)]

    with_workers, in_process = batches(2), batches(0)
    assert not np.array_equal(with_workers[0], with_workers[1])  # samples differ...
    for got, want in zip(with_workers, in_process):                # ...whoever loads them
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind, reason, workers", [
    ("truncated", "image file is truncated", 0),
    ("elongated", r"a 300000x1 image resizes to .* over Pillow's MAX_IMAGE_PIXELS", 0),
    # Through a worker process: data.iterate relies on Paddle re-raising a worker's exception,
    # with its type and its traceback as the message, in a loader thread; this fails if that changes.
    ("not an image", "cannot identify image file '{bad}'$", 1),
])
def test_a_broken_validation_image_is_an_error_naming_it(make_image_folder, kind, reason, workers):
    root = make_image_folder(classes=("a",), train_per_class=1, val_per_class=2)
    bad = write_broken(os.path.join(root, "val", "a", "a_1.png"), kind)
    message = f"^cannot read image {re.escape(bad)}: " + reason.replace("{bad}", re.escape(bad))
    dataset = build(False, make_args(root))
    if kind == "truncated":
        data.check_image_headers(dataset)        # its header is whole: found when decoded
    else:
        with pytest.raises(data.DatasetError, match=message):
            data.check_image_headers(dataset)

    # The loop must end with the error, not stall (Paddle's in-process reader thread would).
    loader = data.build_loader(dataset, False, batch_size=1, num_workers=workers)
    hook, outcome = threading.excepthook, []

    def run():
        try:
            outcome.append(len(list(data.iterate(loader))))
        except data.DatasetError as error:
            outcome.append(error)

    reader = threading.Thread(target=run, daemon=True)
    reader.start()
    reader.join(timeout=60)
    assert len(outcome) == 1 and isinstance(outcome[0], data.DatasetError)
    assert re.search(message, str(outcome[0])), str(outcome[0])
    assert threading.excepthook is hook


def test_list_files(tmp_path):
    for index in range(4):
        write_image(tmp_path / "images" / f"img {index}.jpg", seed=index)
    (tmp_path / "train.txt").write_text(
        "images/img 0.jpg 0\nimages/img 1.jpg 2\n\nimages/img 2.jpg 1\n")
    (tmp_path / "val.txt").write_text("images/img 3.jpg 2\n")
    args = make_args(str(tmp_path), train_list=str(tmp_path / "train.txt"),
                     val_list=str(tmp_path / "val.txt"))

    train = build(True, args)
    val = build(False, args)

    assert train.classes == ["0", "1", "2"] and val.classes == ["0", "1", "2"]
    assert [label for _, label in train.samples] == [0, 2, 1]
    assert train.samples[1][0] == os.path.join(str(tmp_path), "images/img 1.jpg")
    assert int(val[0][1]) == 2


def _mismatched_val(root):
    os.rename(os.path.join(root, "val", "b"), os.path.join(root, "val", "c"))


def _flat_train(root):
    for name in ("a", "b"):
        shutil.rmtree(os.path.join(root, "train", name))
    write_image(os.path.join(root, "train", "loose.jpg"))


@pytest.mark.parametrize("is_train, change, lists, message", [
    (True, lambda root: shutil.rmtree(os.path.join(root, "train")), None,
     re.escape(os.path.join("data", "train")) + " does not exist"),
    (True, lambda root: os.makedirs(os.path.join(root, "train", "empty")), None, "empty holds no images"),
    (True, _flat_train, None, "no class folders"),
    (False, _mismatched_val, None, r"only in val \['c'\], only in train \['b'\]"),
    (True, None, {"train": "train/a/a_0.JPEG 0\ntrain/a/gone.jpg 1\n"}, r"train.txt:2: image .*gone.jpg does not exist"),
    (True, None, {"train": "train/a/a_0.JPEG 0\ntrain/a/a_1.JPEG one\n"}, "train.txt:2: expected 'relative/path label'"),
    (True, None, {"train": "train/a/a_0.JPEG 1\ntrain/a/a_1.JPEG \u00b2\n"}, "train.txt:2: expected 'relative/path label'"),
    (True, None, {"train": "train/a/a_0.JPEG 100000000\n"}, r"train.txt:1: expected .* label in \[0, 100000\)"),
    (True, None, {"train": b"train/a/a_0.JPEG 1\n\xff\xfe.png 2\n"}, "train.txt:2: not UTF-8 text"),
    (True, None, {"train": "\n\n"}, "train.txt names no images"),
    (True, None, {}, "train.txt does not exist or is not a regular file"),
    (False, None, {"train": "train/a/a_0.JPEG 0\ntrain/b/b_0.JPEG 1\n", "val": "val/a/a_0.png 0\nval/b/b_0.png 7\n"},
     r"val.txt: label 7 of .*b_0.png is not a training class \(training has 2 classes\)"),
])
def test_dataset_errors_name_the_file_and_line(make_image_folder, is_train, change, lists, message):
    root = make_image_folder(classes=("a", "b"), train_per_class=1, val_per_class=1, size=(8, 8))
    if change:
        change(root)
    paths = {}
    for split in ("train", "val") if lists is not None else ():
        paths[f"{split}_list"] = os.path.join(root, f"{split}.txt")
        if split in lists:
            content = lists[split]
            open(paths[f"{split}_list"], "wb").write(content if isinstance(content, bytes) else content.encode())
    if is_train:
        paths.pop("val_list", None)
    with pytest.raises(data.DatasetError, match=message):
        build(is_train, make_args(root, **paths))


def test_eval_transform_matches_pillow_and_numpy():
    img = photo(50, 40, seed=9)
    transform = data.eval_transform(32, crop_pct=0.875, interpolation="bicubic")

    out = transform(img)

    # shorter side floor(32 / 0.875) = 36, longer int(36 * 50 / 40) = 45
    resized = np.asarray(img.resize((45, 36), Image.BICUBIC))
    top, left = int(round((36 - 32) / 2)), int(round((45 - 32) / 2))
    expected = resized[top:top + 32, left:left + 32].transpose(2, 0, 1)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    assert not np.array_equal(data.eval_transform(32, interpolation="nearest")(img), out)
    with pytest.raises(KeyError, match="lanczos"):
        data.eval_transform(32, interpolation="lanczos")


def test_normalize_on_the_host_and_on_the_device():
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 3, 5, 4), dtype=np.uint8)
    expected = (pixels.astype(np.float32) / 255.0 - MEAN[:, None, None]) / STD[:, None, None]
    np.testing.assert_allclose(data.normalize(pixels), expected, rtol=1e-6, atol=1e-6)
    on_device = data.normalize(paddle.to_tensor(pixels))
    assert on_device.dtype == paddle.float32
    np.testing.assert_allclose(on_device.numpy(), expected, rtol=1e-6, atol=1e-6)


def stream(size, ranks, rank, seed=0, epoch=0, repeats=3):
    """The indices one rank trains on in an epoch, in order (batches of one)."""
    sampler = data.TrainBatchSampler(size, 1, ranks, rank, seed, repeats)
    sampler.epoch = epoch
    return [index for batch in sampler for index, _ in batch]


def test_repeated_aug_sampler_deals_three_copies_to_different_ranks():
    size, ranks = 1000, 4
    order = data.TrainBatchSampler(size, 1, ranks, 0, 5, 3).order()
    assert len(order) == 3000
    assert (np.bincount(order, minlength=size) == 3).all()  # before truncation

    streams = [stream(size, ranks, rank, seed=5) for rank in range(ranks)]
    per_rank = (1000 // 256 * 256) // 4  # DeiT: floor(len // 256 * 256 / replicas) = 192
    assert [len(indices) for indices in streams] == [per_rank] * ranks
    # rank r holds positions r, r + R, ...: interleaving the streams rebuilds the order's prefix
    assert np.array_equal(np.stack(streams, axis=1).reshape(-1), order[: per_rank * ranks])
    for index in range(size):  # the repeats of an image sit on distinct ranks
        holders = [rank for rank, indices in enumerate(streams) if index in indices]
        copies = sum(indices.count(index) for indices in streams)
        assert copies == len(holders)


def test_training_order_epochs_tiny_datasets_and_plain_shuffle():
    epoch0, epoch1 = stream(600, 2, 0, seed=1), stream(600, 2, 0, seed=1, epoch=1)
    assert epoch0 != epoch1 and stream(600, 2, 0, seed=1, epoch=1) == epoch1

    for size, ranks in ((10, 2), (10, 3), (1, 4)):  # below 256 images: ceil(N / R) each
        assert [len(stream(size, ranks, rank)) for rank in range(ranks)] == [math.ceil(size / ranks)] * ranks

    shuffled = [stream(10, 3, rank, seed=2, repeats=1) for rank in range(3)]
    assert [len(indices) for indices in shuffled] == [4, 4, 4]
    assert set(sum(shuffled, [])) == set(range(10))


def test_loaders_batches_seeds_and_epochs(make_image_folder):
    root = make_image_folder(classes=("a", "b"), train_per_class=4, val_per_class=3)
    args = make_args(root)

    def first_batch(rank=0, epoch=0, seed=0):
        dataset = build(True, args)
        loader = data.build_loader(
            dataset, True, batch_size=2, num_replicas=2, rank=rank, seed=seed)
        data.set_loader_epoch(loader, epoch)
        images, labels = next(data.iterate(loader))
        return images.numpy(), labels.numpy()

    images, labels = first_batch()
    assert images.shape == (2, 3, 16, 16) and images.dtype == np.float32
    assert labels.shape == (2,) and labels.dtype == np.int64
    assert np.array_equal(first_batch()[0], images)  # same seed, rank, epoch: same batch
    assert not np.array_equal(first_batch(epoch=1)[0], images)
    assert not np.array_equal(first_batch(rank=1)[0], images)

    loader = data.build_loader(build(True, args), True, batch_size=2, num_replicas=2, rank=1, seed=7)
    data.set_loader_epoch(loader, 3)
    keys = [key for batch in loader.batch_sampler for _, key in batch]
    assert keys == [(7, 1, 3, position) for position in range(len(keys))]  # (seed, rank, epoch, position)

    val = build(False, args)
    shards = [[int(label) for _, labels in data.build_loader(val, False, batch_size=2, num_replicas=2,
                                                               rank=rank) for label in labels.numpy()]
              for rank in range(2)]
    assert [len(shard) for shard in shards] == [3, 3]
    assert sorted(sum(shards, [])) == [0, 0, 0, 1, 1, 1]  # every validation image exactly once
    assert list(data.build_loader(val, False, batch_size=2, num_replicas=4, rank=1).batch_sampler) == [[1, 5]]

    dataset = build(True, args)
    seeded = dataset[0, (3, 0, 0, 0)][0]
    assert np.array_equal(dataset[0, (3, 0, 0, 0)][0], seeded)       # the seed decides the sample
    assert not np.array_equal(dataset[0, (3, 0, 1, 0)][0], seeded)   # another epoch, another draw

    with pytest.raises(ValueError, match="fewer than the batch size"):
        data.build_loader(build(True, args), True, batch_size=16)


def test_demo_data_is_a_valid_image_folder():
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo_data")
    args = make_args(root, input_size=32)
    train = build(True, args)
    val = build(False, args)
    assert train.classes == [str(digit) for digit in range(10)]
    assert (len(train), len(val)) == (1442, 355)
    image, label = val[0]
    assert image.shape == (3, 32, 32) and int(label) == 0


def test_folder_scan_reads_regular_files_once_and_never_loops(make_image_folder, tmp_path):
    root = make_image_folder(classes=("cat", "dog"), train_per_class=4, val_per_class=1)
    cat = os.path.join(root, "train", "cat")
    os.symlink(".", os.path.join(cat, "again"))                 # a loop: cat/again/again/...
    os.symlink(cat, os.path.join(root, "train", "dog", "cats"))  # a link into another class
    os.symlink(os.path.join(cat, "cat_0.JPEG"), os.path.join(cat, "linked.JPEG"))  # a link to a file
    os.mkfifo(os.path.join(cat, "fifo.png"))                     # would block any reader
    samples, classes = data.scan_image_folder(os.path.join(root, "train"))
    names = sorted(os.path.relpath(path, os.path.join(root, "train")) for path, _ in samples)
    assert names == ["cat/cat_0.JPEG", "cat/cat_1.JPEG", "cat/cat_2.JPEG", "cat/cat_3.JPEG",
                     "cat/linked.JPEG", "dog/dog_0.JPEG", "dog/dog_1.JPEG", "dog/dog_2.JPEG", "dog/dog_3.JPEG"]
    with pytest.raises(ValueError, match="not a regular file"):   # at once, not after a hang
        data.load_image(os.path.join(cat, "fifo.png"))
