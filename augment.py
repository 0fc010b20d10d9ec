"""The training augmentation of the official recipe: timm's pieces, reimplemented without timm.

As the official code (ShoufaChen/CycleMLP `datasets.py`, `main.py`) has it through timm, as DeiT:

    image  RandomResizedCrop (bicubic) -> horizontal flip -> RandAugment rand-m9-mstd0.5-inc1 (colour
           jitter 0.4 without RandAugment): Pillow in the loader's workers, from a seeded numpy Generator
    batch  normalise -> random erasing p=0.25 (as timm's PrefetchLoader) -> Mixup 0.8 / CutMix 1.0
           with label smoothing 0.1 -> soft targets: Paddle ops on the device

The tests check each piece against timm's formulas. Not reproduced: AutoAugment/AugMix, and
Mixup's per-element and per-pair modes (the recipe mixes per batch).
"""
import math
import re
from typing import List, Optional, Sequence, Tuple

import numpy as np
import zlib  # noqa: F401  before Paddle: Paddle 2.6 bundles a zlib that crashes one loaded after it
import paddle
import paddle.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from data import _RESAMPLING, IMAGENET_MEAN, INTERPOLATIONS, to_chw

_TRANSFORM = getattr(Image, 'Transform', Image)   # Pillow 9.1 renamed its enums (see data._RESAMPLING)
# timm's 'random' interpolation draws one of these per call.
RANDOM_INTERPOLATIONS = (_RESAMPLING.BILINEAR, _RESAMPLING.BICUBIC)

# RandomResizedCrop (timm / torchvision defaults).
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RRC_ATTEMPTS = 10

# RandAugment: magnitudes on a 0..10 scale; LEVEL_DENOM makes one a fraction of an op's strength.
LEVEL_DENOM = 10.0
RA_UNIFORM_MSTD = 100.0  # an mstd above this means: draw the magnitude uniformly in [0, m]
MEAN_FILL = tuple(round(255 * channel) for channel in IMAGENET_MEAN)  # uncovered pixels
SOLARIZE_ADD_THRESHOLD = 128

# Random erasing (timm defaults).
ERASE_AREA = (0.02, 1.0 / 3.0)
ERASE_MIN_ASPECT = 0.3
ERASE_ATTEMPTS = 10


def _resample(interpolation: str, rng: np.random.Generator) -> int:
    if interpolation == 'random':
        return RANDOM_INTERPOLATIONS[int(rng.integers(len(RANDOM_INTERPOLATIONS)))]
    return INTERPOLATIONS[interpolation]


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: Tuple[float, float] = RRC_SCALE) -> Tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) of timm's RandomResizedCrop: ten tries of an area
    fraction uniform in `scale` and a log-uniform aspect ratio in RRC_RATIO; if none fits, a
    central crop of the whole image with its aspect ratio clamped into RRC_RATIO."""
    area = width * height
    log_ratio = (math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]))
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
    # The aspect ratio clamped into RRC_RATIO, as timm's fallback.
    crop_width = min(width, int(round(height * max(RRC_RATIO))))
    crop_height = min(height, int(round(width / min(RRC_RATIO))))
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def color_jitter(img: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
    """torchvision's ColorJitter(strength, strength, strength): brightness, contrast and
    saturation factors uniform in [1 - strength, 1 + strength], applied in random order."""
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    factors = [rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength) for _ in enhancers]
    for index in rng.permutation(len(enhancers)):
        img = enhancers[index](img).enhance(factors[index])
    return img


def _signed(value: float, rng: np.random.Generator) -> tuple:
    return (-value if rng.random() > 0.5 else value,)


def _posterize(img, bits):
    # Keep the `bits` high bits. A LUT rather than ImageOps.posterize, which refuses 0 bits (all
    # black, what timm gets at magnitude 10 on older Pillow) from Pillow 11 on; magnitudes
    # above 10 (mmax) can push the count below 0 or above 8.
    keep_mask = (0xFF << (8 - max(0, min(8, bits)))) & 0xFF
    return img.point([value & keep_mask for value in range(256)] * len(img.getbands()))


def _solarize_add(img, add):
    lut = [min(255, value + add) if value < SOLARIZE_ADD_THRESHOLD else value for value in range(256)]
    return img.point(lut * len(img.getbands()))


def _affine(matrix):
    """An affine op; matrix(img, x) gives Pillow's inverse matrix for the op's argument x."""
    return lambda img, x, fill, resample: img.transform(img.size, _TRANSFORM.AFFINE, matrix(img, x),
                                                        resample=resample, fillcolor=fill)


def _enhance(kind):
    return lambda img, factor: kind(img).enhance(factor)


# The enhance ops' level functions: a factor in [0.1, 1.9]; *Increasing: 1.0 moved by up to 0.9 either way.
_ENHANCE_LEVELS = {'': lambda level, rng: (level * 1.8 + 0.1,),
                   'Increasing': lambda level, rng: (max(0.1, 1.0 + _signed(level * 0.9, rng)[0]),)}


# The ops by name: (the op on a PIL image, timm's level function giving the op's arguments at
# `level`, the magnitude as a fraction of LEVEL_DENOM). The *Increasing variants grow stronger
# with the magnitude; in the original RandAugment Posterize and Solarize grow weaker and the
# enhance ops pass through 'no change'. Geometric ops (GEOMETRIC_OPS) also take the fill colour
# of uncovered pixels and the resampling filter.
_OPS = {
    'AutoContrast': (ImageOps.autocontrast, lambda level, rng: ()),
    'Equalize': (ImageOps.equalize, lambda level, rng: ()),
    'Invert': (ImageOps.invert, lambda level, rng: ()),
    'Posterize': (_posterize, lambda level, rng: (int(level * 4),)),
    'PosterizeIncreasing': (_posterize, lambda level, rng: (4 - int(level * 4),)),
    'Solarize': (ImageOps.solarize, lambda level, rng: (min(256, int(level * 256)),)),
    'SolarizeIncreasing': (ImageOps.solarize, lambda level, rng: (256 - min(256, int(level * 256)),)),
    'SolarizeAdd': (_solarize_add, lambda level, rng: (min(128, int(level * 110)),)),
    'Rotate': (lambda img, degrees, fill, resample: img.rotate(degrees, resample=resample, fillcolor=fill),
               lambda level, rng: _signed(level * 30.0, rng)),
    'ShearX': (_affine(lambda img, factor: (1, factor, 0, 0, 1, 0)),
               lambda level, rng: _signed(level * 0.3, rng)),
    'ShearY': (_affine(lambda img, factor: (1, 0, 0, factor, 1, 0)),
               lambda level, rng: _signed(level * 0.3, rng)),
    'TranslateXRel': (_affine(lambda img, pct: (1, 0, pct * img.width, 0, 1, 0)),
                      lambda level, rng: _signed(level * 0.45, rng)),
    'TranslateYRel': (_affine(lambda img, pct: (1, 0, 0, 0, 1, pct * img.height)),
                      lambda level, rng: _signed(level * 0.45, rng)),
}
_OPS.update({name + variant: (_enhance(getattr(ImageEnhance, name)), level)   # Color, ColorIncreasing, ...
             for name in ('Color', 'Contrast', 'Brightness', 'Sharpness')
             for variant, level in _ENHANCE_LEVELS.items()})
GEOMETRIC_OPS = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')
RA_TRANSFORMS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd',
                 'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel',
                 'TranslateYRel')
RA_INCREASING_TRANSFORMS = tuple(name + 'Increasing' if name + 'Increasing' in _OPS else name
                                 for name in RA_TRANSFORMS)


def op_arguments(name: str, magnitude: float, rng: np.random.Generator) -> tuple:
    """timm's arguments of op `name` at `magnitude` (0..10); `rng` draws the sign of signed ops."""
    return _OPS[name][1](magnitude / LEVEL_DENOM, rng)


class RandAugment:
    """timm's RandAugment: `num_ops` ops drawn uniformly with replacement from `names`, each applied
    with probability `prob` at a magnitude drawn around `magnitude` (normal with std
    `magnitude_std`, uniform in [0, magnitude] if that is inf), clipped to [0, magnitude_max]."""

    def __init__(self, names: Sequence[str], magnitude: float, num_ops: int = 2, prob: float = 0.5,
                 magnitude_std: float = 0.0, magnitude_max: float = LEVEL_DENOM,
                 interpolation: str = 'bicubic') -> None:
        self.names, self.num_ops, self.prob, self.interpolation = names, num_ops, prob, interpolation
        self.magnitude, self.magnitude_std, self.magnitude_max = magnitude, magnitude_std, magnitude_max

    def sample_magnitude(self, rng: np.random.Generator) -> float:
        magnitude = self.magnitude
        if self.magnitude_std == math.inf:
            magnitude = rng.uniform(0.0, magnitude)
        elif self.magnitude_std > 0:
            magnitude = rng.normal(magnitude, self.magnitude_std)
        return min(max(magnitude, 0.0), self.magnitude_max)

    def apply(self, name: str, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """One op, with probability `prob`."""
        if self.prob < 1.0 and rng.random() > self.prob:
            return img
        args = op_arguments(name, self.sample_magnitude(rng), rng)
        if name in GEOMETRIC_OPS:
            return _OPS[name][0](img, *args, fill=MEAN_FILL, resample=_resample(self.interpolation, rng))
        return _OPS[name][0](img, *args)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        for index in rng.integers(0, len(self.names), size=self.num_ops):
            img = self.apply(self.names[index], img, rng)
        return img


def rand_augment(policy: Optional[str], interpolation: str = 'bicubic') -> Optional[RandAugment]:
    """RandAugment from a timm policy string such as 'rand-m9-mstd0.5-inc1'; None for '' or 'none'.
    Sections after 'rand': m magnitude (default 10), n ops per image (2), p probability of each op
    (0.5), mstd magnitude noise std (0; above 100: uniform), mmax magnitude clip (10), inc 1 for the
    increasing ops (0; timm takes even inc0 as on, here it is off, as timm's documentation intends)."""
    if not policy or policy.lower() == 'none':
        return None
    sections = policy.split('-')
    if sections[0] != 'rand':
        raise ValueError(f"augmentation policy {policy!r} must start with 'rand'")
    settings = dict(m=10, n=2, p=0.5, mstd=0.0, mmax=10, inc=0)   # a value's type is its section's
    for section in sections[1:]:
        key = section.rstrip('0123456789.')
        value = section[len(key):]
        if key not in settings or not re.fullmatch(
                r'\d+' if type(settings[key]) is int else r'\d+(\.\d*)?', value):   # m9.5 is no integer
            raise ValueError(f'bad section {section!r} of policy {policy!r}: expected m, n, mmax or inc with '
                             'an integer, p or mstd with a number')
        settings[key] = type(settings[key])(value)
    magnitude_std = math.inf if settings['mstd'] > RA_UNIFORM_MSTD else settings['mstd']
    names = RA_INCREASING_TRANSFORMS if settings['inc'] else RA_TRANSFORMS
    return RandAugment(names, settings['m'], settings['n'], settings['p'], magnitude_std, settings['mmax'],
                       interpolation=interpolation)


class RandomErasing:
    """timm's RandomErasing on a normalised batch on the device, as timm's PrefetchLoader applies
    it: boxes drawn per image on the host (numpy seeded with `seed`), filled with per-pixel
    standard normal noise ('pixel'), one normal value per channel ('rand') or 0 ('const'), drawn
    on the device from Paddle's generator (paddle.seed). Settings come checked from train.py."""

    def __init__(self, prob: float, mode: str = 'pixel', max_count: int = 1, seed: int = 0) -> None:
        self.prob, self.mode, self.max_count = prob, mode, max_count
        self.rng = np.random.default_rng(seed)

    def boxes(self, height: int, width: int) -> List[Tuple[int, int, int, int]]:
        """(top, left, height, width) of one image's boxes, as timm's _erase draws them."""
        rng = self.rng
        if rng.random() > self.prob:
            return []
        count = self.max_count if self.max_count == 1 else int(rng.integers(1, self.max_count + 1))
        log_aspect = (math.log(ERASE_MIN_ASPECT), math.log(1.0 / ERASE_MIN_ASPECT))
        boxes = []
        for _ in range(count):
            for _ in range(ERASE_ATTEMPTS):
                target_area = rng.uniform(*ERASE_AREA) * height * width / count
                aspect = math.exp(rng.uniform(*log_aspect))
                box_height = int(round(math.sqrt(target_area * aspect)))
                box_width = int(round(math.sqrt(target_area / aspect)))
                if box_width < width and box_height < height:
                    boxes.append((int(rng.integers(0, height - box_height + 1)),
                                  int(rng.integers(0, width - box_width + 1)), box_height, box_width))
                    break
        return boxes

    def __call__(self, images: paddle.Tensor) -> paddle.Tensor:
        """images (B, C, H, W), erased in place; returns it."""
        batch, channels, height, width = images.shape
        for index in range(batch):
            for top, left, box_height, box_width in self.boxes(height, width):
                shape = [channels, box_height, box_width] if self.mode == 'pixel' else [channels, 1, 1]
                fill = (paddle.zeros if self.mode == 'const' else paddle.randn)(shape, images.dtype)
                images[index, :, top:top + box_height, left:left + box_width] = fill.expand(
                    [channels, box_height, box_width])
        return images


class TrainTransform:
    """timm's ImageNet training transform (create_transform with is_training=True) from train.py's
    flags: PIL RGB image -> uint8 (3, S, S), normalised and erased later on the batch, on the device."""

    def __init__(self, args) -> None:
        self.input_size, self.interpolation, self.hflip = args.input_size, args.train_interpolation, args.hflip
        self.crop_scale, self.color_jitter_strength = tuple(args.scale), args.color_jitter
        self.rand_augment = rand_augment(args.aa, args.train_interpolation)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        top, left, height, width = random_resized_crop_box(img.width, img.height, rng, self.crop_scale)
        img = img.crop((left, top, left + width, top + height)).resize(
            (self.input_size, self.input_size), _resample(self.interpolation, rng))
        if rng.random() < self.hflip:
            img = ImageOps.mirror(img)
        if self.rand_augment is not None:
            img = self.rand_augment(img, rng)
        elif self.color_jitter_strength > 0:   # as in timm, colour jitter only without RandAugment
            img = color_jitter(img, self.color_jitter_strength, rng)
        return to_chw(img)


train_transform = TrainTransform   # the name train.py imports


def smooth_one_hot(labels: paddle.Tensor, num_classes: int, smoothing: float) -> paddle.Tensor:
    """[B] int64 labels -> [B, num_classes] float32 targets: 1 - smoothing + smoothing / K on
    the label, smoothing / K elsewhere (timm's mixup_target values)."""
    return F.one_hot(labels, num_classes) * (1.0 - smoothing) + smoothing / num_classes


class Mixup:
    """timm's Mixup / CutMix in mode 'batch' with correct_lam: one lambda for the whole batch,
    image i mixed with image B - 1 - i (B even, and an alpha > 0: train.py checks both), targets
    mixed alike from label-smoothed one-hot labels. Lambda and the box are drawn on the host from
    numpy seeded with `seed` (one per rank); the mixing is Paddle ops."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 prob: float = 1.0, switch_prob: float = 0.5, label_smoothing: float = 0.1,
                 seed: int = 0) -> None:
        self.num_classes, self.mixup_alpha, self.cutmix_alpha = num_classes, mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob, self.label_smoothing = prob, switch_prob, label_smoothing
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

    def __call__(self, images: paddle.Tensor, labels: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """images [B, C, H, W] float, labels [B] int64 -> (mixed images, [B, K] float32 targets)."""
        _, _, height, width = images.shape
        lam, use_cutmix = self.draw()
        mirrored = paddle.flip(images, axis=[0])
        if lam == 1.0:
            mixed = images
        elif use_cutmix:
            # A box of sides sqrt(1 - lambda) of the image's, centred uniformly at random, clipped to
            # the image; lambda becomes the exact unpasted fraction.
            cut_ratio = math.sqrt(1.0 - lam)   # timm's cut_rat
            half_height, half_width = int(height * cut_ratio) // 2, int(width * cut_ratio) // 2
            center_y, center_x = int(self.rng.integers(0, height)), int(self.rng.integers(0, width))
            top, bottom = max(center_y - half_height, 0), min(center_y + half_height, height)
            left, right = max(center_x - half_width, 0), min(center_x + half_width, width)
            lam = 1.0 - (bottom - top) * (right - left) / (height * width)
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
