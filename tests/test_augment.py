"""augment.py: timm's training augmentation, checked against timm's formulas written out here
and against plain Pillow and numpy, on real images; never against augment.py itself."""
import math
from types import SimpleNamespace

import numpy as np
import paddle
import pytest
from PIL import Image

import augment
from conftest import photo_like_array

FILL = (124, 116, 104)  # round(255 * ImageNet mean)

TIMM_INCREASING_OPS = [
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
]
TIMM_PLAIN_OPS = [
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
]


class FixedDraw:
    """Stands in for the generator where only the random-sign draw matters."""

    def __init__(self, value):
        self.value = value

    def random(self):
        return self.value


def make_args(**overrides):
    """train.py's augmentation flags at their defaults, on 16x16 crops."""
    flags = dict(input_size=16, aa="rand-m9-mstd0.5-inc1", color_jitter=0.4, train_interpolation="bicubic",
                 reprob=0.25, remode="pixel", recount=1, scale=(0.08, 1.0), hflip=0.5)
    return SimpleNamespace(**{**flags, **overrides})


def photo(width=32, height=24, seed=0):
    return Image.fromarray(photo_like_array(width, height, seed))


def pixels(img):
    return np.asarray(img).astype(np.int32)


def test_rand_augment_policy_parsing():
    def settings(policy):
        ra = augment.rand_augment(policy)
        return (list(ra.names), ra.num_ops, ra.magnitude, ra.magnitude_std, ra.magnitude_max, ra.prob)

    assert settings("rand-m9-mstd0.5-inc1") == (TIMM_INCREASING_OPS, 2, 9, 0.5, 10, 0.5)
    assert settings("rand-m7-n3-mstd101-mmax20-inc0-p0.3") == (TIMM_PLAIN_OPS, 3, 7, math.inf, 20, 0.3)
    assert settings("rand") == (TIMM_PLAIN_OPS, 2, 10, 0.0, 10, 0.5)
    assert augment.rand_augment("none") is None and augment.rand_augment("") is None


@pytest.mark.parametrize("policy, message", [
    ("auto-m9", "must start with 'rand'"),
    ("rand-q3", "bad section 'q3' of policy 'rand-q3'"),
    ("rand-mx", "bad section 'mx'"),
    ("rand-m9.5", "bad section 'm9.5' .* m, n, mmax or inc with an integer"),
    ("rand-n2.0", "bad section 'n2.0'"),
    ("rand-p", "bad section 'p'"),
])
def test_rand_augment_policy_errors(policy, message):
    with pytest.raises(ValueError, match=message):
        augment.rand_augment(policy)


@pytest.mark.parametrize("magnitude", [0, 3, 5.5, 9, 10])
@pytest.mark.parametrize("sign_draw", [0.2, 0.8])
def test_magnitude_to_op_arguments_match_timm(magnitude, sign_draw):
    # timm's level functions, written out; timm negates when random() > 0.5.
    sign = -1 if sign_draw > 0.5 else 1
    level = magnitude / 10.0
    expected = {
        "Rotate": (sign * level * 30.0,),
        "ShearX": (sign * level * 0.3,),
        "TranslateYRel": (sign * level * 0.45,),
        "Posterize": (int(level * 4),),
        "PosterizeIncreasing": (4 - int(level * 4),),
        "Solarize": (min(256, int(level * 256)),),
        "SolarizeIncreasing": (256 - min(256, int(level * 256)),),
        "SolarizeAdd": (min(128, int(level * 110)),),
        "Contrast": (level * 1.8 + 0.1,),
        "BrightnessIncreasing": (max(0.1, 1.0 + sign * level * 0.9),),
        "Invert": (),
    }
    for name, arguments in expected.items():
        computed = augment.op_arguments(name, magnitude, FixedDraw(sign_draw))
        assert computed == pytest.approx(arguments), name


def test_magnitude_noise_and_clipping():
    rng = np.random.default_rng(0)
    noisy = augment.RandAugment(["Invert"], 9, magnitude_std=5.0)
    drawn = np.array([noisy.sample_magnitude(rng) for _ in range(2000)])
    assert drawn.min() == 0.0 and drawn.max() == 10.0  # clipped at 0 and at mmax 10
    assert abs(np.median(drawn) - 9) < 0.5 and 0.2 < np.mean(drawn == 10.0) < 0.5

    uniform = augment.RandAugment(["Invert"], 9, magnitude_std=math.inf)
    drawn = np.array([uniform.sample_magnitude(rng) for _ in range(2000)])
    assert 0 <= drawn.min() < 0.1 and 8.9 < drawn.max() <= 9 and abs(drawn.mean() - 4.5) < 0.3

    wide = augment.RandAugment(["Invert"], 15, magnitude_std=1.0, magnitude_max=20)
    assert 14 < np.mean([wide.sample_magnitude(rng) for _ in range(500)]) < 16
    assert augment.RandAugment(["Invert"], 9).sample_magnitude(rng) == 9  # no noise: exact


def _apply(name, magnitude, sign_draw=0.2, interpolation="nearest", img=None):
    """Apply one op with certainty at an exact magnitude and a chosen sign."""
    ra = augment.RandAugment([name], magnitude, prob=1.0, interpolation=interpolation)
    # prob 1, no magnitude noise and a fixed filter leave the sign as the only draw
    return ra.apply(name, img if img is not None else photo(), FixedDraw(sign_draw))


@pytest.mark.parametrize("name, magnitude, sign_draw, expected", [
    ("Invert", 9, 0.2, lambda x: 255 - x),
    ("PosterizeIncreasing", 9, 0.2, lambda x: x & 0b10000000),  # 1 bit kept
    ("Posterize", 9, 0.2, lambda x: x & 0b11100000),  # 3 bits
    ("PosterizeIncreasing", 10, 0.2, lambda x: x & 0),  # 0 bits: black
    ("SolarizeIncreasing", 9, 0.2, lambda x: np.where(x >= 26, 255 - x, x)),  # threshold 256 - 230
    ("SolarizeAdd", 9, 0.2, lambda x: np.where(x < 128, np.minimum(255, x + 99), x)),  # add 99 below 128
    ("ShearX", 10, 0.2, lambda x: _affine_nearest(x, 1, 0.3, 0, 0, 1, 0)),
    ("ShearY", 10, 0.8, lambda x: _affine_nearest(x, 1, 0, 0, -0.3, 1, 0)),
    ("TranslateXRel", 10, 0.2, lambda x: _affine_nearest(x, 1, 0, 9, 0, 1, 0)),  # 0.45 * 20 = 9 px left
    ("TranslateYRel", 10, 0.8, lambda x: _affine_nearest(x, 1, 0, 0, 0, 1, -9)),  # 0.45 * 20 = 9 px down
])
def test_exact_ops_against_numpy(name, magnitude, sign_draw, expected):
    img = photo(20, 20, seed=5)
    np.testing.assert_array_equal(pixels(_apply(name, magnitude, sign_draw, img=img)), expected(pixels(img)))


def test_contrast_and_enhance_ops_on_a_real_image():
    img = photo(32, 24, seed=5)
    x = pixels(img)
    dull = Image.fromarray((100 + photo_like_array(32, 24, 1) // 8).astype(np.uint8))
    d = pixels(dull)
    for name in ("AutoContrast", "Equalize"):
        out = pixels(_apply(name, 9, img=dull))
        assert out.min() <= 10 and out.max() >= 245, name  # the range is stretched
        for channel in range(3):  # monotonic: order of grey levels kept
            order = np.argsort(d[..., channel], axis=None, kind="stable")
            assert (np.diff(out[..., channel].reshape(-1)[order]) >= 0).all(), name

    brighter = pixels(_apply("BrightnessIncreasing", 10, sign_draw=0.2, img=img))
    assert np.abs(brighter - np.clip(x * 1.9, 0, 255)).max() <= 1
    grey = pixels(img.convert("L").convert("RGB"))
    desaturated = pixels(_apply("ColorIncreasing", 10, sign_draw=0.8, img=img))  # factor 0.1
    assert np.abs(desaturated - (grey + 0.1 * (x - grey))).max() <= 1.5
    flat = pixels(_apply("ContrastIncreasing", 10, sign_draw=0.8, img=img))
    assert flat.std() < 0.2 * x.std()

    def edge_energy(a):
        a = a.astype(float)
        return np.abs(np.diff(a, axis=0)).sum() + np.abs(np.diff(a, axis=1)).sum()
    assert edge_energy(pixels(_apply("SharpnessIncreasing", 10, 0.2, img=img))) > edge_energy(x)
    assert edge_energy(pixels(_apply("SharpnessIncreasing", 10, 0.8, img=img))) < edge_energy(x)


@pytest.mark.parametrize("name", sorted(set(TIMM_INCREASING_OPS + TIMM_PLAIN_OPS)))
def test_every_op_runs_across_the_magnitude_range(name):
    img = photo(12, 10)
    for magnitude in (0, 5, 10, 20):
        for sign_draw in (0.2, 0.8):
            ra = augment.RandAugment([name], magnitude, prob=1.0, magnitude_max=20)
            out = ra.apply(name, img, FixedDraw(sign_draw))
            assert out.mode == "RGB" and out.size == img.size


def test_rotate_turns_counter_clockwise():
    spot = np.zeros((41, 41, 3), np.uint8)
    spot[19:22, 29:32] = 255  # 3x3 spot centred 10 px right of the centre
    rotated = pixels(_apply("Rotate", 10, sign_draw=0.2, img=Image.fromarray(spot)))  # +30 deg
    ys, xs = np.nonzero(rotated[..., 0] > 128)
    center = 20.5  # Pillow rotates about (width / 2, height / 2) in pixel-edge coordinates
    assert np.mean(xs) + 0.5 == pytest.approx(center + 10 * math.cos(math.radians(30)), abs=1)
    assert np.mean(ys) + 0.5 == pytest.approx(center - 10 * math.sin(math.radians(30)), abs=1)
    corner = rotated[0, 0]
    assert tuple(corner) == FILL  # uncovered corner filled with the mean colour


def _affine_nearest(x, a, b, c, d, e, f):
    """Output pixel (col, row) reads input at (a*X + b*Y + c, d*X + e*Y + f), X, Y = centres."""
    height, width = x.shape[:2]
    out = np.empty_like(x)
    for row in range(height):
        for col in range(width):
            sx = a * (col + 0.5) + b * (row + 0.5) + c
            sy = d * (col + 0.5) + e * (row + 0.5) + f
            inside = 0 <= sx < width and 0 <= sy < height
            out[row, col] = x[int(sy), int(sx)] if inside else FILL
    return out


def test_rand_augment_applies_n_ops_with_probability():
    img = photo()
    never = augment.rand_augment("rand-m9-p0")
    assert np.array_equal(pixels(never(img, np.random.default_rng(0))), pixels(img))
    invert_twice = augment.RandAugment(["Invert"], 9, num_ops=2, prob=1.0)
    assert np.array_equal(pixels(invert_twice(img, np.random.default_rng(0))), pixels(img))
    invert_thrice = augment.RandAugment(["Invert"], 9, num_ops=3, prob=1.0)
    assert np.array_equal(pixels(invert_thrice(img, np.random.default_rng(0))), 255 - pixels(img))


def test_random_resized_crop_box_bounds():
    rng = np.random.default_rng(0)
    for _ in range(500):
        top, left, height, width = augment.random_resized_crop_box(200, 150, rng)
        assert 0 <= top and top + height <= 150 and 0 <= left and left + width <= 200
        # area within scale (0.08, 1) and aspect within (3/4, 4/3), up to rounding to pixels
        assert 0.08 * 200 * 150 * 0.97 <= height * width <= 200 * 150
        assert 0.75 * 0.97 <= width / height <= 4 / 3 * 1.03
    # A 1000x10 strip fits no crop of >= 8% area and aspect <= 4/3: the central fallback.
    assert augment.random_resized_crop_box(1000, 10, rng) == (0, (1000 - 13) // 2, 10, 13)
    assert augment.random_resized_crop_box(10, 1000, rng) == ((1000 - 13) // 2, 0, 13, 10)


def test_crop_scale_and_flip_probability_are_honoured():
    rng = np.random.default_rng(0)
    areas = [h * w / (200 * 150) for _, _, h, w in
             (augment.random_resized_crop_box(200, 150, rng, (0.5, 1.0)) for _ in range(300))]
    assert 0.5 * 0.97 <= min(areas) < 0.6 and max(areas) <= 1.0
    half = np.zeros((32, 32, 3), np.uint8)
    half[:, 16:] = 255                      # dark left half, bright right half
    img = Image.fromarray(half)
    left_is_dark = {}
    for hflip in (0.0, 1.0):
        transform = augment.TrainTransform(make_args(input_size=32, aa=None, color_jitter=0.0, scale=(1.0, 1.0),
                                                   hflip=hflip))
        outputs = [transform(img, np.random.default_rng(seed)) for seed in range(20)]
        left_is_dark[hflip] = {bool(out[:, :, :8].mean() < out[:, :, -8:].mean()) for out in outputs}
    assert left_is_dark == {0.0: {True}, 1.0: {False}}


def test_color_jitter_scales_brightness_within_strength():
    grey = Image.new("RGB", (8, 8), (100, 100, 100))  # contrast and saturation change nothing
    values = [pixels(augment.color_jitter(grey, 0.4, np.random.default_rng(seed)))[0, 0, 0]
              for seed in range(40)]
    assert 60 <= min(values) and max(values) <= 140
    assert max(values) - min(values) > 40


def erase(shape, prob=1.0, mode="pixel", seed=1):
    """RandomErasing of a zero batch: the erased values (numpy)."""
    paddle.seed(seed)
    return augment.RandomErasing(prob, mode, seed=seed)(paddle.zeros(shape)).numpy()


def test_random_erasing_of_a_batch_on_the_device():
    batch = erase((2, 3, 64, 64))
    for erased in batch:                    # each image: one solid box of normal noise
        mask = (erased != 0).any(axis=0)
        rows, cols = np.nonzero(mask)
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert mask.sum() == height * width
        assert 0.015 <= height * width / 64 ** 2 <= 0.36
        assert 0.25 <= height / width <= 4
        noise = erased[:, mask]
        assert abs(noise.mean()) < 0.2 and 0.8 < noise.std() < 1.2
        assert len(np.unique(noise)) > noise.size // 2  # per pixel, not per box
    assert not np.array_equal(batch[0] != 0, batch[1] != 0)   # boxes drawn per image
    per_channel = erase((1, 3, 64, 64), mode="rand")[0]
    assert all(len(np.unique(channel[channel != 0])) == 1 for channel in per_channel)
    assert not erase((1, 3, 64, 64), mode="const").any()
    np.testing.assert_array_equal(erase((2, 3, 16, 16), seed=5), erase((2, 3, 16, 16), seed=5))
    erased_count = sum(erase((1, 3, 8, 8), 0.25, seed=seed).any() for seed in range(200))
    assert 0.15 < erased_count / 200 < 0.35  # probability 0.25
    # --recount 3: one to three boxes per image
    assert {len(augment.RandomErasing(1.0, max_count=3, seed=seed).boxes(64, 64)) for seed in range(30)} == {1, 2, 3}
    erasing = augment.RandomErasing(1.0)
    for _ in range(100):  # boxes never cover a whole side of a tiny image
        for top, left, height, width in erasing.boxes(4, 4):
            assert height < 4 and width < 4


def test_train_transform_is_seeded_and_uses_jitter_only_without_rand_augment():
    img = photo(60, 45, seed=4)
    transform = augment.train_transform(make_args(input_size=24))
    first = transform(img, np.random.default_rng(7))
    assert first.shape == (3, 24, 24) and first.dtype == np.uint8
    assert np.array_equal(first, transform(img, np.random.default_rng(7)))
    assert not np.array_equal(first, transform(img, np.random.default_rng(8)))
    # With RandAugment the jitter strength changes nothing: timm jitters only without it.
    assert np.array_equal(first, augment.train_transform(make_args(input_size=24, color_jitter=0.0))(
        img, np.random.default_rng(7)))

    random_filter = augment.train_transform(make_args(train_interpolation="random"))
    assert random_filter(img, np.random.default_rng(7)).shape == (3, 16, 16)

    plain = augment.train_transform(make_args(aa="none"))
    unjittered = augment.train_transform(make_args(aa="none", color_jitter=0.0))
    assert plain.rand_augment is None
    assert not np.array_equal(plain(img, np.random.default_rng(7)), unjittered(img, np.random.default_rng(7)))


def _batch(batch_size=4, size=8):
    images = np.random.default_rng(3).normal(size=(batch_size, 3, size, size)).astype(np.float32)
    labels = np.arange(batch_size, dtype=np.int64) % 5
    return images, paddle.to_tensor(images), paddle.to_tensor(labels)


def test_mixup_is_a_convex_mix_with_matching_targets():
    images, images_t, labels_t = _batch()
    for seed in range(3):
        mixup = augment.Mixup(num_classes=5, mixup_alpha=0.8, cutmix_alpha=0.0, seed=seed)
        mixed, targets = (t.numpy() for t in mixup(images_t, labels_t))
        np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
        lam = (targets[0, 0] - 0.02) / 0.9  # smoothing 0.1 over 5 classes: on 0.92, off 0.02
        assert 0 < lam < 1
        np.testing.assert_allclose(targets[0, 3], 0.02 + 0.9 * (1 - lam), atol=1e-6)
        np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], atol=1e-5)


def test_cutmix_pastes_an_area_matching_lambda():
    images, images_t, labels_t = _batch(size=16)
    for seed in range(5):
        mixup = augment.Mixup(num_classes=5, mixup_alpha=0.0, cutmix_alpha=1.0, seed=seed)
        mixed, targets = (t.numpy() for t in mixup(images_t, labels_t))
        from_self = mixed == images
        from_mirror = mixed == images[::-1]
        assert (from_self | from_mirror).all()  # every pixel copied from one of the two
        pasted = from_mirror[0, 0].mean()
        lam = (targets[0, 0] - 0.02) / 0.9
        assert pasted == pytest.approx(1 - lam, abs=1e-6)
        np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)


def test_mixup_switches_modes_and_can_be_off():
    mixup = augment.Mixup(num_classes=5, seed=0)
    modes = {mixup.draw()[1] for _ in range(30)}
    assert modes == {True, False}
    never = augment.Mixup(num_classes=5, prob=0.0)
    images, images_t, labels_t = _batch()
    mixed, targets = never(images_t, labels_t)
    assert np.array_equal(mixed.numpy(), images)
    np.testing.assert_allclose(targets.numpy()[1], [0.02, 0.92, 0.02, 0.02, 0.02], rtol=1e-6)
