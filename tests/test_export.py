"""export.py: the Paddle inference model and the ONNX model give the eager logits (1e-4), at
a fixed size and, with --dynamic-size, at several sizes; predict.py runs the export."""
import json
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest
from PIL import Image

import export
import predict
from conftest import REPO_ROOT, photo_like_array
from cyclemlp import create_model

ENV = dict(os.environ, OMP_NUM_THREADS="1")
FIXED_SIZE = 64
DYNAMIC_SIZES = ((48, 64), (96, 80))


def run_export(weights, output, *args):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "export.py"), "--weights", weights,
                             "--output", str(output), *args],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def export_in_process(weights, output, *args):
    export.main(export.get_args_parser().parse_args(["--weights", weights, "--output", str(output), *args]))


def eager_logits(model, images):
    with paddle.no_grad():
        return model(paddle.to_tensor(images)).numpy()


def paddle_inference_logits(directory, images, onednn=None):
    """Logits from Paddle Inference's predictor, set up as deployments do: the default CPU
    Config (oneDNN on), or with oneDNN explicitly on (True) or off (False)."""
    model_file = export.exported_model_file(str(directory))
    config = paddle.inference.Config(model_file, os.path.join(str(directory), "model.pdiparams"))
    config.disable_gpu()
    config.disable_glog_info()
    if onednn is True:
        config.enable_mkldnn()
    elif onednn is False:
        config.disable_mkldnn()
    predictor = paddle.inference.create_predictor(config)
    predictor.get_input_handle(predictor.get_input_names()[0]).copy_from_cpu(images)
    predictor.run()
    return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()


def assert_close_to(expected, actual):
    """Within 1e-4 of the eager logits, relative to the largest logit."""
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= 1e-4 * scale, np.abs(actual - expected).max() / scale


def onnx_logits(path, images):
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {export.INPUT_NAME: images})[0]


@pytest.mark.parametrize("dynamic", [False, True], ids=["fixed", "dynamic"])
def test_paddle_and_onnx_exports_match_eager(tmp_path, make_tiny_weights, dynamic):
    pytest.importorskip("paddle2onnx")
    weights = make_tiny_weights()
    output = tmp_path / "exported"
    flags = ["--dynamic-size"] if dynamic else []
    result = run_export(weights, output, "--input-size", str(FIXED_SIZE), "--onnx", *flags)
    assert "model.onnx" in result.stdout
    model = create_model(weights=weights)
    model.eval()
    exported = paddle.jit.load(str(output / "model"))
    rng = np.random.default_rng(0)
    sizes = DYNAMIC_SIZES if dynamic else ((FIXED_SIZE, FIXED_SIZE),)
    for batch, (height, width) in [(batch, size) for batch in (1, 3) for size in sizes]:
        images = rng.standard_normal((batch, 3, height, width)).astype(np.float32)
        expected = eager_logits(model, images)
        assert_close_to(expected, exported(paddle.to_tensor(images)).numpy())
        for onednn in (None, True, False):
            assert_close_to(expected, paddle_inference_logits(output, images, onednn))
        assert_close_to(expected, onnx_logits(str(output / "model.onnx"), images))

    meta = json.loads((output / "meta.json").read_text())
    assert meta["input_size"] == FIXED_SIZE and meta["dynamic_size"] is dynamic
    assert meta["model_args"]["embed_dims"] == [8, 16, 24, 32] and meta["num_classes"] == 3
    assert meta["crop_pct"] == 0.875 and meta["interpolation"] == "bicubic"
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["std"] == [0.229, 0.224, 0.225]
    assert json.loads((output / "class_names.json").read_text()) == ["cat", "dog", "fox"]


class AddThenScale(paddle.nn.Layer):
    """The pattern Paddle Inference's oneDNN passes compute wrongly: an int64 sum multiplied
    by a constant (operator_scale_onednn_fuse_pass folds the multiplication into the add as an
    output scale, which the int64 kernel ignores). cycle_fc.shifted_positions avoids it."""

    def forward(self, x):
        rows = paddle.arange(4, dtype="int64").reshape([-1, 1]) + paddle.arange(3, dtype="int64")
        return (rows * 10).astype("float32") + x


def test_minimal_reproduction_of_the_onednn_int64_scale_bug(tmp_path):
    """If this fails, Paddle Inference computes the pattern right now: the workaround in
    shifted_positions is no longer needed on this Paddle (keep it for older ones)."""
    layer = AddThenScale()
    paddle.jit.save(layer, str(tmp_path / "model"),
                    input_spec=[paddle.static.InputSpec([4, 3], "float32", "x")])
    x = np.zeros((4, 3), np.float32)
    expected = layer(paddle.to_tensor(x)).numpy()
    np.testing.assert_array_equal(paddle_inference_logits(tmp_path, x, onednn=False), expected)
    assert not np.array_equal(paddle_inference_logits(tmp_path, x), expected)


def test_predict_runs_the_exported_model(tmp_path, make_tiny_weights):
    weights = make_tiny_weights()
    output = tmp_path / "exported"
    export_in_process(weights, output, "--input-size", "48", "--dynamic-size")
    image = str(tmp_path / "photo.png")
    Image.fromarray(photo_like_array(70, 50, 7)).save(image)
    result = subprocess.run([sys.executable, str(REPO_ROOT / "predict.py"), image, "--inference-model",
                             str(output), "--topk", "3", "--json"],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    from_export = json.loads(result.stdout)["predictions"]
    # meta.json's input size 48 is the default; the eager predictor is told the same.
    eager = predict.Predictor(lambda batch: eager_logits(create_model(weights=weights), batch),
                              ["cat", "dog", "fox"], 48, 0.875, "bicubic")
    [expected] = predict.predict(eager, [image], topk=3)
    assert [p["class_id"] for p in from_export] == [p["class_id"] for p in expected["predictions"]]
    assert [p["label"] for p in from_export] == [p["label"] for p in expected["predictions"]]
    np.testing.assert_allclose([p["probability"] for p in from_export],
                               [p["probability"] for p in expected["predictions"]], atol=1e-5)


def test_fixed_size_export_refuses_another_size(tmp_path, make_tiny_weights):
    output = tmp_path / "exported"
    export_in_process(make_tiny_weights(), output, "--input-size", "32")
    args = predict.get_args_parser().parse_args(["x.png", "--inference-model", str(output),
                                                 "--input-size", "64"])
    with pytest.raises(predict.WeightsError, match="exported for 32x32 inputs, not 64"):
        predict.exported_predictor(args)


def test_onnx_without_paddle2onnx_is_a_clear_error(tmp_path, make_tiny_weights, monkeypatch):
    monkeypatch.setitem(sys.modules, "paddle2onnx", None)   # makes `import paddle2onnx` fail
    args = export.get_args_parser().parse_args(["--weights", make_tiny_weights(), "--output",
                                                str(tmp_path / "out"), "--onnx"])
    with pytest.raises(export.ExportError, match="pip install paddle2onnx"):
        export.main(args)
    assert not (tmp_path / "out").exists()
