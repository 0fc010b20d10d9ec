"""predict.py on real files Pillow writes in every odd mode, and on broken ones: probabilities
recomputed directly, one-line errors, exit codes, large images and decompression bombs."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import paddle
import pytest
from PIL import Image

import convert_weights
import predict
from conftest import REPO_ROOT, photo_like_array
from zoo import create_model
from data import ImageDataset, eval_transform, load_image, normalize
from weights import WeightsError

INPUT_SIZE = 32
ENV = dict(os.environ, OMP_NUM_THREADS="1")
EXIF_ORIENTATION = 0x0112
ROTATE_90 = 6  # EXIF orientation 6: the stored pixels must be turned 90 degrees clockwise


def write_odd_images(folder) -> dict:
    """name -> path for one readable file per format / mode, each with different content."""
    os.makedirs(folder, exist_ok=True)
    rgb = [Image.fromarray(photo_like_array(48, 36, seed)) for seed in range(10)]
    paths = {}

    def save(name, img, **options):
        paths[name] = os.path.join(folder, name)
        img.save(paths[name], **options)

    save("photo.jpg", rgb[0])
    save("photo.png", rgb[1])
    save("photo.webp", rgb[2])
    save("photo.bmp", rgb[3])
    save("grey.png", rgb[4].convert("L"))
    save("palette.png", rgb[5].convert("P"))
    rgba = rgb[6].copy()
    rgba.putalpha(128)
    save("alpha.png", rgba)
    save("cmyk.jpg", rgb[7].convert("CMYK"))
    grey16 = (np.asarray(rgb[8].convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    grey16 = Image.fromarray(grey16)
    assert grey16.mode == "I;16"
    save("grey16.png", grey16)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_90
    save("rotated.jpg", rgb[9], exif=exif)
    return paths


def write_broken_files(folder) -> dict:
    """name -> path of inputs that must fail, each with the words its error should contain."""
    jpeg = os.path.join(folder, "whole.jpg")
    Image.fromarray(photo_like_array(64, 48, 99)).save(jpeg)
    data = open(jpeg, "rb").read()
    os.remove(jpeg)
    broken = {"truncated.jpg": "truncated", "text.jpg": "cannot identify",
              "empty.png": "cannot identify", "missing.jpg": "no such file"}
    with open(os.path.join(folder, "truncated.jpg"), "wb") as file:
        file.write(data[:len(data) // 2])
    with open(os.path.join(folder, "text.jpg"), "w") as file:
        file.write("this is not an image\n")
    open(os.path.join(folder, "empty.png"), "wb").close()
    return {os.path.join(folder, name): words for name, words in broken.items()}


def direct_probabilities(model, path):
    """The official pipeline written out: decode (EXIF orientation applied), eval transform,
    forward, softmax."""
    batch = paddle.to_tensor(normalize(eval_transform(INPUT_SIZE)(load_image(path, exif_orientation=True)))[None])
    with paddle.no_grad():
        return paddle.nn.functional.softmax(model(batch), axis=-1).numpy()[0]


def run_predict(*args):
    return subprocess.run([sys.executable, str(REPO_ROOT / "predict.py"), *args],
                          capture_output=True, text=True, env=ENV, timeout=300)


def predict_in_process(capsys, *args):
    """predict.main on the parsed flags: (exit status, stdout lines)."""
    status = predict.main(predict.get_args_parser().parse_args([str(arg) for arg in args]))
    return status, capsys.readouterr().out.splitlines()


def test_every_mode_predicted_and_broken_files_reported(tmp_path, make_tiny_weights, capsys):
    weights = make_tiny_weights()
    good = write_odd_images(tmp_path / "images")
    broken = write_broken_files(tmp_path / "images")
    # The folder holds good and broken files; the missing file is named explicitly.
    missing = [path for path in broken if path.endswith("missing.jpg")]
    status, lines = predict_in_process(capsys, tmp_path / "images", *missing, "--weights", weights,
                                       "--input-size", INPUT_SIZE, "--topk", "2", "--batch-size", "4", "--json")
    assert status == 1
    records = {record["image"]: record for record in map(json.loads, lines)}
    assert set(records) == set(good.values()) | set(broken)
    for path, words in broken.items():
        assert words in records[path]["error"].lower(), records[path]
        assert "\n" not in records[path]["error"]
    model = create_model(weights=weights)
    model.eval()
    for path in good.values():
        predictions = records[path]["predictions"]
        assert len(predictions) == 2
        expected = direct_probabilities(model, path)
        top = np.argsort(-expected)[:2]
        assert [p["class_id"] for p in predictions] == top.tolist()
        assert [p["label"] for p in predictions] == [["cat", "dog", "fox"][i] for i in top]
        np.testing.assert_allclose([p["probability"] for p in predictions], expected[top], atol=1e-5)
    # The EXIF rotation was applied: the prediction is that of the turned image.
    assert load_image(good["rotated.jpg"], exif_orientation=True).size == (36, 48)


def test_exif_orientation_applied_by_predict_only(tmp_path):
    """The official loader (torchvision's ImageFolder) ignores EXIF orientation, so training
    and evaluation read the stored pixels; predict.py turns a phone photo upright."""
    path = str(tmp_path / "phone.jpg")
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_90
    Image.fromarray(photo_like_array(48, 36, 5)).save(path, exif=exif)
    with Image.open(path) as stored:
        official = np.asarray(stored.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(load_image(path)), official)
    dataset = ImageDataset([(path, 0)], ["a"], lambda img, rng: np.asarray(img), skip_unreadable=False)
    np.testing.assert_array_equal(dataset[0][0], official)
    predictor = predict.Predictor(None, None, 32, 1.0, "bicubic")
    turned = np.rot90(official, k=-1)          # orientation 6: 90 degrees clockwise
    np.testing.assert_array_equal(predictor.load(path), normalize(eval_transform(32, 1.0)(Image.fromarray(turned))))


def test_evaluation_transform_recorded_in_the_weights_is_used(tmp_path, make_tiny_weights, capsys):
    recorded = {"input_size": 40, "crop_pct": 1.0, "interpolation": "bilinear"}
    weights = make_tiny_weights(data_config=recorded)
    image = os.path.join(tmp_path, "wide.png")
    Image.fromarray(photo_like_array(70, 45, 3)).save(image)
    model = create_model(weights=weights)
    model.eval()
    for flags, transform in (([], eval_transform(40, 1.0, "bilinear")),
                             (["--input-size", "48"], eval_transform(48, 1.0, "bilinear"))):
        status, lines = predict_in_process(capsys, image, "--weights", weights, "--topk", "3", "--json", *flags)
        assert status == 0
        got = {p["class_id"]: p["probability"] for p in json.loads(lines[0])["predictions"]}
        with paddle.no_grad():
            want = paddle.nn.functional.softmax(
                model(paddle.to_tensor(normalize(transform(load_image(image)))[None])), axis=-1).numpy()[0]
        np.testing.assert_allclose([got[i] for i in range(3)], want, atol=1e-5)


def test_text_output_and_error_lines(tmp_path, make_tiny_weights):
    image = os.path.join(tmp_path, "cat.png")
    Image.fromarray(photo_like_array(40, 30, 1)).save(image)
    missing = str(tmp_path / "gone.jpg")
    result = run_predict(image, missing, "--weights", make_tiny_weights(),
                         "--input-size", str(INPUT_SIZE), "--topk", "3")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: {missing}: no such file"
    lines = result.stdout.strip().splitlines()
    assert lines[0] == image and len(lines) == 4
    probabilities = [float(line.split()[0]) for line in lines[1:]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-3)
    assert {line.split()[2] for line in lines[1:]} == {"cat", "dog", "fox"}


def test_bad_weights_and_settings_name_the_file(tmp_path, make_tiny_weights):
    with pytest.raises(WeightsError, match=f"{tmp_path / 'none.pdparams'}: no such file"):
        predict.main(predict.get_args_parser().parse_args([str(tmp_path), "--weights", str(tmp_path / "none.pdparams")]))
    for config, expected in (({"input_size": "big"}, "data_config 'input_size' is 'big'"),
                             ({"crop_pct": 1e-9}, "data_config 'crop_pct' is 1e-09"),
                             ({"interpolation": "lanczos9"}, "data_config 'interpolation' is 'lanczos9'")):
        weights = make_tiny_weights("odd.pdparams", data_config=config)
        with pytest.raises(WeightsError, match=re.escape(f"{weights}: {expected}")):
            predict.main(predict.get_args_parser().parse_args([str(tmp_path), "--weights", weights]))
        with pytest.raises(WeightsError, match=re.escape(f"{weights}: {expected}")):   # never copied on
            convert_weights.main(convert_weights.get_args_parser().parse_args([weights, str(tmp_path / "out.pdparams")]))
        assert not os.path.exists(tmp_path / "out.pdparams")


def test_an_image_that_would_blow_up_memory_is_one_error_among_good_ones(tmp_path, make_tiny_weights, capsys):
    good, line = str(tmp_path / "good.png"), str(tmp_path / "line.png")
    Image.fromarray(photo_like_array(40, 30, 1)).save(good)
    Image.new("RGB", (20_000_000, 1)).save(line)
    fifo = str(tmp_path / "pipe.png")
    os.mkfifo(fifo)
    status, lines = predict_in_process(capsys, good, line, fifo, "--weights", make_tiny_weights(),
                                       "--input-size", INPUT_SIZE, "--json")
    records = [json.loads(text) for text in lines]
    assert status == 1 and [record["image"] for record in records] == [good, line, fifo]
    assert "predictions" in records[0]
    assert "20000000x1 image resizes to" in records[1]["error"]
    assert records[2]["error"] == "cannot read image: not a regular file"
    status, lines = predict_in_process(capsys, fifo, "--weights", make_tiny_weights(), "--fast-decode", "--json")
    assert status == 1 and json.loads(lines[0])["error"] == "cannot read image: not a regular file"


def test_large_images_take_the_official_path_unless_fast_decode(tmp_path):
    exact = predict.Predictor(None, None, INPUT_SIZE, 0.875, "bicubic")
    fast = predict.Predictor(None, None, INPUT_SIZE, 0.875, "bicubic", fast_decode=True)
    resize = exact.transform.resize_size
    ordinary = str(tmp_path / "ordinary.jpg")
    Image.fromarray(photo_like_array(120, 100, 3)).save(ordinary)   # under 4x the target
    np.testing.assert_array_equal(fast.load(ordinary), exact.load(ordinary))
    for name in ("large.jpg", "large.png"):
        path = str(tmp_path / name)
        Image.fromarray(photo_like_array(1200, 900, 4)).save(path)
        official = normalize(eval_transform(INPUT_SIZE)(load_image(path)))
        np.testing.assert_array_equal(exact.load(path), official)
        shrunk = load_image(path, exif_orientation=True, reduce_to=2 * resize)
        assert 2 * resize <= min(shrunk.size) < 4 * resize and shrunk.mode == "RGB"
        assert shrunk.size[0] / shrunk.size[1] == pytest.approx(1200 / 900, rel=0.02)
        # Close to the official transform of the full image, not equal (see predict's docstring).
        approximate = fast.load(path)
        assert 0 < np.abs(approximate - official).mean() < 0.05


def test_decompression_bombs_are_refused_per_image(tmp_path, monkeypatch):
    image = str(tmp_path / "bomb.png")
    Image.fromarray(photo_like_array(100, 100, 5)).save(image)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)   # 100 x 100 is over twice this
    predictor = predict.Predictor(lambda batch: np.zeros((len(batch), 3)), None, INPUT_SIZE,
                                  0.875, "bicubic")
    [result] = predict.predict(predictor, [image])
    assert "decompression bomb" in result["error"]


def test_names_are_escaped_and_errors_come_at_once(tmp_path, make_tiny_weights, capsys):
    """A file name or class name with a newline or a terminal escape prints as one line, escaped;
    an unreadable file's error comes before the images after it are decoded."""
    weights = make_tiny_weights(class_names=("cat\nerror: forged", "dog\x1b[2J", "fox"))
    folder = tmp_path / "in\x1b[31mbox"
    folder.mkdir()
    good = folder / "a\nb.png"
    Image.fromarray(photo_like_array(40, 30, 1)).save(good)
    broken = folder / "broken.png"
    broken.write_bytes(b"not a png")
    status = predict.main(predict.get_args_parser().parse_args(
        [str(good), str(broken), str(good), "--weights", weights, "--input-size", str(INPUT_SIZE), "--topk", "3"]))
    output = capsys.readouterr()
    lines = output.out.splitlines()
    assert status == 1
    escaped = str(good).replace("\n", "\\n").replace("\x1b", "\\x1b")
    assert output.err.splitlines() == [f"error: {str(broken)}: cannot read image: cannot identify image file"
                                       .replace("\x1b", "\\x1b")]
    assert lines[0] == escaped and lines[4] == escaped and len(lines) == 8
    labels = {line.split(maxsplit=2)[2] for line in lines[1:4]}
    assert labels == {"cat\\nerror: forged", "dog\\x1b[2J", "fox"}
    assert all("\x1b" not in line for line in lines)
    loads = []
    predictor = predict.Predictor(lambda batch: loads.append("forward") or np.zeros((len(batch), 3)), None,
                                  INPUT_SIZE, 0.875, "bicubic")
    original = predictor.load
    predictor.load = lambda path: loads.append(os.path.basename(path)) or original(path)
    results = predict.predict(predictor, [str(good), str(broken), str(good)], batch_size=16)
    assert next(results)["image"] == str(good) and loads == ["a\nb.png", "broken.png", "forward"]
    assert "error" in next(results) and loads == ["a\nb.png", "broken.png", "forward"]


def test_an_output_that_is_not_finite_is_an_error_not_a_prediction(tmp_path):
    image = str(tmp_path / "photo.png")
    Image.fromarray(photo_like_array(40, 30, 1)).save(image)
    nan_in_row_0 = lambda batch: np.array([[np.nan, 0, 0]] + [[1.0, 0, 0]] * (len(batch) - 1))  # noqa: E731
    predictor = predict.Predictor(nan_in_row_0, None, INPUT_SIZE, 0.875, "bicubic")
    first, second = predict.predict(predictor, [image, image])
    assert first == dict(image=image, error="the model's output is not finite (NaN or infinite)")
    assert second["predictions"][0]["class_id"] == 0
