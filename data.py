"""Data for CycleMLP: images, datasets, the evaluation transform, samplers and loaders.

The data side of the official code (ShoufaChen/CycleMLP `datasets.py`, `samplers.py`, `main.py`),
without DeiT and timm (training's transform is in augment.py). Datasets are ImageNet-style class
folders (`DATA/train/<class>/*`, `DATA/val/<class>/*`) or PaddleClas list files (`relative/path
label` per line). Not reproduced: the official CIFAR branch (the ImageNet transforms serve every size).
"""
import logging
import math
import multiprocessing
import os
import re
import stat
import struct
import threading
from typing import Callable, List, Optional, Tuple, Union

import numpy as np
import zlib  # noqa: F401  before Paddle: Paddle 2.6 bundles a zlib that crashes one loaded after it
import paddle
from PIL import Image, ImageOps

from safe_io import printable
from weights import INTERPOLATION_NAMES, MAX_CLASSES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875  # 224 / 256: the official evaluation resize rule
# The evaluation transform of the official code; a checkpoint records its own (data_config).
EVAL_DEFAULTS = dict(input_size=224, crop_pct=DEFAULT_CROP_PCT, interpolation='bicubic')

# Pillow renamed its enums in 9.1; the old module-level names are gone in some versions.
_RESAMPLING = getattr(Image, 'Resampling', Image)
INTERPOLATIONS = {name: getattr(_RESAMPLING, name.upper()) for name in INTERPOLATION_NAMES}

# Every extension Pillow can open (not only save), compared lower-case.
IMAGE_EXTENSIONS = frozenset(ext.lower() for ext, image_format in Image.registered_extensions().items()
                             if image_format in Image.OPEN)

# What a broken image file can raise while Pillow opens, decodes or converts it
# (UnidentifiedImageError and truncation are OSErrors; some plugins raise the others).
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error,
                           Image.DecompressionBombError)
# Give up when this many consecutive training samples cannot be read: the data is broken.
MAX_CONSECUTIVE_UNREADABLE = 100
# Repeated augmentation (DeiT's RASampler).
RA_REPEATS = 3
RA_EPOCH_MULTIPLE = 256  # DeiT rounds the number of samples per epoch down to a multiple of this

logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset that cannot be used as given: the message names the path and the problem."""


def open_image(path: str) -> Image.Image:
    """Image.open of a regular file (a FIFO or device would block the read forever)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError('not a regular file')
    return Image.open(path)


def load_image(path: str, exif_orientation: bool = False, reduce_to: Optional[int] = None) -> Image.Image:
    """The image file decoded fully into 8-bit RGB; one of UNREADABLE_IMAGE_ERRORS if it cannot be.
    EXIF orientation is ignored as by the official loader, so accuracies reproduce, unless asked for
    (predict.py); `reduce_to` (--fast-decode) shrinks by an integer factor, the shorter side >= reduce_to."""
    with open_image(path) as img:
        if reduce_to:   # a JPEG decodes at 1/2, 1/4 or 1/8 scale (DCT scaling); other formats ignore it
            img.draft('RGB', (reduce_to, reduce_to))
        img.load()  # decode now, so a truncated file fails here rather than in a transform
        if exif_orientation:
            img = ImageOps.exif_transpose(img)
        if img.mode.startswith('I'):
            # 16/32-bit grey from 0..65535 (65535 / 257 == 255): Pillow's conversion clips at 255,
            # which turns most 16-bit images white.
            img = Image.fromarray(np.clip(np.round(np.asarray(img) / 257.0), 0, 255).astype(np.uint8))
        elif img.mode in ('P', 'PA'):
            img = img.convert('RGBA')  # a palette expands through RGBA: transparency needs no case
        img = img if img.mode == 'RGB' else img.convert('RGB')
    factor = min(img.size) // reduce_to if reduce_to else 1
    return img.reduce(factor) if factor > 1 else img


class ImageDataset(paddle.io.Dataset):
    """(path, label) samples through load_image and transform(img, rng): (uint8 CHW, int64 label).
    Training asks for (index, key) (TrainBatchSampler): the key seeds the augmentation, whichever
    worker loads it. With `skip_unreadable` (training) a broken file is warned about once and the next
    sample used, counted in `skipped` across workers; without it (evaluation) it is a DatasetError:
    a metric that silently drops images is wrong."""

    def __init__(self, samples: List[Tuple[str, int]], classes: List[str], transform: Callable,
                 skip_unreadable: bool) -> None:
        super().__init__()
        self.samples, self.classes, self.transform = samples, classes, transform
        self.skip_unreadable = skip_unreadable
        self._unreadable_flags = multiprocessing.RawArray('b', len(samples))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key) -> Tuple[np.ndarray, np.int64]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        rng = np.random.default_rng(seed) if seed is not None else None
        attempts = min(len(self.samples), MAX_CONSECUTIVE_UNREADABLE)
        for attempt in range(attempts):
            sample_index = (index + attempt) % len(self.samples)
            path, label = self.samples[sample_index]
            try:
                return self.transform(load_image(path), rng), np.int64(label)
            except UNREADABLE_IMAGE_ERRORS as error:   # a broken file, or one too elongated to resize
                if not self.skip_unreadable:
                    raise DatasetError(f'cannot read image {path}: {error}') from error
                if not self._unreadable_flags[sample_index]:
                    self._unreadable_flags[sample_index] = 1
                    logger.warning('skipping unreadable image %s (%s); using the next one',
                                   printable(path), printable(error))
        raise DatasetError(f'{attempts} consecutive images from {self.samples[index][0]} on cannot be '
                           'read; check the dataset')

    @property
    def skipped(self) -> int:   # distinct files found unreadable so far, across all workers
        return int(np.count_nonzero(np.frombuffer(self._unreadable_flags, dtype=np.int8)))


def build_dataset(is_train: bool, args, transform: Callable) -> ImageDataset:
    """The split named by args.data_path and args.train_list / args.val_list (None: class folders).
    Validation takes the training split's classes whenever it exists, so label indices agree."""
    list_path = args.train_list if is_train else args.val_list
    samples, classes = (read_list_file(list_path, args.data_path) if list_path
                        else scan_image_folder(os.path.join(args.data_path, 'train' if is_train else 'val')))
    train_classes = None if is_train else _train_classes(args)
    if train_classes is not None:
        if args.val_list:
            path, label = max(samples, key=lambda sample: sample[1])
            if label >= len(train_classes):
                raise DatasetError(f'{args.val_list}: label {label} of {path} is not a training class '
                                   f'(training has {len(train_classes)} classes)')
        elif classes != train_classes:
            only_val = sorted(set(classes) - set(train_classes))
            only_train = sorted(set(train_classes) - set(classes))
            raise DatasetError(f"class folders of {os.path.join(args.data_path, 'val')} differ from "
                               f'training: only in val {only_val[:10]}, only in train {only_train[:10]}')
        classes = train_classes
    return ImageDataset(samples, classes, transform, skip_unreadable=is_train)


def _train_classes(args) -> Optional[List[str]]:
    if args.train_list:
        return read_list_file(args.train_list, args.data_path, check_files=False)[1]
    train_root = os.path.join(args.data_path, 'train')
    return _class_folders(train_root) if os.path.isdir(train_root) else None


def _class_folders(root: str) -> List[str]:
    return sorted(entry.name for entry in os.scandir(root)
                  if entry.is_dir() and not entry.name.startswith('.'))


def is_regular_file(path: str) -> bool:
    """A regular file, or a symbolic link to one (not a FIFO, device or folder)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def scan_image_folder(root: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    """(path, class index) for every image under root/<class>/ (recursively), and the sorted class
    names, as torchvision's ImageFolder. Images are regular files (or links to one) with an extension
    Pillow opens; links to folders are not followed, so a link loop cannot multiply or hang the scan."""
    if not os.path.isdir(root):
        raise DatasetError(f'image folder {root} does not exist')
    classes = _class_folders(root)
    if not classes:
        raise DatasetError(f'no class folders in {root}: expected {root}/<class>/<image>')
    samples = []
    for label, name in enumerate(classes):
        class_root = os.path.join(root, name)
        class_samples = [
            (path, label)
            for folder, _, file_names in sorted(os.walk(class_root))
            for path in (os.path.join(folder, name) for name in sorted(file_names))
            if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS and is_regular_file(path)
        ]
        if not class_samples:
            raise DatasetError(f'class folder {class_root} holds no images')
        samples.extend(class_samples)
    return samples, classes


def read_list_file(list_path: str, data_path: str,
                   check_files: bool = True) -> Tuple[List[Tuple[str, int]], List[str]]:
    """(path, label) per line `relative/path label` of a PaddleClas list file, and the class names
    '0' .. the largest label: paths relative to data_path, may hold spaces (the label is the last
    field); blank lines ignored. With `check_files`, every named file must be a regular file."""
    if not is_regular_file(list_path):
        raise DatasetError(f'list file {list_path} does not exist or is not a regular file')
    samples = []
    with open(list_path, 'rb') as lines:
        for line_number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode('utf-8')
            except UnicodeDecodeError:
                raise DatasetError(f'{list_path}:{line_number}: not UTF-8 text') from None
            if not line.strip():
                continue
            fields = line.rsplit(maxsplit=1)
            if len(fields) != 2 or not re.fullmatch('[0-9]{1,9}', fields[1]) or int(fields[1]) >= MAX_CLASSES:
                raise DatasetError(f"{list_path}:{line_number}: expected 'relative/path label' with a "
                                   f'label in [0, {MAX_CLASSES}), got {line.rstrip()[:80]!r}')
            path = os.path.join(data_path, fields[0])
            if check_files and not is_regular_file(path):
                raise DatasetError(f'{list_path}:{line_number}: image {path} does not exist or is '
                                   'not a regular file')
            samples.append((path, int(fields[1])))
    if not samples:
        raise DatasetError(f'list file {list_path} names no images')
    return samples, [str(label) for label in range(max(label for _, label in samples) + 1)]


def to_chw(img: Image.Image) -> np.ndarray:
    """RGB image -> uint8 (3, H, W): what workers send (a quarter of float32's shared memory);
    `normalize` runs on the batch, on the device."""
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))  # (H, W, C) -> (C, H, W)


def normalize(images):
    """uint8 (..., 3, H, W) -> float32 in [0, 1] normalised with the ImageNet mean and std; a numpy
    array gives a numpy array, a Paddle tensor stays on its device."""
    if isinstance(images, np.ndarray):
        mean, std = (np.array(values, np.float32).reshape(3, 1, 1) for values in (IMAGENET_MEAN, IMAGENET_STD))
        return (images.astype(np.float32) / np.float32(255.0) - mean) / std
    # The constants are filled on the device: a copy from the host would wait for the device.
    mean, std = (paddle.concat([paddle.full([1, 1, 1], value, 'float32') for value in values])
                 for values in (IMAGENET_MEAN, IMAGENET_STD))
    return (images.astype('float32') / paddle.full([1], 255.0, 'float32') - mean) / std


def shorter_side_target(width: int, height: int, size: int) -> Tuple[int, int]:
    """torchvision's Resize(size) of a width x height image; ValueError when that is more pixels than
    Pillow allows (an extreme aspect ratio, e.g. 20000000 x 1)."""
    target = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
    if target[0] * target[1] > Image.MAX_IMAGE_PIXELS:
        raise ValueError(f'a {width}x{height} image resizes to {target[0]}x{target[1]}, over '
                         f'Pillow\'s MAX_IMAGE_PIXELS ({Image.MAX_IMAGE_PIXELS})')
    return target


class EvalTransform:
    """torchvision's Resize(floor(input_size / crop_pct)) and CenterCrop(input_size), for evaluation
    and inference: PIL RGB image -> uint8 (3, S, S); `rng` is accepted so datasets call every transform
    alike. The settings come checked (cli.py's flags, weights.check_data_config for recorded ones)."""

    def __init__(self, input_size: int = EVAL_DEFAULTS['input_size'], crop_pct: float = DEFAULT_CROP_PCT,
                 interpolation: str = EVAL_DEFAULTS['interpolation']) -> None:
        self.input_size, self.resize_size = input_size, math.floor(input_size / crop_pct)
        self.resample = INTERPOLATIONS[interpolation]

    def __call__(self, img: Image.Image, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        if min(img.size) != self.resize_size:
            img = img.resize(shorter_side_target(*img.size, self.resize_size), self.resample)
        top = int(round((img.height - self.input_size) / 2.0))
        left = int(round((img.width - self.input_size) / 2.0))
        return to_chw(img.crop((left, top, left + self.input_size, top + self.input_size)))


eval_transform = EvalTransform   # the name the commands import


def check_image_headers(dataset: ImageDataset) -> None:
    """Read every image's header (not its pixels): a file that is not an image, or one too elongated
    to resize, is a DatasetError naming it before any time is spent (a truncated one only when decoded)."""
    for path, _ in dataset.samples:
        try:
            with open_image(path) as img:
                shorter_side_target(*img.size, dataset.transform.resize_size)
        except UNREADABLE_IMAGE_ERRORS as error:
            raise DatasetError(f'cannot read image {path}: {error}') from None


class TrainBatchSampler:
    """One rank's full training batches for `epoch`, each sample as (index, key): the key (seed,
    rank, epoch, position in this rank's epoch) seeds its augmentation, so resumes are exact.
    DeiT's RASampler: a permutation seeded with seed + epoch, each index `repeats` times in a row,
    padded from its start to a multiple of R ranks and dealt by striding, so the copies of an image
    land on different ranks. With repeats each rank keeps floor((N // 256) * 256 / R) samples (DeiT's
    rule: an epoch stays about N samples long, not 3N); without, or below 256 images, ceil(N / R)."""

    def __init__(self, dataset_size: int, batch_size: int, num_replicas: int, rank: int, seed: int,
                 repeats: int) -> None:
        self.dataset_size, self.batch_size, self.repeats = dataset_size, batch_size, repeats
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        rounded = dataset_size // RA_EPOCH_MULTIPLE * RA_EPOCH_MULTIPLE // num_replicas if repeats > 1 else 0
        self.num_selected = rounded or math.ceil(dataset_size / num_replicas)

    def order(self) -> np.ndarray:
        """This epoch's order over all ranks, before striding and truncation."""
        total = math.ceil(self.dataset_size * self.repeats / self.num_replicas) * self.num_replicas
        permutation = np.random.default_rng(self.seed + self.epoch).permutation(self.dataset_size)
        return np.resize(np.repeat(permutation, self.repeats), total)  # np.resize pads from the start

    def __iter__(self):
        indices = self.order()[self.rank::self.num_replicas][:self.num_selected].tolist()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield [(index, (self.seed, self.rank, self.epoch, start + offset))
                   for offset, index in enumerate(indices[start:start + self.batch_size])]

    def __len__(self) -> int:
        return self.num_selected // self.batch_size


class InProcessLoader:
    """paddle.io.DataLoader(num_workers=0)'s batches, loaded in the calling thread: Paddle's runs
    the dataset in a reader thread, and an exception there (an unreadable validation image) ends
    that thread while the loop waits for its next batch forever (Paddle 3.3)."""

    def __init__(self, dataset: ImageDataset, batch_sampler) -> None:
        self.dataset, self.batch_sampler = dataset, batch_sampler

    def __iter__(self):
        for indices in self.batch_sampler:
            images, labels = zip(*(self.dataset[index] for index in indices))
            yield paddle.to_tensor(np.stack(images)), paddle.to_tensor(np.array(labels, np.int64))

    def __len__(self) -> int:
        return len(self.batch_sampler)


def build_loader(dataset: ImageDataset, is_train: bool, batch_size: int, num_workers: int = 0,
                 num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 repeated_aug: bool = True) -> Union[paddle.io.DataLoader, InProcessLoader]:
    """This rank's batches of (uint8 [B, 3, S, S], int64 [B]) tensors for `iterate`, from worker
    processes (none when num_workers is 0). Training: TrainBatchSampler; call `set_loader_epoch`
    before each epoch. Evaluation: rank r takes indices r, r + R, ... so every image is seen once;
    ranks may differ by one sample, so reduce the metric sums after the loop, not per batch."""
    if is_train:
        batch_sampler = TrainBatchSampler(len(dataset), batch_size, num_replicas, rank, seed,
                                          RA_REPEATS if repeated_aug else 1)
        if len(batch_sampler) == 0:
            raise ValueError(f'rank {rank} gets {batch_sampler.num_selected} training samples per epoch, '
                             f'fewer than the batch size {batch_size}: no full batch to train on')
    else:
        shard = range(rank, len(dataset), num_replicas)   # batched here: Paddle 2.6 samples no range
        batch_sampler = [list(shard[start:start + batch_size]) for start in range(0, len(shard), batch_size)]
    if num_workers == 0:
        return InProcessLoader(dataset, batch_sampler)
    # Workers are forked per pass: Paddle's persistent_workers breaks on a pass left unfinished
    # (the next pass raises IndexError in Paddle's iterator, and its shutdown can wait forever;
    # seen with Paddle 3.3), which an error or Ctrl-C mid-epoch would leave.
    return paddle.io.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers)


def set_loader_epoch(loader: Union[paddle.io.DataLoader, InProcessLoader], epoch: int) -> None:
    loader.batch_sampler.epoch = epoch   # reseeds the sample order and the augmentations


def iterate(loader):
    """The batches of `loader`, images normalised on the device; an image a worker process could
    not read ends the loop with its DatasetError. (Paddle re-raises a worker's exception, its type
    and traceback as the message, in a loader thread, and the main thread then gets a SystemError
    from the closed queue; tests/test_data.py checks that this still holds.)"""
    failures = []
    previous_hook = threading.excepthook

    def hook(hook_args):
        if issubclass(hook_args.exc_type, DatasetError):
            failures.append(str(hook_args.exc_value).strip().splitlines()[-1])
        else:
            previous_hook(hook_args)

    threading.excepthook = hook
    try:
        for images, labels in loader:
            yield normalize(images), labels
        return
    except Exception:
        if not failures:
            raise
    finally:
        threading.excepthook = previous_hook
    # Raised here, after the except block has dropped Paddle's exception: its traceback would
    # keep the loader's iterator, and so its worker threads, alive until interpreter shutdown.
    raise DatasetError(failures[0].split('DatasetError: ', 1)[-1])
