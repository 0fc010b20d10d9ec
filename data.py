"""Data pipeline for CycleMLP: datasets, transforms, augmentation, samplers and loaders.

Reproduces the ImageNet recipe of the official code (ShoufaChen/CycleMLP `datasets.py`,
`samplers.py`, `main.py`), which builds on DeiT and timm, without depending on either:

    train  RandomResizedCrop (bicubic) -> horizontal flip -> RandAugment rand-m9-mstd0.5-inc1
           (or colour jitter 0.4 without RandAugment) -> normalise -> random erasing p=0.25
    batch  Mixup 0.8 / CutMix 1.0 with label smoothing 0.1 -> soft targets
    eval   resize shorter side to input_size / 0.875 (bicubic) -> center crop -> normalise
    order  repeated augmentation x3 (DeiT's RASampler), split across ranks

Per-image work is plain numpy and Pillow: every transform takes an explicit
`numpy.random.Generator`, so a seeded generator reproduces an augmentation exactly.
Datasets, samplers, loaders and batch mixing use Paddle.

Datasets are ImageNet-style class folders (`DATA/train/<class>/*`, `DATA/val/<class>/*`) or
PaddleClas-style list files (`relative/path label` per line, relative to the data path).

Not reproduced: the official CIFAR branch (RandomCrop with padding for input sizes <= 32; the
ImageNet transforms are used at every size), timm's AutoAugment/AugMix policies, and Mixup's
per-element and per-pair modes (the recipe uses mode 'batch').
"""

import argparse
import logging
import math
import multiprocessing
import os
import re
import stat
import struct
import threading
from typing import Callable, List, Optional, Sequence, Tuple, Union

import cpu_setup  # first: sets up the CPU before Paddle loads (threads, MKL, memory)
import numpy as np
import paddle
import paddle.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from cyclemlp import ARCHITECTURES
from weights import WeightsError, describe

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875  # 224 / 256: the official evaluation resize rule
# The evaluation transform of the official code; a checkpoint records its own (data_config).
EVAL_DEFAULTS = dict(input_size=224, crop_pct=DEFAULT_CROP_PCT, interpolation='bicubic')
INPUT_SIZE_RANGE = (8, 4096)
CROP_PCT_RANGE = (0.05, 1.0)

# Pillow renamed its enums in 9.1; the old module-level names are gone in some versions.
_RESAMPLING = getattr(Image, 'Resampling', Image)
_TRANSFORM = getattr(Image, 'Transform', Image)
INTERPOLATIONS = {
    'bicubic': _RESAMPLING.BICUBIC,
    'bilinear': _RESAMPLING.BILINEAR,
    'nearest': _RESAMPLING.NEAREST,
}
# timm's 'random' interpolation draws one of these per call.
RANDOM_INTERPOLATIONS = (_RESAMPLING.BILINEAR, _RESAMPLING.BICUBIC)

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

# RandomResizedCrop (timm / torchvision defaults).
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RRC_ATTEMPTS = 10
HFLIP_PROB = 0.5

# RandAugment (timm semantics). Magnitudes live on a 0..10 scale; LEVEL_DENOM turns one into a
# fraction of each op's maximum strength.
LEVEL_DENOM = 10.0
RA_DEFAULT_MAGNITUDE = 10
RA_DEFAULT_NUM_OPS = 2
RA_DEFAULT_PROB = 0.5
DEFAULT_FILL = (128, 128, 128)  # timm's fill of uncovered pixels when no mean is given
RA_UNIFORM_MSTD = 100.0  # an mstd above this means: draw the magnitude uniformly in [0, m]
ROTATE_MAX_DEGREES = 30.0
SHEAR_MAX = 0.3
TRANSLATE_MAX_PCT = 0.45
ENHANCE_MAX_DELTA = 0.9  # increasing enhance ops move the factor 1.0 by up to this
ENHANCE_MIN_FACTOR = 0.1
POSTERIZE_MAX_BITS = 4
SOLARIZE_ADD_MAX = 110
SOLARIZE_ADD_THRESHOLD = 128

RA_TRANSFORMS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd',
    'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY',
    'TranslateXRel', 'TranslateYRel',
)
RA_INCREASING_TRANSFORMS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing', 'SolarizeIncreasing',
    'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing',
    'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel',
)

# Random erasing (timm defaults).
ERASE_AREA = (0.02, 1.0 / 3.0)
ERASE_MIN_ASPECT = 0.3
ERASE_ATTEMPTS = 10

# Repeated augmentation (DeiT's RASampler).
RA_REPEATS = 3
RA_EPOCH_MULTIPLE = 256  # DeiT rounds the number of samples per epoch down to a multiple of this
SEED_RANK_STRIDE = 1000  # augmentation seed = seed + rank * SEED_RANK_STRIDE + worker_id

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
    """(path, label) samples decoded with `load_image` and passed through `transform`.

    `transform(img, rng)` gets the dataset's numpy Generator `rng`; it is reseeded per epoch and
    per DataLoader worker (see `build_loader`). Returns (float32 CHW array, int64 label).

    With `skip_unreadable` (training) a file that cannot be decoded is reported once with a
    warning naming it and the next index is used instead, so the batch keeps its size. The flags
    behind `skipped` live in shared memory created here, in the parent process, so the count
    covers every DataLoader worker and every epoch. Without it (evaluation) such a file raises
    DatasetError, because a metric that silently drops images is wrong.
    """

    def __init__(self, samples: List[Tuple[str, int]], classes: List[str],
                 transform: Callable[[Image.Image, np.random.Generator], np.ndarray],
                 skip_unreadable: bool) -> None:
        super().__init__()
        self.samples = samples
        self.classes = classes
        self.transform = transform
        self.skip_unreadable = skip_unreadable
        self._unreadable_flags = multiprocessing.RawArray('b', len(samples))
        self.augmentation_seed = 0
        self.epoch = 0
        self.reseed()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[np.ndarray, np.int64]:
        attempts = min(len(self.samples), MAX_CONSECUTIVE_UNREADABLE)
        for attempt in range(attempts):
            sample_index = (index + attempt) % len(self.samples)
            path, label = self.samples[sample_index]
            try:
                img = load_image(path)
            except UNREADABLE_IMAGE_ERRORS as error:
                if not self.skip_unreadable:
                    raise DatasetError(f'cannot read image {path}: {error}') from error
                self._report_unreadable(sample_index, path, error)
                continue
            return self.transform(img, self.rng), np.int64(label)
        raise DatasetError(
            f'{attempts} consecutive images from {self.samples[index][0]} on cannot be read; '
            'check the dataset'
        )

    def _report_unreadable(self, index: int, path: str, error: Exception) -> None:
        if not self._unreadable_flags[index]:
            self._unreadable_flags[index] = 1
            logger.warning('skipping unreadable image %s (%s); using the next one', path, error)

    @property
    def skipped(self) -> int:
        """Number of distinct files found unreadable so far, across all workers."""
        return int(np.count_nonzero(np.frombuffer(self._unreadable_flags, dtype=np.int8)))

    def set_augmentation_seed(self, seed: int) -> None:
        """Base seed of this process's augmentations (build_loader passes seed + rank * 1000)."""
        self.augmentation_seed = seed
        self.reseed()

    def set_epoch(self, epoch: int) -> None:
        """Reseed for `epoch`; DataLoader workers started afterwards inherit the new epoch."""
        self.epoch = epoch
        self.reseed()

    def reseed(self, worker_id: int = 0) -> None:
        # The main process (num_workers=0) draws what worker 0 would draw.
        self.rng = np.random.default_rng([self.augmentation_seed + worker_id, self.epoch])


def build_dataset(is_train: bool, args) -> ImageDataset:
    """The training or validation dataset named by `args`, with its transform.

    Reads `args.data_path`, `args.train_list`, `args.val_list` (None for class folders),
    `args.input_size`; for training also `aa`, `color_jitter`, `train_interpolation`, `reprob`,
    `remode`, `recount`; for evaluation `crop_pct` and `eval_interpolation` when present
    (defaults 0.875 and 'bicubic', the official evaluation). Validation classes are those of the
    training split whenever that split exists, so label indices always agree between the two.
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
    return ImageDataset(samples, classes, build_transform(is_train, args), skip_unreadable)


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


def _check_interpolation(name: str, allow_random: bool) -> None:
    allowed = sorted(INTERPOLATIONS) + (['random'] if allow_random else [])
    if name not in allowed:
        raise ValueError(f'interpolation {name!r} is not one of {allowed}')


def _resample(interpolation: str, rng: np.random.Generator) -> int:
    if interpolation == 'random':
        return RANDOM_INTERPOLATIONS[int(rng.integers(len(RANDOM_INTERPOLATIONS)))]
    return INTERPOLATIONS[interpolation]


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: Tuple[float, float] = RRC_SCALE,
                            ratio: Tuple[float, float] = RRC_RATIO) -> Tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) of timm's RandomResizedCrop.

    Ten tries of an area fraction uniform in `scale` and a log-uniform aspect ratio in `ratio`;
    if none fits, a central crop of the whole image with its aspect ratio clamped into `ratio`.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(RRC_ATTEMPTS):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        # timm has no lower bound; an empty crop of a tiny image would crash the resize.
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return top, left, crop_height, crop_width
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_width, crop_height = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_width, crop_height = int(round(height * max(ratio))), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def color_jitter(img: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
    """torchvision's ColorJitter(strength, strength, strength): brightness, contrast and
    saturation factors uniform in [1 - strength, 1 + strength], applied in random order."""
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    factors = [rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength) for _ in enhancers]
    for index in rng.permutation(len(enhancers)):
        img = enhancers[index](img).enhance(factors[index])
    return img


def _random_sign(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() > 0.5 else value


# timm's level functions: `level` is the magnitude as a fraction of LEVEL_DENOM. The
# *Increasing variants grow stronger with the magnitude; the plain ones of the original
# RandAugment grow weaker for Posterize and Solarize and pass through 'no change' for the
# enhance ops.
def _no_args(level, rng):
    return ()


def _rotate_args(level, rng):
    return (_random_sign(level * ROTATE_MAX_DEGREES, rng),)


def _shear_args(level, rng):
    return (_random_sign(level * SHEAR_MAX, rng),)


def _translate_rel_args(level, rng):
    return (_random_sign(level * TRANSLATE_MAX_PCT, rng),)


def _enhance_args(level, rng):
    return (level * 1.8 + 0.1,)  # factor in [0.1, 1.9]


def _enhance_increasing_args(level, rng):
    return (max(ENHANCE_MIN_FACTOR, 1.0 + _random_sign(level * ENHANCE_MAX_DELTA, rng)),)


def _posterize_args(level, rng):
    return (int(level * POSTERIZE_MAX_BITS),)


def _posterize_increasing_args(level, rng):
    return (POSTERIZE_MAX_BITS - int(level * POSTERIZE_MAX_BITS),)


def _solarize_args(level, rng):
    return (min(256, int(level * 256)),)


def _solarize_increasing_args(level, rng):
    return (256 - min(256, int(level * 256)),)


def _solarize_add_args(level, rng):
    return (min(128, int(level * SOLARIZE_ADD_MAX)),)


def _posterize(img, bits):
    # Keep the `bits` high bits. A LUT rather than ImageOps.posterize, which refuses 0 bits (all
    # black, what timm gets at magnitude 10 on older Pillow) from Pillow 11 on; magnitudes
    # above 10 (mmax) can push the count below 0 or above 8.
    keep_mask = (0xFF << (8 - max(0, min(8, bits)))) & 0xFF
    return img.point([value & keep_mask for value in range(256)] * len(img.getbands()))


def _solarize_add(img, add):
    lut = [min(255, value + add) if value < SOLARIZE_ADD_THRESHOLD else value
           for value in range(256)]
    return img.point(lut * len(img.getbands()))


def _affine(img, matrix, fill, resample):
    return img.transform(img.size, _TRANSFORM.AFFINE, matrix, resample=resample, fillcolor=fill)


def _enhance(enhancer):
    return lambda img, factor: enhancer(img).enhance(factor)


_PIXEL_OPS = {
    'AutoContrast': ImageOps.autocontrast,
    'Equalize': ImageOps.equalize,
    'Invert': ImageOps.invert,
    'Posterize': _posterize,
    'Solarize': ImageOps.solarize,
    'SolarizeAdd': _solarize_add,
    'Color': _enhance(ImageEnhance.Color),
    'Contrast': _enhance(ImageEnhance.Contrast),
    'Brightness': _enhance(ImageEnhance.Brightness),
    'Sharpness': _enhance(ImageEnhance.Sharpness),
}
# An *Increasing op is its plain op with another magnitude-to-argument rule (_LEVEL_TO_ARGS).
_PIXEL_OPS.update({f'{name}Increasing': _PIXEL_OPS[name] for name in
                   ('Posterize', 'Solarize', 'Color', 'Contrast', 'Brightness', 'Sharpness')})
# Geometric ops also take the fill colour of uncovered pixels and the resampling filter.
_GEOMETRIC_OPS = {
    'Rotate': lambda img, degrees, fill, resample: img.rotate(
        degrees, resample=resample, fillcolor=fill),
    'ShearX': lambda img, factor, fill, resample: _affine(
        img, (1, factor, 0, 0, 1, 0), fill, resample),
    'ShearY': lambda img, factor, fill, resample: _affine(
        img, (1, 0, 0, factor, 1, 0), fill, resample),
    'TranslateXRel': lambda img, pct, fill, resample: _affine(
        img, (1, 0, pct * img.width, 0, 1, 0), fill, resample),
    'TranslateYRel': lambda img, pct, fill, resample: _affine(
        img, (1, 0, 0, 0, 1, pct * img.height), fill, resample),
}
_LEVEL_TO_ARGS = {
    'AutoContrast': _no_args,
    'Equalize': _no_args,
    'Invert': _no_args,
    'Rotate': _rotate_args,
    'Posterize': _posterize_args,
    'PosterizeIncreasing': _posterize_increasing_args,
    'Solarize': _solarize_args,
    'SolarizeIncreasing': _solarize_increasing_args,
    'SolarizeAdd': _solarize_add_args,
    'Color': _enhance_args,
    'ColorIncreasing': _enhance_increasing_args,
    'Contrast': _enhance_args,
    'ContrastIncreasing': _enhance_increasing_args,
    'Brightness': _enhance_args,
    'BrightnessIncreasing': _enhance_increasing_args,
    'Sharpness': _enhance_args,
    'SharpnessIncreasing': _enhance_increasing_args,
    'ShearX': _shear_args,
    'ShearY': _shear_args,
    'TranslateXRel': _translate_rel_args,
    'TranslateYRel': _translate_rel_args,
}


def op_arguments(name: str, magnitude: float, rng: np.random.Generator) -> tuple:
    """Arguments of RandAugment op `name` at `magnitude` (0..10 scale), as timm computes them;
    `rng` draws the random sign of the signed ops."""
    return _LEVEL_TO_ARGS[name](magnitude / LEVEL_DENOM, rng)


class AugmentOp:
    """One RandAugment op: applied with probability `prob` at a magnitude drawn around
    `magnitude` (normal with std `magnitude_std`, uniform in [0, magnitude] if it is inf),
    clipped to [0, magnitude_max]."""

    def __init__(self, name: str, magnitude: float, prob: float = RA_DEFAULT_PROB,
                 magnitude_std: float = 0.0, magnitude_max: float = LEVEL_DENOM,
                 fill: Tuple[int, int, int] = DEFAULT_FILL, interpolation: str = 'bicubic') -> None:
        if name not in _LEVEL_TO_ARGS:
            raise ValueError(f'unknown RandAugment op {name!r}')
        self.name = name
        self.magnitude = magnitude
        self.prob = prob
        self.magnitude_std = magnitude_std
        self.magnitude_max = magnitude_max
        self.fill = fill
        self.interpolation = interpolation

    def sample_magnitude(self, rng: np.random.Generator) -> float:
        """This application's magnitude: `magnitude` plus noise, clipped to [0, magnitude_max]."""
        magnitude = self.magnitude
        if self.magnitude_std == math.inf:
            magnitude = rng.uniform(0.0, magnitude)
        elif self.magnitude_std > 0:
            magnitude = rng.normal(magnitude, self.magnitude_std)
        return min(max(magnitude, 0.0), self.magnitude_max)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        if self.prob < 1.0 and rng.random() > self.prob:
            return img
        args = op_arguments(self.name, self.sample_magnitude(rng), rng)
        if self.name in _GEOMETRIC_OPS:
            resample = _resample(self.interpolation, rng)
            return _GEOMETRIC_OPS[self.name](img, *args, fill=self.fill, resample=resample)
        return _PIXEL_OPS[self.name](img, *args)

    def __repr__(self) -> str:
        return (f'AugmentOp({self.name}, m={self.magnitude}, p={self.prob}, '
                f'mstd={self.magnitude_std}, mmax={self.magnitude_max})')


class RandAugment:
    """Apply `num_ops` ops drawn uniformly with replacement from `ops` (timm's RandAugment)."""

    def __init__(self, ops: List[AugmentOp], num_ops: int) -> None:
        self.ops = ops
        self.num_ops = num_ops

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        for index in rng.integers(0, len(self.ops), size=self.num_ops):
            img = self.ops[index](img, rng)
        return img


def rand_augment(policy: Optional[str], interpolation: str = 'bicubic',
                 mean: Sequence[float] = IMAGENET_MEAN) -> Optional[RandAugment]:
    """RandAugment from a timm policy string such as 'rand-m9-mstd0.5-inc1'; None for '' or
    'none' (no RandAugment).

    Dash-separated sections after 'rand': m magnitude (default 10), n ops per image (2),
    p probability of each op (0.5), mstd magnitude noise std (0; above 100 means uniform),
    mmax magnitude clip (10), inc 1 for the increasing-severity op set (0).
    `interpolation` is the filter of the geometric ops ('random' draws bilinear or bicubic per
    op, as timm does when the training interpolation is 'random'); uncovered pixels are filled
    with the dataset mean. timm treats any 'inc' value, even inc0, as on (it tests the string);
    here inc0 means off, as its documentation intends.
    """
    _check_interpolation(interpolation, allow_random=True)
    if not policy or policy.lower() == 'none':
        return None
    sections = policy.split('-')
    if sections[0] != 'rand':
        raise ValueError(f"augmentation policy {policy!r} must start with 'rand'")
    magnitude, num_ops, prob = RA_DEFAULT_MAGNITUDE, RA_DEFAULT_NUM_OPS, RA_DEFAULT_PROB
    magnitude_std, magnitude_max, increasing = 0.0, LEVEL_DENOM, False
    for section in sections[1:]:
        match = re.fullmatch(r'([a-z]+)(\d+(?:\.\d*)?)', section)
        if match is None:
            raise ValueError(f'cannot parse section {section!r} of policy {policy!r}')
        key, value = match.groups()
        if key in ('m', 'n', 'mmax', 'inc') and not value.isdigit():
            raise ValueError(f'section {section!r} of policy {policy!r} needs an integer')
        if key == 'm':
            magnitude = int(value)
        elif key == 'n':
            num_ops = int(value)
        elif key == 'p':
            prob = float(value)
        elif key == 'mstd':
            magnitude_std = float(value)
            if magnitude_std > RA_UNIFORM_MSTD:
                magnitude_std = math.inf
        elif key == 'mmax':
            magnitude_max = int(value)
        elif key == 'inc':
            increasing = int(value) != 0
        else:
            raise ValueError(f'unknown section {section!r} of policy {policy!r}: '
                             'expected m, n, p, mstd, mmax or inc')
    fill = tuple(min(255, round(255 * channel_mean)) for channel_mean in mean)
    names = RA_INCREASING_TRANSFORMS if increasing else RA_TRANSFORMS
    ops = [AugmentOp(name, magnitude, prob, magnitude_std, magnitude_max, fill, interpolation)
           for name in names]
    return RandAugment(ops, num_ops)


def to_normalized_array(img: Image.Image, mean: Sequence[float] = IMAGENET_MEAN,
                        std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """RGB image -> float32 (3, H, W) array scaled to [0, 1] and normalised per channel."""
    array = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    array = (array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))  # (H, W, C) -> (C, H, W)


def random_erase(array: np.ndarray, rng: np.random.Generator, prob: float, mode: str = 'pixel',
                 max_count: int = 1) -> np.ndarray:
    """timm's RandomErasing on a normalised (C, H, W) array, in place; returns the array.

    With probability `prob`, 1..max_count boxes, each of area fraction uniform in ERASE_AREA
    (divided by the count) and log-uniform aspect ratio in [0.3, 1/0.3], ten tries each; filled
    with per-pixel standard normal noise ('pixel'), one normal value per channel ('rand') or 0
    ('const').
    """
    if rng.random() > prob:
        return array
    channels, height, width = array.shape
    count = max_count if max_count == 1 else int(rng.integers(1, max_count + 1))
    log_aspect = (math.log(ERASE_MIN_ASPECT), math.log(1.0 / ERASE_MIN_ASPECT))
    for _ in range(count):
        for _ in range(ERASE_ATTEMPTS):
            target_area = rng.uniform(*ERASE_AREA) * height * width / count
            aspect = math.exp(rng.uniform(*log_aspect))
            box_height = int(round(math.sqrt(target_area * aspect)))
            box_width = int(round(math.sqrt(target_area / aspect)))
            if box_width < width and box_height < height:
                top = int(rng.integers(0, height - box_height + 1))
                left = int(rng.integers(0, width - box_width + 1))
                array[:, top:top + box_height, left:left + box_width] = _erase_values(
                    mode, (channels, box_height, box_width), rng)
                break
    return array


def _erase_values(mode: str, shape: Tuple[int, int, int], rng: np.random.Generator):
    if mode == 'pixel':
        return rng.standard_normal(shape, dtype=np.float32)
    if mode == 'rand':
        return rng.standard_normal((shape[0], 1, 1), dtype=np.float32)
    return 0.0


class TrainTransform:
    """timm's ImageNet training transform (create_transform with is_training=True)."""

    def __init__(self, input_size: int, auto_augment: Optional[str], color_jitter_strength: float,
                 interpolation: str = 'bicubic', erase_prob: float = 0.25,
                 erase_mode: str = 'pixel', erase_count: int = 1,
                 crop_scale: Tuple[float, float] = RRC_SCALE, hflip: float = HFLIP_PROB) -> None:
        _check_interpolation(interpolation, allow_random=True)
        if erase_mode not in ('pixel', 'rand', 'const'):
            raise ValueError(f'random erasing mode {erase_mode!r} is not pixel, rand or const')
        self.input_size = input_size
        self.interpolation = interpolation
        self.rand_augment = rand_augment(auto_augment, interpolation)
        # As in timm, colour jitter is only used when RandAugment is off.
        self.color_jitter_strength = 0.0 if self.rand_augment is not None else color_jitter_strength
        self.erase_prob = erase_prob
        self.erase_mode = erase_mode
        self.erase_count = erase_count
        self.crop_scale = tuple(crop_scale)
        self.hflip = hflip

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        top, left, height, width = random_resized_crop_box(img.width, img.height, rng,
                                                           self.crop_scale)
        img = img.crop((left, top, left + width, top + height)).resize(
            (self.input_size, self.input_size), _resample(self.interpolation, rng))
        if rng.random() < self.hflip:
            img = ImageOps.mirror(img)
        if self.rand_augment is not None:
            img = self.rand_augment(img, rng)
        elif self.color_jitter_strength > 0:
            img = color_jitter(img, self.color_jitter_strength, rng)
        array = to_normalized_array(img)
        if self.erase_prob > 0:
            random_erase(array, rng, self.erase_prob, self.erase_mode, self.erase_count)
        return array


def resize_shorter_side(img: Image.Image, size: int, resample: int) -> Image.Image:
    """torchvision's Resize(int): shorter side to `size`, longer side int(size * long / short);
    an image already at that size is returned unchanged."""
    width, height = img.size
    if min(width, height) == size:
        return img
    target = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
    if target[0] * target[1] > Image.MAX_IMAGE_PIXELS:   # an extreme aspect ratio, e.g. 20000000 x 1
        raise ValueError(f'a {width}x{height} image resizes to {target[0]}x{target[1]}, over '
                         f'Pillow\'s MAX_IMAGE_PIXELS ({Image.MAX_IMAGE_PIXELS})')
    return img.resize(target, resample)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision's CenterCrop for an image at least `size` on both sides."""
    top = int(round((img.height - size) / 2.0))
    left = int(round((img.width - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


class EvalTransform:
    """Resize the shorter side to floor(input_size / crop_pct), center crop, normalise."""

    def __init__(self, input_size: int, crop_pct: float, interpolation: str) -> None:
        self.input_size = input_size
        self.resize_size = math.floor(input_size / crop_pct)
        self.interpolation = interpolation

    def __call__(self, img: Image.Image, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        """`rng` is accepted so datasets can call every transform alike; nothing is random."""
        img = resize_shorter_side(img, self.resize_size, INTERPOLATIONS[self.interpolation])
        return to_normalized_array(center_crop(img, self.input_size))


def eval_transform(input_size: int = EVAL_DEFAULTS['input_size'], crop_pct: float = DEFAULT_CROP_PCT,
                   interpolation: str = EVAL_DEFAULTS['interpolation']) -> EvalTransform:
    """The evaluation / inference transform: PIL RGB image -> float32 (3, S, S) array."""
    _check_interpolation(interpolation, allow_random=False)
    if not 0 < crop_pct <= 1:
        raise ValueError(f'crop_pct must be in (0, 1], got {crop_pct}')
    return EvalTransform(input_size, crop_pct, interpolation)


def check_data_config(config, source: str) -> dict:
    """A recorded evaluation transform (data_config of a weights file or export), checked;
    WeightsError naming the file and the value otherwise."""
    checks = {'input_size': lambda v: type(v) is int and INPUT_SIZE_RANGE[0] <= v <= INPUT_SIZE_RANGE[1],
              'crop_pct': lambda v: type(v) in (int, float) and CROP_PCT_RANGE[0] <= v <= CROP_PCT_RANGE[1],
              'interpolation': lambda v: v in INTERPOLATIONS}
    expected = {'input_size': f'an integer in {list(INPUT_SIZE_RANGE)}',
                'crop_pct': f'a number in {list(CROP_PCT_RANGE)}',
                'interpolation': f'one of {", ".join(INTERPOLATIONS)}'}
    if not isinstance(config, dict):
        raise WeightsError(f'{source}: data_config is {describe(config)}, expected a dict')
    for key, value in config.items():
        if key not in checks or not checks[key](value):
            raise WeightsError(f'{source}: data_config {describe(key)} is {describe(value)}, '
                               f'expected {expected.get(key, "only " + ", ".join(checks))}')
    return config


def resolve_data_config(args, recorded: Optional[dict], source: str) -> None:
    """Fill the evaluation-transform flags left unset (None) with what `source` recorded (a
    checkpoint's data_config, from train.py), else EVAL_DEFAULTS; explicit flags win."""
    recorded = check_data_config(recorded or {}, source)
    for dest, key in (('input_size', 'input_size'), ('crop_pct', 'crop_pct'),
                      ('eval_interpolation', 'interpolation')):
        if getattr(args, dest) is None:
            setattr(args, dest, recorded.get(key, EVAL_DEFAULTS[key]))


def bounded(kind: type, low=None, high=None, low_open: bool = False, high_open: bool = False):
    """An argparse type: `kind` (int or float) parsed, finite and within [low, high] (an open
    end excludes it); out of range is argparse's own error, naming the flag."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            expected = 'an integer' if kind is int else 'a number'
            raise argparse.ArgumentTypeError(f'expected {expected}, got {text!r}') from None
        if not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) \
                or (high is not None and (value >= high if high_open else value > high)):
            interval = ('(' if low_open else '[') + f'{low if low is not None else "-inf"}, ' \
                       f'{high if high is not None else "inf"}' + (')' if high_open else ']')
            raise argparse.ArgumentTypeError(f'expected a value in {interval}, got {text}')
        return value
    parse.__name__ = kind.__name__   # argparse names the type in its messages
    return parse


def model_args_parser(training: bool = False) -> argparse.ArgumentParser:
    """The model, its evaluation transform and the CPU threads: every command's flags.

    For evaluation, prediction and export the defaults are None, meaning "what the weights
    file records" (resolve_data_config); for training, the model to train and EVAL_DEFAULTS.
    """
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    group = parser.add_argument_group('model and evaluation transform')
    recorded = '' if training else 'as recorded in the weights, else '
    group.add_argument('--model', default='CycleMLP_B1' if training else None,
                       choices=list(ARCHITECTURES), metavar='NAME',
                       help=f'architecture, one of {", ".join(ARCHITECTURES)} (default: '
                            + ('CycleMLP_B1)' if training else 'the one the weights file records)'))
    group.add_argument('--input-size', '--input_size', type=bounded(int, *INPUT_SIZE_RANGE),
                       default=EVAL_DEFAULTS['input_size'] if training else None,
                       help=f'side of the square image the model sees, in {list(INPUT_SIZE_RANGE)} '
                            f'(default: {recorded}{EVAL_DEFAULTS["input_size"]})')
    group.add_argument('--crop-pct', '--crop_pct', type=bounded(float, *CROP_PCT_RANGE),
                       default=DEFAULT_CROP_PCT if training else None,
                       help='evaluation resizes the shorter side to input_size / crop_pct, then '
                            f'center-crops input_size; in {list(CROP_PCT_RANGE)} (default: '
                            f'{recorded}{DEFAULT_CROP_PCT})')
    # dest is the name build_dataset reads; train.py has its own --train-interpolation.
    group.add_argument('--interpolation', '--eval-interpolation', dest='eval_interpolation',
                       default='bicubic' if training else None, choices=list(INTERPOLATIONS),
                       help=f'resampling of the evaluation resize (default: {recorded}bicubic)')
    group.add_argument('--threads', type=bounded(int, 1), default=None,
                       help='CPU threads of the compute kernels; no effect on GPU (default: '
                            'OMP_NUM_THREADS if set, else every core this process may use, '
                            f'{cpu_setup.available_cores()} here)')
    return parser


def loader_args_parser() -> argparse.ArgumentParser:
    """The data and loader flags train.py and evaluate.py share."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    group = parser.add_argument_group('data')
    group.add_argument('--data-path', '--data_path', default=None,
                       help='dataset root holding train/<class>/ and val/<class>/, or the root '
                            'the list files are relative to (default: None)')
    group.add_argument('--train-list', '--train_list', default=None,
                       help='PaddleClas-style list file "relative/path label" of the training '
                            'set (default: None, use DATA/train/<class>/)')
    group.add_argument('--val-list', '--val_list', default=None,
                       help='list file of the validation set (default: None, use DATA/val/<class>/)')
    group.add_argument('--batch-size', '--batch_size', type=bounded(int, 1), default=64,
                       help='images per batch on each device (default: 64)')
    workers = cpu_setup.default_num_workers()
    group.add_argument('--num-workers', '--num_workers', type=bounded(int, 0), default=workers,
                       help='data loading processes per device; 10 on GPU as in the official '
                            f'main.py, on CPU a quarter of the cores, at least 1 (default: {workers} here)')
    group.add_argument('--seed', type=bounded(int, 0, 2**31 - 1), default=0,
                       help='random seed (default: 0)')
    group.add_argument('--print-freq', '--print_freq', type=bounded(int, 1), default=10,
                       help='log every this many iterations (default: 10)')
    return parser


def build_transform(is_train: bool, args) -> Callable:
    """TrainTransform from `args.input_size`, `aa`, `color_jitter`, `train_interpolation`,
    `reprob`, `remode`, `recount` and, when present, `scale` (the crop's area range) and
    `hflip` (the flip probability), as timm's flags; or the evaluation transform (see
    build_dataset)."""
    if is_train:
        return TrainTransform(args.input_size, args.aa, args.color_jitter, args.train_interpolation,
                              args.reprob, args.remode, args.recount, getattr(args, 'scale', RRC_SCALE),
                              getattr(args, 'hflip', HFLIP_PROB))
    return eval_transform(args.input_size, getattr(args, 'crop_pct', EVAL_DEFAULTS['crop_pct']),
                          getattr(args, 'eval_interpolation', EVAL_DEFAULTS['interpolation']))


def smooth_one_hot(labels: paddle.Tensor, num_classes: int, smoothing: float) -> paddle.Tensor:
    """[B] int64 labels -> [B, num_classes] float32 targets: 1 - smoothing + smoothing / K on
    the label, smoothing / K elsewhere (timm's mixup_target values)."""
    off_value = smoothing / num_classes
    on_value = 1.0 - smoothing + off_value
    return F.one_hot(labels, num_classes) * (on_value - off_value) + off_value


class Mixup:
    """timm's Mixup / CutMix in mode 'batch': one lambda for the whole batch, each image mixed
    with its mirror in the batch (image i with image B - 1 - i).

    Per batch: with probability `prob` mix, choosing CutMix with probability `switch_prob`
    (when both alphas are > 0); lambda ~ Beta(alpha, alpha). CutMix pastes a box of area about
    (1 - lambda) * H * W, clipped at the borders, and with `correct_lam` lambda becomes the
    exact unpasted fraction. Targets are lambda * y + (1 - lambda) * y_mirrored with
    label-smoothed one-hot y. Lambda and the box are drawn on the host from a numpy Generator
    seeded with `seed` (pass seed + rank so ranks differ); the mixing itself is Paddle ops.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 prob: float = 1.0, switch_prob: float = 0.5, label_smoothing: float = 0.1,
                 correct_lam: bool = True, seed: int = 0) -> None:
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError('Mixup needs mixup_alpha > 0 or cutmix_alpha > 0')
        self.num_classes = num_classes
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.prob = prob
        self.switch_prob = switch_prob
        self.label_smoothing = label_smoothing
        self.correct_lam = correct_lam
        self.rng = np.random.default_rng(seed)

    def draw(self) -> Tuple[float, bool]:
        """(lambda, use_cutmix) for one batch; lambda 1.0 means no mixing."""
        if self.rng.random() >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(self.rng.random() < self.switch_prob)
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return float(self.rng.beta(alpha, alpha)), use_cutmix

    def cutmix_box(self, height: int, width: int, lam: float) -> Tuple[Tuple[int, int, int, int], float]:
        """((top, bottom, left, right), lambda) of a CutMix box: sides sqrt(1 - lambda) of the
        image's, centred uniformly at random, clipped to the image."""
        cut_ratio = math.sqrt(1.0 - lam)
        cut_height, cut_width = int(height * cut_ratio), int(width * cut_ratio)
        center_y = int(self.rng.integers(0, height))
        center_x = int(self.rng.integers(0, width))
        top = min(max(center_y - cut_height // 2, 0), height)
        bottom = min(max(center_y + cut_height // 2, 0), height)
        left = min(max(center_x - cut_width // 2, 0), width)
        right = min(max(center_x + cut_width // 2, 0), width)
        if self.correct_lam:
            lam = 1.0 - (bottom - top) * (right - left) / float(height * width)
        return (top, bottom, left, right), lam

    def __call__(self, images: paddle.Tensor, labels: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """images [B, C, H, W] float, labels [B] int64 -> (mixed images, [B, K] float32 targets)."""
        batch_size, _, height, width = images.shape
        if batch_size % 2:
            raise ValueError(f'Mixup needs an even batch size, got {batch_size}; '
                             'use an even --batch-size (training drops the last partial batch)')
        lam, use_cutmix = self.draw()
        mirrored = paddle.flip(images, axis=[0])
        if lam == 1.0:
            mixed = images
        elif use_cutmix:
            (top, bottom, left, right), lam = self.cutmix_box(height, width, lam)
            # The box is built on the device from the four bounds: no host-to-device copy.
            rows = paddle.arange(height, dtype='int64').reshape([1, 1, height, 1])
            cols = paddle.arange(width, dtype='int64').reshape([1, 1, 1, width])
            box = (paddle.logical_and(rows >= top, rows < bottom).astype(images.dtype)
                   * paddle.logical_and(cols >= left, cols < right).astype(images.dtype))
            # 0/1 weights keep every pixel an exact copy of one of the two images.
            mixed = images * (1.0 - box) + mirrored * box
        else:
            mixed = images * lam + mirrored * (1.0 - lam)
        targets = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        targets = targets * lam + paddle.flip(targets, axis=[0]) * (1.0 - lam)
        return mixed, targets


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


def _seed_worker(worker_id: int) -> None:
    # Runs in each new worker process on its own copy of the dataset, which carries the epoch
    # and base seed the parent had when the loader's iterator was created.
    paddle.io.get_worker_info().dataset.reseed(worker_id)


def build_loader(dataset: ImageDataset, is_train: bool, batch_size: int, num_workers: int = 0,
                 num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 repeated_aug: bool = True) -> Union[paddle.io.DataLoader, InProcessLoader]:
    """A loader of this rank's share: batches of (float32 [B, 3, S, S], int64 [B]) tensors;
    a paddle.io.DataLoader with worker processes, an InProcessLoader when num_workers is 0.

    Training drops the last partial batch and orders with RepeatedAugSampler (or
    DistributedShuffleSampler without repeated augmentation), seeded with `seed` for the order.
    Evaluation keeps every image once across ranks, in order (ShardSampler).

    Augmentation seeds: the dataset's generator is seeded from
    (seed + rank * 1000 + worker_id, epoch): worker_init_fn reseeds each worker's copy, and
    workers are new processes every epoch (persistent_workers stays off), so call
    `set_loader_epoch(loader, epoch)` before iterating each epoch.
    """
    if is_train:
        sampler_class = RepeatedAugSampler if repeated_aug else DistributedShuffleSampler
        sampler = sampler_class(len(dataset), num_replicas, rank, seed)
        if len(sampler) < batch_size:
            raise ValueError(
                f'rank {rank} gets {len(sampler)} training samples per epoch, fewer than the '
                f'batch size {batch_size}: no full batch to train on')
    else:
        sampler = ShardSampler(len(dataset), num_replicas, rank)
    dataset.set_augmentation_seed(seed + rank * SEED_RANK_STRIDE)
    batch_sampler = paddle.io.BatchSampler(
        sampler=sampler, batch_size=batch_size, drop_last=is_train)
    if num_workers == 0:
        return InProcessLoader(dataset, batch_sampler)
    return paddle.io.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        worker_init_fn=_seed_worker,
    )


def iterate(loader):
    """The batches of `loader`; an image a worker process could not read ends the loop with
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
        yield from loader
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
    sampler = loader.batch_sampler.sampler
    if hasattr(sampler, 'set_epoch'):
        sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
