"""Data for CycleMLP: images, datasets, the evaluation transform, samplers and loaders.

Reproduces the data side of the official code (ShoufaChen/CycleMLP `datasets.py`,
`samplers.py`, `main.py`), which builds on DeiT and timm, without depending on either:

    eval   resize shorter side to input_size / 0.875 (bicubic) -> center crop -> normalise
    order  repeated augmentation x3 (DeiT's RASampler), split across ranks

The training augmentation is augment.py's. Per-image work is plain numpy and Pillow; datasets,
samplers and loaders use Paddle.

Datasets are ImageNet-style class folders (`DATA/train/<class>/*`, `DATA/val/<class>/*`) or
PaddleClas-style list files (`relative/path label` per line, relative to the data path).

Not reproduced: the official CIFAR branch (RandomCrop with padding for input sizes <= 32; the
ImageNet transforms are used at every size).
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

from weights import INTERPOLATION_NAMES, printable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875  # 224 / 256: the official evaluation resize rule
# The evaluation transform of the official code; a checkpoint records its own (data_config).
EVAL_DEFAULTS = dict(input_size=224, crop_pct=DEFAULT_CROP_PCT, interpolation='bicubic')

# Pillow renamed its enums in 9.1; the old module-level names are gone in some versions.
_RESAMPLING = getattr(Image, 'Resampling', Image)
INTERPOLATIONS = {name: getattr(_RESAMPLING, name.upper()) for name in INTERPOLATION_NAMES}

# Every extension Pillow can open (not only save), compared lower-case.
IMAGE_EXTENSIONS = frozenset(
    ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN
)

# What a broken image file can raise while Pillow opens, decodes or converts it
# (UnidentifiedImageError and truncation are OSErrors; some plugins raise the others).
UNREADABLE_IMAGE_ERRORS = (
    OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError,
)
MAX_CLASSES = 100_000      # labels of a list file (ImageNet-21k has 21,841 classes)
# Give up when this many consecutive training samples cannot be read: the data is broken.
MAX_CONSECUTIVE_UNREADABLE = 100
# Repeated augmentation (DeiT's RASampler).
RA_REPEATS = 3
RA_EPOCH_MULTIPLE = 256  # DeiT rounds the number of samples per epoch down to a multiple of this

logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset that cannot be used as given: the message names the path and the problem."""


def load_image(path: str, exif_orientation: bool = False) -> Image.Image:
    """Decode an image file fully into an 8-bit RGB Pillow image.

    Training and evaluation read images as the official code's loader does (torchvision's
    ImageFolder: PIL open and convert to RGB), which ignores the EXIF orientation tag, so that
    accuracies reproduce the official ones; predict.py asks for `exif_orientation`, so that a
    phone photo is classified the way up a person sees it.

    Mode rules: alpha is dropped (RGBA -> RGB, as torchvision's loader that the official code
    uses does), palettes expand through RGBA so transparency needs no special case, 16-bit and
    32-bit integer grey levels are scaled from 0..65535 to 0..255, float ('F') images follow
    Pillow's own 0..255 convention (clipped), CMYK/YCbCr/1/L/LA convert as Pillow does.
    Pillow's decompression-bomb guard stays on. Raises one of UNREADABLE_IMAGE_ERRORS for a
    corrupt, truncated or non-image file.
    """
    if not stat.S_ISREG(os.stat(path).st_mode):   # a FIFO or device would block the read forever
        raise ValueError('not a regular file')
    with Image.open(path) as img:
        img.load()  # decode now, so a truncated file fails here rather than in a transform
        if exif_orientation:
            img = ImageOps.exif_transpose(img)
        return _to_rgb(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == 'RGB':
        return img
    if img.mode.startswith('I'):
        # Pillow's own conversion clips these at 255, which turns most 16-bit images white.
        grey = np.asarray(img).astype(np.float64) / 257.0  # 65535 / 257 == 255
        grey = np.clip(np.round(grey), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert('RGB')
    if img.mode in ('P', 'PA'):
        img = img.convert('RGBA')
    return img.convert('RGB')


class ImageDataset(paddle.io.Dataset):
    """Samples (path, label) decoded with `load_image` and passed through `transform`.

    An item is asked for by its index, or for training by (index, seed) as SeededBatchSampler
    gives it: `transform(img, rng)` then draws from numpy's Generator seeded with `seed`, so each
    sample's augmentation depends only on (run seed, rank, epoch, position in the epoch), never
    on which worker process loads it or how many there are. Returns (uint8 CHW array, int64 label).

    With `skip_unreadable` (training) a file that cannot be decoded is reported once with a
    warning naming it and the next index is used instead, so the batch keeps its size. The flags
    behind `skipped` live in shared memory created here, in the parent process, so the count
    covers every DataLoader worker and every epoch. Without it (evaluation) such a file raises
    DatasetError, because a metric that silently drops images is wrong.
    """

    def __init__(self, samples: List[Tuple[str, int]], classes: List[str], transform: Callable,
                 skip_unreadable: bool) -> None:
        super().__init__()
        self.samples = samples
        self.classes = classes
        self.transform = transform
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
                self._report_unreadable(sample_index, path, error)
        raise DatasetError(
            f'{attempts} consecutive images from {self.samples[index][0]} on cannot be read; '
            'check the dataset'
        )

    def _report_unreadable(self, index: int, path: str, error: Exception) -> None:
        if not self._unreadable_flags[index]:
            self._unreadable_flags[index] = 1
            logger.warning('skipping unreadable image %s (%s); using the next one', printable(path), printable(error))

    @property
    def skipped(self) -> int:
        """Number of distinct files found unreadable so far, across all workers."""
        return int(np.count_nonzero(np.frombuffer(self._unreadable_flags, dtype=np.int8)))


def build_dataset(is_train: bool, args, transform: Callable) -> ImageDataset:
    """The training or validation dataset named by `args`, decoded through `transform`
    (augment.TrainTransform or EvalTransform).

    Reads `args.data_path`, `args.train_list`, `args.val_list` (None for class folders).
    Validation classes are those of the training split whenever that split exists, so label
    indices always agree between the two.
    """
    if is_train:
        samples, classes = _split_samples(args.data_path, 'train', args.train_list)
        skip_unreadable = True
    else:
        samples, classes = _split_samples(args.data_path, 'val', args.val_list)
        train_classes = _train_classes(args)
        if train_classes is not None:
            _check_val_classes(args, samples, classes, train_classes)
            classes = train_classes
        skip_unreadable = False
    return ImageDataset(samples, classes, transform, skip_unreadable)


def _split_samples(data_path: str, split: str,
                   list_path: Optional[str]) -> Tuple[List[Tuple[str, int]], List[str]]:
    if list_path:
        samples = read_list_file(list_path, data_path)
        return samples, _index_class_names(label for _, label in samples)
    return scan_image_folder(os.path.join(data_path, split))


def _index_class_names(labels) -> List[str]:
    return [str(label) for label in range(max(labels) + 1)]


def _train_classes(args) -> Optional[List[str]]:
    if args.train_list:
        train_samples = read_list_file(args.train_list, args.data_path, check_files=False)
        return _index_class_names(label for _, label in train_samples)
    train_root = os.path.join(args.data_path, 'train')
    return _class_folders(train_root) if os.path.isdir(train_root) else None


def _check_val_classes(args, samples, val_classes, train_classes) -> None:
    if args.val_list:
        for path, label in samples:
            if label >= len(train_classes):
                raise DatasetError(
                    f'{args.val_list}: label {label} of {path} is not a training class '
                    f'(training has {len(train_classes)} classes)'
                )
    elif val_classes != train_classes:
        only_val = sorted(set(val_classes) - set(train_classes))
        only_train = sorted(set(train_classes) - set(val_classes))
        raise DatasetError(
            f"class folders of {os.path.join(args.data_path, 'val')} differ from training: "
            f'only in val {only_val[:10]}, only in train {only_train[:10]}'
        )


def _class_folders(root: str) -> List[str]:
    return sorted(
        entry.name for entry in os.scandir(root)
        if entry.is_dir() and not entry.name.startswith('.')
    )


def is_regular_file(path: str) -> bool:
    """A regular file, or a symbolic link to one (not a FIFO, device or folder)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def scan_image_folder(root: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    """(path, class index) for every image under root/<class>/ (recursively), and the class names.

    Class index = position of the folder name in sorted order, as torchvision's ImageFolder.
    Files are recognised by extension (any Pillow can open, case-insensitive) and must be
    regular files (a link to one counts); links to folders inside a class folder are not
    followed, so a link loop cannot multiply or hang the scan.
    """
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


def read_list_file(list_path: str, data_path: str, check_files: bool = True) -> List[Tuple[str, int]]:
    """(path, label) per line `relative/path label` of a PaddleClas-style list file.

    Paths are relative to `data_path` and may contain spaces (the label is the last field).
    Blank lines are ignored. With `check_files`, every named file must exist.
    """
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
            if len(fields) != 2 or not re.fullmatch('[0-9]{1,9}', fields[1]):
                raise DatasetError(
                    f"{list_path}:{line_number}: expected 'relative/path label' with an "
                    f'integer label >= 0, got {line.rstrip()[:80]!r}'
                )
            if int(fields[1]) >= MAX_CLASSES:
                raise DatasetError(f'{list_path}:{line_number}: label {fields[1]} is not below '
                                   f'{MAX_CLASSES}, the most classes this reads')
            path = os.path.join(data_path, fields[0])
            if check_files and not is_regular_file(path):
                raise DatasetError(f'{list_path}:{line_number}: image {path} does not exist or is '
                                   'not a regular file')
            samples.append((path, int(fields[1])))
    if not samples:
        raise DatasetError(f'list file {list_path} names no images')
    return samples


def check_interpolation(name: str, allow_random: bool) -> None:
    allowed = sorted(INTERPOLATIONS) + (['random'] if allow_random else [])
    if name not in allowed:
        raise ValueError(f'interpolation {name!r} is not one of {allowed}')

def to_chw(img: Image.Image) -> np.ndarray:
    """RGB image -> uint8 (3, H, W) array: what the loader's workers send (a quarter of the
    shared memory float32 would take); `normalize` runs on the batch, on the device."""
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))  # (H, W, C) -> (C, H, W)


def normalize(images):
    """uint8 (..., 3, H, W) -> float32 scaled to [0, 1] and normalised per channel (ImageNet
    mean and std). A numpy array gives a numpy array; a Paddle tensor stays on its device."""
    mean = np.asarray(IMAGENET_MEAN, np.float32).reshape(3, 1, 1)
    std = np.asarray(IMAGENET_STD, np.float32).reshape(3, 1, 1)
    if isinstance(images, np.ndarray):
        return (images.astype(np.float32) / np.float32(255.0) - mean) / std
    # The constants are filled on the device: a copy from the host would wait for the device.
    mean, std = (paddle.concat([paddle.full([1, 1, 1], value, 'float32') for value in values])
                 for values in (IMAGENET_MEAN, IMAGENET_STD))
    return (images.astype('float32') / paddle.full([1], 255.0, 'float32') - mean) / std


def shorter_side_target(width: int, height: int, size: int) -> Tuple[int, int]:
    """torchvision's Resize(int) of a width x height image: shorter side to `size`, longer side
    int(size * long / short); ValueError when that is more pixels than Pillow allows (an extreme
    aspect ratio, e.g. 20000000 x 1)."""
    target = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
    if target[0] * target[1] > Image.MAX_IMAGE_PIXELS:
        raise ValueError(f'a {width}x{height} image resizes to {target[0]}x{target[1]}, over '
                         f'Pillow\'s MAX_IMAGE_PIXELS ({Image.MAX_IMAGE_PIXELS})')
    return target


def resize_shorter_side(img: Image.Image, size: int, resample: int) -> Image.Image:
    """torchvision's Resize(int) (shorter_side_target); an image already at that size is
    returned unchanged."""
    if min(img.size) == size:
        return img
    return img.resize(shorter_side_target(*img.size, size), resample)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision's CenterCrop for an image at least `size` on both sides."""
    top = int(round((img.height - size) / 2.0))
    left = int(round((img.width - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


class EvalTransform:
    """Resize the shorter side to floor(input_size / crop_pct), center crop: uint8 (3, S, S)."""

    def __init__(self, input_size: int, crop_pct: float, interpolation: str) -> None:
        self.input_size = input_size
        self.resize_size = math.floor(input_size / crop_pct)
        self.interpolation = interpolation

    def __call__(self, img: Image.Image, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        """`rng` is accepted so datasets can call every transform alike; nothing is random."""
        img = resize_shorter_side(img, self.resize_size, INTERPOLATIONS[self.interpolation])
        return to_chw(center_crop(img, self.input_size))


def check_image_headers(dataset: ImageDataset) -> None:
    """Read every image's header (not its pixels) and check that the evaluation transform can
    take its size: a file that is not an image, or one too elongated to resize, is a DatasetError
    naming it before any time is spent (a truncated file shows only when it is decoded, and is
    then a DatasetError as well)."""
    size = dataset.transform.resize_size
    for path, _ in dataset.samples:
        try:
            if not is_regular_file(path):
                raise ValueError('not a regular file')
            with Image.open(path) as img:
                shorter_side_target(*img.size, size)
        except UNREADABLE_IMAGE_ERRORS as error:
            raise DatasetError(f'cannot read image {path}: {error}') from None


def eval_transform(input_size: int = EVAL_DEFAULTS['input_size'], crop_pct: float = DEFAULT_CROP_PCT,
                   interpolation: str = EVAL_DEFAULTS['interpolation']) -> EvalTransform:
    """The evaluation / inference transform: PIL RGB image -> uint8 (3, S, S) array (`normalize`
    follows, on the batch)."""
    check_interpolation(interpolation, allow_random=False)
    if not 0 < crop_pct <= 1:
        raise ValueError(f'crop_pct must be in (0, 1], got {crop_pct}')
    return EvalTransform(input_size, crop_pct, interpolation)


class EpochSampler(paddle.io.Sampler):
    """Base of the training samplers: one rank's share of an order reseeded every epoch."""

    def __init__(self, dataset_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f'rank {rank} is not in [0, {num_replicas})')
        self.dataset_size = dataset_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0

    def permutation(self) -> np.ndarray:
        return np.random.default_rng(self.seed + self.epoch).permutation(self.dataset_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class RepeatedAugSampler(EpochSampler):
    """DeiT's RASampler: every index three times in a row in a shuffled order, dealt to ranks
    by striding, so the three augmented copies of an image land on three different ranks.

    The order is a permutation seeded with seed + epoch, each index repeated RA_REPEATS times,
    padded from its start to a multiple of num_replicas. Rank r takes positions r, r + R, ...
    and keeps the first floor((N // 256) * 256 / R), DeiT's rule: an epoch stays about N
    samples long, not 3N. Below 256 images that rule gives 0; then each rank keeps
    ceil(N / R), the same epoch length without the rounding. Every rank gets equal counts.
    """

    def __init__(self, dataset_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset_size, num_replicas, rank, seed)
        self.total_size = math.ceil(dataset_size * RA_REPEATS / num_replicas) * num_replicas
        self.num_selected = dataset_size // RA_EPOCH_MULTIPLE * RA_EPOCH_MULTIPLE // num_replicas
        if self.num_selected == 0:
            self.num_selected = math.ceil(dataset_size / num_replicas)

    def repeated_order(self) -> np.ndarray:
        """This epoch's full order over all ranks, before striding and truncation."""
        # np.resize pads by repeating from the start.
        return np.resize(np.repeat(self.permutation(), RA_REPEATS), self.total_size)

    def __iter__(self):
        positions = self.repeated_order()[self.rank::self.num_replicas]
        return iter(positions[: self.num_selected].tolist())

    def __len__(self) -> int:
        return self.num_selected


class DistributedShuffleSampler(EpochSampler):
    """Training order without repeated augmentation: a permutation seeded with seed + epoch,
    padded from its start to a multiple of num_replicas, rank r taking positions r, r + R, ..."""

    def __len__(self) -> int:
        return math.ceil(self.dataset_size / self.num_replicas)

    def __iter__(self):
        order = np.resize(self.permutation(), len(self) * self.num_replicas)  # pads from the start
        return iter(order[self.rank::self.num_replicas].tolist())


class ShardSampler(paddle.io.Sampler):
    """Evaluation order: rank r takes indices r, r + R, ... in order, so every image is seen by
    exactly one rank and none twice. Ranks may differ by one sample (and so by one batch):
    reduce the metric sums once after the loop, not per batch."""

    def __init__(self, dataset_size: int, num_replicas: int = 1, rank: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f'rank {rank} is not in [0, {num_replicas})')
        self.indices = range(rank, dataset_size, num_replicas)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class InProcessLoader:
    """The batches paddle.io.DataLoader(num_workers=0) would give, loaded in the calling thread.

    Paddle's single-process loader runs the dataset in a reader thread, and an exception there
    (an unreadable validation image) ends that thread while the training loop waits for its
    next batch forever (seen with Paddle 3.3). Here the exception reaches the caller.
    """

    def __init__(self, dataset: ImageDataset, batch_sampler: paddle.io.BatchSampler) -> None:
        self.dataset = dataset
        self.batch_sampler = batch_sampler

    def __iter__(self):
        for indices in self.batch_sampler:
            images, labels = zip(*(self.dataset[index] for index in indices))
            yield paddle.to_tensor(np.stack(images)), paddle.to_tensor(np.array(labels, np.int64))

    def __len__(self) -> int:
        return len(self.batch_sampler)


class SeededBatchSampler(paddle.io.BatchSampler):
    """The training sampler's batches, each sample as (index, seed) with seed =
    (run seed, rank, epoch, position in this rank's epoch): ImageDataset's augmentation seed."""

    def __init__(self, sampler: EpochSampler, batch_size: int, seed: int) -> None:
        super().__init__(sampler=sampler, batch_size=batch_size, drop_last=True)
        self.seed = seed

    def __iter__(self):
        sampler = self.sampler
        for step, batch in enumerate(super().__iter__()):
            yield [(index, (self.seed, sampler.rank, sampler.epoch, step * self.batch_size + offset))
                   for offset, index in enumerate(batch)]


def build_loader(dataset: ImageDataset, is_train: bool, batch_size: int, num_workers: int = 0,
                 num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 repeated_aug: bool = True) -> Union[paddle.io.DataLoader, InProcessLoader]:
    """A loader of this rank's share: batches of (uint8 [B, 3, S, S], int64 [B]) tensors (pass
    them through `iterate`, which normalises the images on the device); a paddle.io.DataLoader
    with worker processes, or an InProcessLoader when num_workers is 0.

    Training drops the last partial batch and orders with RepeatedAugSampler (or
    DistributedShuffleSampler without repeated augmentation), seeded with `seed`; each sample's
    augmentation is seeded by SeededBatchSampler. Call `set_loader_epoch(loader, epoch)` before
    iterating each epoch. Evaluation keeps every image once across ranks, in order (ShardSampler).
    """
    if is_train:
        sampler_class = RepeatedAugSampler if repeated_aug else DistributedShuffleSampler
        sampler = sampler_class(len(dataset), num_replicas, rank, seed)
        if len(sampler) < batch_size:
            raise ValueError(
                f'rank {rank} gets {len(sampler)} training samples per epoch, fewer than the '
                f'batch size {batch_size}: no full batch to train on')
        batch_sampler = SeededBatchSampler(sampler, batch_size, seed)
    else:
        batch_sampler = paddle.io.BatchSampler(
            sampler=ShardSampler(len(dataset), num_replicas, rank), batch_size=batch_size, drop_last=False)
    if num_workers == 0:
        return InProcessLoader(dataset, batch_sampler)
    # Workers are forked per pass: Paddle's persistent_workers breaks on a pass left unfinished
    # (the next pass raises IndexError in Paddle's iterator, and its shutdown can wait forever;
    # seen with Paddle 3.3), which an error or Ctrl-C mid-epoch would leave.
    return paddle.io.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers)


def iterate(loader):
    """The batches of `loader`, its images normalised (on the device); an image a worker process could not read ends the loop with
    its DatasetError. (Paddle re-raises a worker's exception, with its type and its traceback as
    the message, in a loader thread, and the main thread then gets a SystemError from the
    closed queue; tests/test_data.py checks that this still holds.)"""
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


def set_loader_epoch(loader: Union[paddle.io.DataLoader, InProcessLoader], epoch: int) -> None:
    """Reseed the loader's sample order and augmentations for `epoch` (before iterating it)."""
    loader.batch_sampler.sampler.set_epoch(epoch)
