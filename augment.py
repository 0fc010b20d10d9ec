"""The training augmentation of the official recipe: timm's pieces, reimplemented.

The official code (ShoufaChen/CycleMLP `datasets.py`, `main.py`) builds its training data with
timm's create_transform and Mixup, as DeiT does:

    image  RandomResizedCrop (bicubic) -> horizontal flip -> RandAugment rand-m9-mstd0.5-inc1
           (or colour jitter 0.4 without RandAugment), in the loader's workers
    batch  normalise -> random erasing p=0.25 (as timm's PrefetchLoader does it, on the device)
           -> Mixup 0.8 / CutMix 1.0 with label smoothing 0.1 -> soft targets

Each piece here computes what timm's does (the tests check them against timm's formulas), without
timm: per-image work is plain numpy and Pillow, and every transform takes an explicit
`numpy.random.Generator`, so a seeded generator reproduces an augmentation exactly. The batch
work is Paddle ops on the device.

Not reproduced: timm's AutoAugment/AugMix policies, and Mixup's per-element and per-pair modes
(the recipe uses mode 'batch').
"""
import math
import re
from typing import List, Optional, Sequence, Tuple

import numpy as np
import zlib  # noqa: F401  before Paddle: Paddle 2.6 bundles a zlib that crashes one loaded after it
import paddle
import paddle.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from data import _RESAMPLING, IMAGENET_MEAN, INTERPOLATIONS, check_interpolation, to_chw

_TRANSFORM = getattr(Image, 'Transform', Image)   # Pillow 9.1 renamed its enums (see data._RESAMPLING)
# timm's 'random' interpolation draws one of these per call.
RANDOM_INTERPOLATIONS = (_RESAMPLING.BILINEAR, _RESAMPLING.BICUBIC)


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


def _enhancer(kind):
    return lambda img, factor: kind(img).enhance(factor)


def _enhance_level(level, rng):
    return (level * 1.8 + 0.1,)  # factor in [0.1, 1.9]


def _enhance_increasing_level(level, rng):
    return (max(ENHANCE_MIN_FACTOR, 1.0 + _random_sign(level * ENHANCE_MAX_DELTA, rng)),)


# The ops by name: (the op on a PIL image, and timm's level function: the op's arguments at
# `level`, the magnitude as a fraction of LEVEL_DENOM). The *Increasing variants grow stronger
# with the magnitude; the plain ones of the original RandAugment grow weaker for Posterize and
# Solarize and pass through 'no change' for the enhance ops. Geometric ops (GEOMETRIC_OPS) also
# take the fill colour of uncovered pixels and the resampling filter.
_OPS = {
    'AutoContrast': (ImageOps.autocontrast, lambda level, rng: ()),
    'Equalize': (ImageOps.equalize, lambda level, rng: ()),
    'Invert': (ImageOps.invert, lambda level, rng: ()),
    'Posterize': (_posterize, lambda level, rng: (int(level * POSTERIZE_MAX_BITS),)),
    'PosterizeIncreasing': (_posterize, lambda level, rng: (POSTERIZE_MAX_BITS - int(level * POSTERIZE_MAX_BITS),)),
    'Solarize': (ImageOps.solarize, lambda level, rng: (min(256, int(level * 256)),)),
    'SolarizeIncreasing': (ImageOps.solarize, lambda level, rng: (256 - min(256, int(level * 256)),)),
    'SolarizeAdd': (_solarize_add, lambda level, rng: (min(128, int(level * SOLARIZE_ADD_MAX)),)),
    'Color': (_enhancer(ImageEnhance.Color), _enhance_level),
    'ColorIncreasing': (_enhancer(ImageEnhance.Color), _enhance_increasing_level),
    'Contrast': (_enhancer(ImageEnhance.Contrast), _enhance_level),
    'ContrastIncreasing': (_enhancer(ImageEnhance.Contrast), _enhance_increasing_level),
    'Brightness': (_enhancer(ImageEnhance.Brightness), _enhance_level),
    'BrightnessIncreasing': (_enhancer(ImageEnhance.Brightness), _enhance_increasing_level),
    'Sharpness': (_enhancer(ImageEnhance.Sharpness), _enhance_level),
    'SharpnessIncreasing': (_enhancer(ImageEnhance.Sharpness), _enhance_increasing_level),
    'Rotate': (lambda img, degrees, fill, resample: img.rotate(degrees, resample=resample, fillcolor=fill),
               lambda level, rng: (_random_sign(level * ROTATE_MAX_DEGREES, rng),)),
    'ShearX': (lambda img, factor, fill, resample: _affine(img, (1, factor, 0, 0, 1, 0), fill, resample),
               lambda level, rng: (_random_sign(level * SHEAR_MAX, rng),)),
    'ShearY': (lambda img, factor, fill, resample: _affine(img, (1, 0, 0, factor, 1, 0), fill, resample),
               lambda level, rng: (_random_sign(level * SHEAR_MAX, rng),)),
    'TranslateXRel': (lambda img, pct, fill, resample: _affine(img, (1, 0, pct * img.width, 0, 1, 0), fill, resample),
                      lambda level, rng: (_random_sign(level * TRANSLATE_MAX_PCT, rng),)),
    'TranslateYRel': (lambda img, pct, fill, resample: _affine(img, (1, 0, 0, 0, 1, pct * img.height), fill, resample),
                      lambda level, rng: (_random_sign(level * TRANSLATE_MAX_PCT, rng),)),
}
GEOMETRIC_OPS = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')


def op_arguments(name: str, magnitude: float, rng: np.random.Generator) -> tuple:
    """Arguments of RandAugment op `name` at `magnitude` (0..10 scale), as timm computes them;
    `rng` draws the random sign of the signed ops."""
    return _OPS[name][1](magnitude / LEVEL_DENOM, rng)


class AugmentOp:
    """One RandAugment op: applied with probability `prob` at a magnitude drawn around
    `magnitude` (normal with std `magnitude_std`, uniform in [0, magnitude] if it is inf),
    clipped to [0, magnitude_max]."""

    def __init__(self, name: str, magnitude: float, prob: float = RA_DEFAULT_PROB,
                 magnitude_std: float = 0.0, magnitude_max: float = LEVEL_DENOM,
                 fill: Tuple[int, int, int] = DEFAULT_FILL, interpolation: str = 'bicubic') -> None:
        if name not in _OPS:
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
        if self.name in GEOMETRIC_OPS:
            return _OPS[self.name][0](img, *args, fill=self.fill, resample=_resample(self.interpolation, rng))
        return _OPS[self.name][0](img, *args)

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
    check_interpolation(interpolation, allow_random=True)
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


def erase_boxes(rng: np.random.Generator, height: int, width: int, prob: float,
                max_count: int = 1) -> List[Tuple[int, int, int, int]]:
    """timm's RandomErasing boxes (top, left, height, width) for one image: with probability
    `prob`, 1..max_count boxes, each of area fraction uniform in ERASE_AREA (divided by the count)
    and log-uniform aspect ratio in [0.3, 1/0.3], ten tries each."""
    if rng.random() > prob:
        return []
    count = max_count if max_count == 1 else int(rng.integers(1, max_count + 1))
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


class RandomErasing:
    """timm's RandomErasing on a normalised batch on the device, as timm's PrefetchLoader applies
    it: boxes drawn per image on the host (erase_boxes, numpy seeded with `seed`), filled on the
    device with per-pixel standard normal noise ('pixel'), one normal value per channel ('rand')
    or 0 ('const'), from Paddle's generator (paddle.seed)."""

    def __init__(self, prob: float, mode: str = 'pixel', max_count: int = 1, seed: int = 0) -> None:
        if mode not in ('pixel', 'rand', 'const'):
            raise ValueError(f'random erasing mode {mode!r} is not pixel, rand or const')
        self.prob, self.mode, self.max_count = prob, mode, max_count
        self.rng = np.random.default_rng(seed)

    def __call__(self, images: paddle.Tensor) -> paddle.Tensor:
        """images (B, C, H, W), erased in place; returns it."""
        batch, channels, height, width = images.shape
        for index in range(batch):
            for top, left, box_height, box_width in erase_boxes(self.rng, height, width, self.prob,
                                                                self.max_count):
                if self.mode == 'pixel':
                    fill = paddle.randn([channels, box_height, box_width], images.dtype)
                elif self.mode == 'rand':
                    fill = paddle.randn([channels, 1, 1], images.dtype).expand([channels, box_height, box_width])
                else:
                    fill = paddle.zeros([channels, box_height, box_width], images.dtype)
                images[index, :, top:top + box_height, left:left + box_width] = fill
        return images


class TrainTransform:
    """timm's ImageNet training transform (create_transform with is_training=True)."""

    def __init__(self, input_size: int, auto_augment: Optional[str], color_jitter_strength: float,
                 interpolation: str = 'bicubic', crop_scale: Tuple[float, float] = RRC_SCALE,
                 hflip: float = HFLIP_PROB) -> None:
        check_interpolation(interpolation, allow_random=True)
        self.input_size = input_size
        self.interpolation = interpolation
        self.rand_augment = rand_augment(auto_augment, interpolation)
        # As in timm, colour jitter is only used when RandAugment is off.
        self.color_jitter_strength = 0.0 if self.rand_augment is not None else color_jitter_strength
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
        return to_chw(img)   # normalised, then erased (RandomErasing), on the device



def train_transform(args) -> TrainTransform:
    """TrainTransform from timm's flags, as train.py has them: `input_size`, `aa`,
    `color_jitter`, `train_interpolation`, `scale` (the crop's area range) and `hflip` (the flip
    probability). Random erasing (`reprob`, `remode`, `recount`) follows on the batch."""
    return TrainTransform(args.input_size, args.aa, args.color_jitter, args.train_interpolation,
                          args.scale, args.hflip)


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
