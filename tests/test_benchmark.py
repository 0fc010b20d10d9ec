"""benchmark.py: its --json output is valid JSON (a ratio it cannot compute is null, never NaN),
and the deployed rows are the runtimes as predict.py ships them, each naming its device.
Speed itself is never asserted: it is what the script measures."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import benchmark
import export
from conftest import REPO_ROOT

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run_json(*flags):
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "benchmark.py"), "--json", "--impls", "index",
                             "--batch-size", "1", "--input-size", "32", "--warmup", "0", "--repeats", "1",
                             "--skip-layer", "--skip-memory", *flags],
                            capture_output=True, text=True, env=ENV, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))


def test_ratios_that_cannot_be_computed_are_null_in_valid_json():
    report = run_json("--skip-deploy")
    assert report["ratios"] and all(value is None for value in report["ratios"].values())   # no 'deform' run
    assert [row["impl"] for row in report["results"]] == ["index"]
    assert report["deployed"] == [] and report["deployed_ratios"] == {}


def test_ratio_is_null_where_not_finite():
    assert benchmark.ratio({"a": 2.0, "b": 4.0}, "a", "b") == 0.5
    assert benchmark.ratio({"a": 2.0}, "a", "b") is None
    assert benchmark.ratio({"a": 2.0, "b": 0.0}, "a", "b") is None
    assert benchmark.ratio({"a": np.inf, "b": 1.0}, "a", "b") is None


def test_deployed_rows_are_the_runtimes_as_shipped():
    pytest.importorskip("paddle2onnx")
    report = run_json()
    rows = {(row["runtime"], row["batch"]): row for row in report["deployed"]}
    runtimes = ["eager", "paddle-inference", "onnxruntime"]
    assert sorted(rows) == sorted((name, batch) for name in runtimes for batch in benchmark.DEPLOY_BATCHES)
    assert rows["paddle-inference", 1]["settings"] == dict(device="cpu", threads=1, **export.PADDLE_INFERENCE_SETTINGS)
    assert rows["onnxruntime", 1]["settings"] == dict(device="cpu", threads=1, **export.ONNXRUNTIME_SETTINGS)
    assert all(row["img_s"] > 0 for row in rows.values())
    for (name, batch), row in rows.items():
        if name != "eager":
            assert report["deployed_ratios"][f"batch{batch}_{name}/eager"] == pytest.approx(
                row["img_s"] / rows["eager", batch]["img_s"])
