"""export.py: the Paddle inference model in Paddle Inference's predictor (default Config, oneDNN
on and off, predict.py's Config) and the ONNX model in ONNX Runtime give the eager logits, at a
fixed size and, with --dynamic-size, at several; exports are gather-free and hold the fused mixer
where it was chosen; the runtimes run the bytes that were checked; the ONNX file is clean; predict.py runs exports in both runtimes, its output
untouched by the runtimes' own printing; a failed export writes nothing."""
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import paddle
import pytest
from PIL import Image

import export
import fast_layers
import predict
from conftest import REPO_ROOT, photo_like_array
from zoo import create_model
from weights import WeightsError

ENV = dict(os.environ, OMP_NUM_THREADS="1")
FIXED_SIZE = 64
DYNAMIC_SIZES = ((64, 64), (48, 64), (96, 80))


# paddle2onnx 1.x (with Paddle 2.x) cannot convert a dynamic-size export: export.py refuses it.


def export_in_process(weights, output, *args):
    export.main(export.get_args_parser().parse_args(["--weights", weights, "--output", str(output), *args]))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The tiny model's weights and its exports at a fixed size and with --dynamic-size, both
    with ONNX: {'weights', 'fixed', 'dynamic'}."""
    pytest.importorskip("paddle2onnx")
    from conftest import tiny_state
    from weights import write_weights
    root = tmp_path_factory.mktemp("exports")
    weights = str(root / "tiny.pdparams")
    write_weights(weights, tiny_state(0), {"class_names": ["cat", "dog", "fox"]})
    for name, flags in (("fixed", ["--onnx"]), ("dynamic", ["--dynamic-size", "--onnx"])):
        export_in_process(weights, root / name, "--input-size", str(FIXED_SIZE), *flags)
    return dict(weights=weights, fixed=root / "fixed", dynamic=root / "dynamic")


def eager_logits(model, images):
    with paddle.no_grad():
        return model(paddle.to_tensor(images)).numpy()


def paddle_inference(directory, onednn=None):
    """Paddle Inference's predictor, set up as deployments do: the default CPU Config (oneDNN
    on), or with oneDNN explicitly on (True) or off (False); returns run(images) -> logits."""
    model_file = next(os.path.join(str(directory), name) for name in export.MODEL_FILES
                      if os.path.isfile(os.path.join(str(directory), name)))
    config = paddle.inference.Config(model_file, os.path.join(str(directory), "model.pdiparams"))
    config.disable_gpu()
    config.disable_glog_info()
    if onednn is True:
        config.enable_mkldnn()
    elif onednn is False:
        config.disable_mkldnn()
    predictor = paddle.inference.create_predictor(config)

    def run(images):
        predictor.get_input_handle(predictor.get_input_names()[0]).copy_from_cpu(images)
        predictor.run()
        return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()
    return run


def paddle_inference_logits(directory, images, onednn=None):
    return paddle_inference(directory, onednn)(images)


def assert_close_to(expected, actual):
    """Within 1e-4 of the eager logits, relative to the largest logit."""
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= 1e-4 * scale, np.abs(actual - expected).max() / scale


@pytest.mark.parametrize("dynamic", [False, True], ids=["fixed", "dynamic"])
def test_exports_give_the_eager_logits_in_every_runtime(exports, dynamic):
    output = exports["dynamic" if dynamic else "fixed"]
    model = create_model(weights=exports["weights"])
    model.eval()
    exported = paddle.jit.load(str(output / "model"))
    predictors = [paddle_inference(output, onednn) for onednn in (None, True, False)] + [export.paddle_runner(output)]
    predictors.append(lambda images: pytest.importorskip("onnxruntime").InferenceSession(
        str(output / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {export.INPUT_NAME: images})[0])
    rng = np.random.default_rng(0)
    for batch, (height, width) in [(batch, size) for batch in (1, 3)
                                   for size in (DYNAMIC_SIZES if dynamic else DYNAMIC_SIZES[:1])]:
        images = rng.standard_normal((batch, 3, height, width)).astype(np.float32)
        expected = eager_logits(model, images)
        assert_close_to(expected, exported(paddle.to_tensor(images)).numpy())
        for run in predictors:
            assert_close_to(expected, run(images))

    meta = json.loads((output / "meta.json").read_text())
    assert meta["input_size"] == FIXED_SIZE and meta["dynamic_size"] is dynamic
    assert meta["model_args"]["embed_dims"] == [8, 16, 24, 32] and meta["num_classes"] == 3
    assert meta["crop_pct"] == 0.875 and meta["interpolation"] == "bicubic"
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["std"] == [0.229, 0.224, 0.225]
    assert meta["class_names"] == ["cat", "dog", "fox"]
    checked = {"paddle_inference_default_config", "paddle_inference", "onnxruntime"}
    assert set(meta["parity"]["max_difference"]) == set(meta["parity"]["runtime_settings"]) == checked
    settings = meta["parity"]["runtime_settings"]
    assert {value["device"] for value in settings.values()} == {"cpu"}     # where no TF32 differs
    threads = settings["paddle_inference"]["threads"]                     # the exporting process's
    assert settings["paddle_inference"] == dict(device="cpu", threads=threads, **export.PADDLE_INFERENCE_SETTINGS)
    assert settings["paddle_inference_default_config"] == dict(device="cpu", threads=threads, config="default")
    assert settings["onnxruntime"] == dict(device="cpu", threads=threads, **export.ONNXRUNTIME_SETTINGS)
    assert len(meta["parity"]["sizes"]) == (2 if dynamic else 1)
    assert sorted(os.listdir(output.parent)) == ["dynamic", "fixed", "tiny.pdparams"]   # no temporary left


def onnx_op_count(directory, op_type):
    import onnx
    return sum(node.op_type == op_type for node in onnx.load(str(directory / "model.onnx")).graph.node)


def test_exports_are_gather_free_with_the_fused_mixer_where_proj_folds_in(exports, tmp_path, monkeypatch):
    """The channels are traced in shift order: no Gather in any export. The tiny model at 64x64
    has one block at 16x16 (C 8) and one at 8x8 (C 16), where H*W >= 3C: those two are traced
    as the fused mixer; two blocks at 4x4 (C 24) and one at 2x2 (C 32) as the official mixer;
    with --dynamic-size every mixer is official."""
    for name in ("fixed", "dynamic"):
        assert onnx_op_count(exports[name], "Gather") == 0
    fused = []
    traced = fast_layers.fused_mixer

    def recorded(mixer, x):
        fused.append(list(x.shape[1:]))
        return traced(mixer, x)
    monkeypatch.setattr(fast_layers, "fused_mixer", recorded)
    for size in (FIXED_SIZE, None):
        export.export_paddle(create_model(weights=exports["weights"]), str(tmp_path), size)
    assert fused == [[16, 16, 8], [8, 8, 16]]


def test_the_runtimes_run_the_bytes_that_were_checked(exports, tmp_path, monkeypatch):
    """Each file swapped for junk right after it was checked changes nothing: the runtimes load
    the checked bytes, not the path again; Paddle's private copy is gone once it is loaded."""
    folder = tmp_path / "fixed"
    shutil.copytree(exports["fixed"], folder)
    checked = export.checked_bytes

    def swapped_after_the_check(directory, meta, name):
        data = checked(directory, meta, name)
        (folder / name).write_bytes(b"swapped after the check")
        return data
    monkeypatch.setattr(export, "checked_bytes", swapped_after_the_check)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "private"))
    os.mkdir(tmp_path / "private")
    model = create_model(weights=exports["weights"])
    model.eval()
    images = np.random.default_rng(2).standard_normal((2, 3, FIXED_SIZE, FIXED_SIZE)).astype(np.float32)
    for runtime in ("paddle", "onnx"):
        assert_close_to(eager_logits(model, images), export.load_runner(str(folder), runtime)(images))
    assert os.listdir(tmp_path / "private") == []


def test_tracing_for_export_leaves_eager_computation_alone(exports):
    model = create_model(weights=exports["weights"])
    model.eval()
    images = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    expected = eager_logits(model, images)
    with fast_layers.fused_mixer_traced():
        assert not fast_layers.traces_fused_mixer(paddle.zeros([1, 4, 4, 8]))
        np.testing.assert_array_equal(eager_logits(model, images), expected)
    assert not fast_layers._TRACING_FUSED_MIXER


class AddThenScale(paddle.nn.Layer):
    """The pattern Paddle Inference's oneDNN passes compute wrongly: an int64 sum multiplied
    by a constant (operator_scale_onednn_fuse_pass folds the multiplication into the add as an
    output scale, which the int64 kernel ignores). cycle_fc.shifted_positions avoids it."""

    def forward(self, x):
        rows = paddle.arange(4, dtype="int64").reshape([-1, 1]) + paddle.arange(3, dtype="int64")
        return (rows * 10).astype("float32") + x


@pytest.mark.skipif(paddle.__version__.startswith("2."),
                    reason="a Paddle 3 bug; Paddle 2.6's Inference cannot load this parameterless reproduction")
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


def test_onnx_model_loads_without_warnings(exports, capfd):
    """paddle2onnx leaves constants nothing uses; ONNX Runtime warns about each one it removes."""
    onnxruntime = pytest.importorskip("onnxruntime")
    capfd.readouterr()
    for name in ("fixed", "dynamic"):
        onnxruntime.InferenceSession(str(exports[name] / "model.onnx"), providers=["CPUExecutionProvider"])
    assert capfd.readouterr().err == ""


def test_predict_runs_the_export_in_both_runtimes(exports, tmp_path, capsys):
    image = str(tmp_path / "photo.png")
    Image.fromarray(photo_like_array(70, 50, 7)).save(image)
    # meta.json's input size is the default; the eager predictor is told the same.
    eager = predict.Predictor(lambda batch: eager_logits(create_model(weights=exports["weights"]), batch),
                              ["cat", "dog", "fox"], FIXED_SIZE, 0.875, "bicubic")
    [expected] = predict.predict(eager, [image], topk=3)
    results = []           # (the command lines of both runtimes run in tests/test_readme.py)
    for export_name, runtime in (("dynamic", "onnx"), ("fixed", "paddle")):
        assert predict.main(predict.get_args_parser().parse_args(
            [image, "--inference-model", str(exports[export_name]), "--runtime", runtime, "--topk", "3", "--json"])) == 0
        results.append(json.loads(capsys.readouterr().out))
    for result in results:
        got = result["predictions"]
        assert [p["class_id"] for p in got] == [p["class_id"] for p in expected["predictions"]]
        assert [p["label"] for p in got] == [p["label"] for p in expected["predictions"]]
        np.testing.assert_allclose([p["probability"] for p in got],
                                   [p["probability"] for p in expected["predictions"]], atol=1e-5)


def test_predict_json_lines_are_all_json_with_onednn_on(exports, tmp_path):
    """Paddle Inference's oneDNN passes print on stdout from C++ (ReduceMeanCheckIfOneDNNSupport):
    predict.py's output must stay its own."""
    image = str(tmp_path / "photo.png")
    Image.fromarray(photo_like_array(70, 50, 7)).save(image)
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "predict.py"), image, image, "--json",
                             "--inference-model", str(exports["fixed"])], capture_output=True, text=True,
                            env=ENV, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(json.loads(line)["image"] == image for line in lines)


def test_fixed_size_export_refuses_another_size(exports):
    args = predict.get_args_parser().parse_args(["x.png", "--inference-model", str(exports["fixed"]),
                                                 "--input-size", "48"])
    with pytest.raises(WeightsError, match=f"exported for {FIXED_SIZE}x{FIXED_SIZE} inputs, not 48"):
        predict.load_predictor(args)


def full_disk(model, folder, input_size):
    """A write that fails partway, as on a full disk."""
    with open(os.path.join(folder, "model.json"), "w") as file:
        file.write('{"truncated')
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


FAILED_EXPORTS = {   # what fails: (the function replaced, its replacement, the error it must give)
    "wrong logits": ("paddle_runner", lambda directory, **settings: lambda batch: np.zeros((len(batch), 3), np.float32),
                     "Paddle Inference .* away from the eager model"),
    "full disk": ("export_paddle", full_disk, "No space left on device"),
}


@pytest.mark.parametrize("case", FAILED_EXPORTS)
def test_a_failed_export_writes_nothing_and_keeps_the_earlier_one(exports, tmp_path, make_tiny_weights,
                                                                  monkeypatch, case):
    """The export is built in a temporary folder inside --output: whatever fails, the earlier export
    stays, a new --output is not left behind, nor is the temporary folder."""
    weights = make_tiny_weights()
    output = tmp_path / "exported"
    shutil.copytree(exports["fixed"], output)
    before = {name: (output / name).read_bytes() for name in os.listdir(output)}
    name, replacement, message = FAILED_EXPORTS[case]
    monkeypatch.setattr(export, name, replacement)
    for folder in (output, tmp_path / "new"):
        with pytest.raises((WeightsError, OSError), match=message):
            export_in_process(weights, folder, "--input-size", "48")
    assert {name: (output / name).read_bytes() for name in os.listdir(output)} == before
    assert sorted(os.listdir(tmp_path)) == ["exported", "tiny.pdparams"]


def test_export_writes_beside_other_files(tmp_path, make_tiny_weights):
    """The user's files in --output stay, through a first export and a re-export."""
    output = tmp_path / "results"
    output.mkdir()
    (output / "notes.txt").write_text("keep me")
    weights = output / "my.pdparams"
    shutil.copy(make_tiny_weights(), weights)
    for _ in range(2):
        export_in_process(str(weights), output, "--input-size", "32")
        assert {"notes.txt", "my.pdparams", "meta.json", "model.pdiparams"} <= set(os.listdir(output))
    assert (output / "notes.txt").read_text() == "keep me"


def users_model_beside_an_export(folder, exports):
    shutil.copytree(exports["fixed"], folder, dirs_exist_ok=True)
    meta = json.loads((folder / "meta.json").read_text())
    edit_meta(folder, files={name: sha for name, sha in meta["files"].items() if name != "model.onnx"})
    (folder / "model.onnx").write_bytes(b"the user's own model")


FOREIGN_FILES = {   # an --output holding files named like an export's that export.py did not write
    "the user's model.onnx beside an export": (users_model_beside_an_export, "model.onnx"),
    "a lone model.pdiparams": (lambda folder, exports: (folder / "model.pdiparams").write_bytes(b"someone else's"),
                               "model.pdiparams"),
    "a meta.json that lists it but is not export.py's": (lambda folder, exports: [
        (folder / "model.pdiparams").write_bytes(b"the user's own file"),
        (folder / "meta.json").write_text(json.dumps({"files": {"model.pdiparams": "0" * 64}}))],
        "model.pdiparams, meta.json"),
}


@pytest.mark.parametrize("case", FOREIGN_FILES)
def test_files_export_py_did_not_write_are_refused_not_replaced(exports, tmp_path, case):
    """An earlier export is recognised by its whole meta.json (read_meta), not by a 'files' list."""
    folder = tmp_path / "output"
    folder.mkdir()
    make, names = FOREIGN_FILES[case]
    make(folder, exports)
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    with pytest.raises(WeightsError, match=f"holds {names}, which export.py did not write"):
        export_in_process(exports["weights"], folder, "--input-size", str(FIXED_SIZE))
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before


def test_onnx_without_paddle2onnx_is_a_clear_error(tmp_path, make_tiny_weights, monkeypatch):
    monkeypatch.setitem(sys.modules, "paddle2onnx", None)   # makes `import paddle2onnx` fail
    with pytest.raises(WeightsError, match="pip install paddle2onnx"):
        export_in_process(make_tiny_weights(), tmp_path / "out", "--onnx")
    assert not (tmp_path / "out").exists()


def edit_meta(folder, **changes):
    meta = json.loads((folder / "meta.json").read_text())
    meta.update(changes)
    (folder / "meta.json").write_text(json.dumps(meta))


def replace_with(folder, name, make):
    (folder / name).unlink()
    make(folder / name)


HOSTILE_EXPORTS = {   # what is done to a copy of the fixed export: the error it must give
    "interpolation []": (lambda folder, exports: edit_meta(folder, interpolation=[]),
                         "data_config 'interpolation' is a list, expected one of bicubic"),
    "class names too few": (lambda folder, exports: edit_meta(folder, class_names=["cat"]),
                            "class_names is a list, not what export.py writes"),
    "1000 classes, no names": (lambda folder, exports: edit_meta(folder, num_classes=1000, class_names=None),
                               r"gives \[3\] outputs per image, meta.json records 1000 classes"),
    "another input size": (lambda folder, exports: edit_meta(folder, input_size=48),
                           "does not run in Paddle Inference on the 48x48 images meta.json records"),
    "another export's model": (lambda folder, exports: [shutil.copy(exports["dynamic"] / name, folder)
                                                        for name in export.MODEL_FILES if (folder / name).exists()],
                               "not the file meta.json records"),
    "parameters deleted": (lambda folder, exports: (folder / "model.pdiparams").unlink(),
                           r"model.pdiparams: no such file"),
    "meta.json deleted": (lambda folder, exports: (folder / "meta.json").unlink(),
                          r"meta.json: no such file"),
    "meta.json a FIFO": (lambda folder, exports: replace_with(folder, "meta.json", os.mkfifo), "meta.json: not a regular file"),
    "meta.json to /dev/zero": (lambda folder, exports: replace_with(folder, "meta.json", lambda path: path.symlink_to("/dev/zero")),
                               "meta.json: not a regular file"),
    "meta.json 100k deep": (lambda folder, exports: (folder / "meta.json").write_text("[" * 100_000 + "]" * 100_000),
                            "meta.json: not JSON of sane depth"),
    "meta.json a list": (lambda folder, exports: (folder / "meta.json").write_text("[]"),
                         "meta.json: expected a JSON object, found a list"),
    "meta.json of 20 MiB": (lambda folder, exports: (folder / "meta.json").write_text(" " * (20 << 20)),
                            "meta.json: 20971520 bytes, more than the 16777216 it may hold"),
    "an old export": (lambda folder, exports: edit_meta(folder, files=None), "files is None, not what export.py writes; export again"),
}


@pytest.mark.parametrize("case", HOSTILE_EXPORTS)
def test_a_doctored_export_is_refused_with_one_line(exports, tmp_path, case):
    """An export folder is an untrusted input: meta.json read with bounds and checked, the model
    files tied to it by their sha256, the model run once on the size and classes it records."""
    folder = tmp_path / "fixed"
    shutil.copytree(exports["fixed"], folder)
    change, message = HOSTILE_EXPORTS[case]
    change(folder, exports)
    with pytest.raises(WeightsError, match=message) as error:
        export.load_runner(str(folder), "paddle")
    assert "\n" not in str(error.value)


def test_a_doctored_export_from_the_command_line(exports, tmp_path):
    folder = tmp_path / "fixed"
    shutil.copytree(exports["fixed"], folder)
    (folder / "meta.json").unlink()
    os.mkfifo(folder / "meta.json")
    image = tmp_path / "photo.png"
    Image.fromarray(photo_like_array(40, 30, 1)).save(image)
    result = subprocess.run([sys.executable, str(REPO_ROOT / "predict.py"), str(image), "--inference-model",
                             str(folder), "--runtime", "onnx"], capture_output=True, text=True, env=ENV, timeout=60)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"error: {folder / 'meta.json'}: not a regular file\n"


def test_exports_follow_the_umask_and_keep_the_folders_mode(exports, tmp_path):
    output = tmp_path / "shared"
    output.mkdir(mode=0o755)
    output.chmod(0o755)
    old = os.umask(0o022)
    try:
        export_in_process(exports["weights"], output, "--input-size", "32")
    finally:
        os.umask(old)
    modes = {name: (output / name).stat().st_mode & 0o777 for name in os.listdir(output)}
    assert set(modes.values()) == {0o644} and (output.stat().st_mode & 0o777) == 0o755, modes


def test_what_meta_json_claims_is_checked_before_the_runtime_meets_it(exports, tmp_path):
    """A fixed-size export marked dynamic by hand: the size predict.py will ask for is probed
    when the export is read, one line."""
    folder = tmp_path / "fixed"
    shutil.copytree(exports["fixed"], folder)
    edit_meta(folder, dynamic_size=True)
    with pytest.raises(WeightsError, match="does not run in Paddle Inference on the 48x48 images it is asked for"):
        export.load_runner(str(folder), "paddle", 48)
