"""evaluate.py end to end on tiny real image folders: numbers recomputed image by image,
the distributed launcher, checkpoints with EMA weights, and one-line user errors."""
import argparse
import json
import os
import re
import subprocess
import sys

import numpy as np
import paddle
import pytest
from PIL import Image

import evaluate
from conftest import REPO_ROOT, tiny_state
from zoo import create_model
from data import eval_transform, load_image, normalize, scan_image_folder
from data import DatasetError
from weights import WeightsError, atomic_save

INPUT_SIZE = 32
CLASSES = ("cat", "dog", "fox")
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run_evaluate(*args, cwd=None, launcher=False):
    prefix = [sys.executable]
    if launcher:
        prefix += ["-m", "paddle.distributed.launch", "--nproc_per_node", "2"]
    command = prefix + [str(REPO_ROOT / "evaluate.py"), "--input-size", str(INPUT_SIZE),
                        "--num-workers", "0", "--batch-size", "2", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=ENV, timeout=300)


def evaluate_in_process(weights, data_path, *flags, ema=False):
    args = evaluate.get_args_parser().parse_args(
        ["--weights", weights, "--data-path", data_path, "--input-size", str(INPUT_SIZE),
         "--num-workers", "0", "--batch-size", "2", "--print-freq", "100", *flags] + (["--ema"] if ema else []))
    return evaluate.main(args)


def independent_metrics(weights, data_path):
    """Top-1, top-3 (all of 3 classes) and mean cross-entropy, one image at a time."""
    model = create_model(weights=weights)
    model.eval()
    transform = eval_transform(INPUT_SIZE)
    samples, _ = scan_image_folder(os.path.join(data_path, "val"))
    correct, losses = 0, []
    with paddle.no_grad():
        for path, label in samples:
            logits = model(paddle.to_tensor(normalize(transform(load_image(path)))[None])).numpy()[0]
            correct += int(np.argmax(logits) == label)
            log_probs = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
            losses.append(-log_probs[label])
    return 100.0 * correct / len(samples), float(np.mean(losses)), len(samples)


@pytest.fixture
def val_folder(make_image_folder):
    return make_image_folder(classes=CLASSES, train_per_class=1, val_per_class=3)


def test_cli_numbers_match_per_image_recomputation(val_folder, make_tiny_weights, capsys):
    weights = make_tiny_weights()
    acc1, loss, images = independent_metrics(weights, val_folder)
    assert 0 < acc1 < 100, "a tiny random model should get some but not all images right"

    result = run_evaluate("--weights", weights, "--data-path", val_folder, "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)  # --json: stdout is exactly one JSON object
    assert stats["images"] == images == 9
    assert stats["acc1"] == pytest.approx(acc1, abs=1e-9)
    assert stats["acc5"] == 100.0  # top-min(5, 3) of 3 classes
    assert stats["loss"] == pytest.approx(loss, rel=1e-5)
    assert re.search(r"Test: \[5/5\] eta \d+:\d\d:\d\d acc1", result.stderr)

    evaluate_in_process(weights, val_folder)
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"* Acc@1 {acc1:.3f} Acc@5 100.000 loss {loss:.3f}")


def test_distributed_launcher_counts_every_image_once(tmp_path, val_folder, make_tiny_weights):
    weights = make_tiny_weights()
    single = evaluate_in_process(weights, val_folder)
    result = run_evaluate("--weights", weights, "--data-path", val_folder, "--json",
                          cwd=tmp_path, launcher=True)
    rank0 = (tmp_path / "log" / "workerlog.0").read_text()
    rank1 = (tmp_path / "log" / "workerlog.1").read_text()
    assert result.returncode == 0, result.stdout + result.stderr + rank0 + rank1
    json_lines = [line for line in rank0.splitlines() if line.startswith("{")]
    assert len(json_lines) == 1
    stats = json.loads(json_lines[0])
    assert stats["images"] == single["images"] == 9
    assert stats["acc1"] == pytest.approx(single["acc1"], abs=1e-9)
    assert stats["acc5"] == pytest.approx(single["acc5"], abs=1e-9)
    assert stats["loss"] == pytest.approx(single["loss"], rel=1e-6)
    assert "* Acc@1" in rank0 and "* Acc@1" not in rank1 and "{" not in rank1


def test_training_checkpoint_model_and_ema(tmp_path, val_folder, make_tiny_weights):
    model_weights = make_tiny_weights("model.pdparams", seed=1)
    ema_weights = make_tiny_weights("ema.pdparams", seed=2)
    checkpoint = str(tmp_path / "checkpoint.pdckpt")
    atomic_save({"model": tiny_state(1), "model_ema": tiny_state(2), "epoch": 3,
                 "optimizer": {"lr": np.float32(0.1)}, "class_names": list(CLASSES)}, checkpoint)
    plain, ema = evaluate_in_process(checkpoint, val_folder), evaluate_in_process(checkpoint, val_folder, ema=True)
    assert plain == evaluate_in_process(model_weights, val_folder)
    assert ema == evaluate_in_process(ema_weights, val_folder)
    assert plain != ema


@pytest.mark.parametrize("problem", ["missing weights", "not weights", "missing folder", "bad data_config",
                                     "class count"])
def test_user_errors_name_the_file(tmp_path, val_folder, make_tiny_weights, make_image_folder, problem):
    weights, data_path = make_tiny_weights(), val_folder
    if problem == "class count":
        data_path = make_image_folder(classes=("cat", "dog"), train_per_class=1, val_per_class=1, root=tmp_path / "two")
        expected = f"the validation set has 2 classes but the weights {weights} have 3"
    elif problem == "missing weights":
        weights, expected = str(tmp_path / "nope.pdparams"), "nope.pdparams: no such file"
    elif problem == "not weights":
        weights = str(tmp_path / "notes.pdparams")
        open(weights, "w").write("hello")
        expected = "notes.pdparams: not a weights file"
    elif problem == "missing folder":
        data_path, expected = str(tmp_path / "nowhere"), "nowhere/val does not exist"
    else:
        weights = make_tiny_weights("odd.pdparams", data_config={"input_size": 0})
        expected = "odd.pdparams: data_config 'input_size' is 0, expected an integer in"
    with pytest.raises((WeightsError, DatasetError)) as error:
        evaluate_in_process(weights, data_path, "--input-size", "32") if problem != "bad data_config" \
            else evaluate.main(evaluate.get_args_parser().parse_args(["--weights", weights, "--data-path", data_path]))
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_unreadable_image_read_by_a_worker_process_is_one_line(val_folder, make_tiny_weights):
    bad = os.path.join(val_folder, "val", "dog", "broken.png")
    open(bad, "w").write("not a png")
    result = run_evaluate("--weights", make_tiny_weights(), "--data-path", val_folder, "--num-workers", "1")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [f"error: cannot read image {bad}: cannot identify "
                                                  f"image file '{bad}'"]


def test_loop_on_fewer_than_five_classes_evaluates_in_eval_mode(val_folder, make_tiny_weights):
    from data import build_dataset, build_loader
    model = create_model(weights=make_tiny_weights())
    model.train()
    args = argparse.Namespace(data_path=val_folder, val_list=None, train_list=None)
    loader = build_loader(build_dataset(False, args, eval_transform(INPUT_SIZE)), is_train=False, batch_size=4)
    lines = []
    stats = evaluate.evaluate(model, loader, print_freq=1, log=lines.append)
    assert not model.training                  # drop path off; train_one_epoch switches back
    assert stats["images"] == 9 and stats["acc5"] == 100.0
    assert len(lines) == 4 and lines[-1].startswith("* Acc@1")


def test_logits_that_are_not_finite_are_an_error_not_a_metric(tmp_path, val_folder):
    """Finite weights whose logits overflow: no accuracy (the argmax of NaN logits would be class 0)."""
    state = tiny_state(0)
    state["head.weight"] = np.full_like(state["head.weight"], 3e38)
    weights = str(tmp_path / "overflow.pdparams")
    atomic_save({"model": state, "class_names": list(CLASSES)}, weights)
    with pytest.raises(FloatingPointError, match=r"logits are not finite \(NaN or infinite\) for 9 of 9 images: "
                                                 "no accuracy is reported"):
        evaluate_in_process(weights, val_folder)


def test_an_image_too_elongated_to_resize_is_found_before_evaluating(val_folder, make_tiny_weights, monkeypatch):
    line = os.path.join(val_folder, "val", "cat", "line.png")
    Image.new("RGB", (1, 100_000)).save(line)
    evaluated = []
    monkeypatch.setattr(evaluate, "evaluate", lambda *args, **kwargs: evaluated.append(1))
    with pytest.raises(DatasetError, match=re.escape(f"cannot read image {line}: a 1x100000 image resizes to "
                                                     "36x3600000, over Pillow's MAX_IMAGE_PIXELS")):
        evaluate_in_process(make_tiny_weights(), val_folder)
    assert evaluated == []
