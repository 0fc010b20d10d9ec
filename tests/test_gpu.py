"""The GPU user's path, run wherever Paddle has CUDA and a GPU is visible; skipped elsewhere.

None of these tests has run where this repo is developed (CPU machines; see the README's
"What never ran here"). A GPU owner runs them with:

    python -m pytest -q tests/test_gpu.py

Each runs the real commands in fresh processes. NVIDIA_TF32_OVERRIDE=0 turns TF32 off in cuBLAS
and cuDNN, which Paddle otherwise uses for float32 matmuls and convolutions on Ampere and newer,
so that float32 results are comparable with the CPU's.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

from conftest import TINY_CONFIG, write_image_folder

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / 'fixtures'
GPUS = paddle.device.cuda.device_count() if paddle.device.is_compiled_with_cuda() else 0
pytestmark = pytest.mark.skipif(
    GPUS == 0, reason=f'needs Paddle with CUDA and a visible GPU (Paddle {paddle.__version__} here: '
                      f'{"no GPU visible" if paddle.device.is_compiled_with_cuda() else "built without CUDA"})')
ENV = {**os.environ, 'NVIDIA_TF32_OVERRIDE': '0', 'PYTHONPATH': str(REPO)}
TINY = ['--layers', *map(str, TINY_CONFIG['layers']), '--embed-dims', *map(str, TINY_CONFIG['embed_dims']),
        '--mlp-ratios', *map(str, TINY_CONFIG['mlp_ratios']), '--input-size', '32', '--batch-size', '8',
        '--num-workers', '2', '--print-freq', '1']


def run(*command, env=ENV, timeout=600):
    result = subprocess.run([sys.executable, *map(str, command)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def read_log(folder: Path) -> list:
    return [json.loads(line) for line in (folder / 'log.txt').read_text().splitlines()]


OFFICIAL_LOGITS = '''
import sys, numpy as np, paddle
from cyclemlp import CycleNet
from weights import read_weights, torch_to_paddle
paddle.set_device(sys.argv[1])
official = np.load(sys.argv[2] + '/official_tiny_io.npz')
state, _, _ = read_weights(sys.argv[2] + '/official_tiny.pth')
model = CycleNet(layers=[1, 1, 2, 1], embed_dims=[8, 16, 24, 32], mlp_ratios=[2, 2, 2, 2], num_classes=10)
model.set_state_dict({k: paddle.to_tensor(v) for k, v in torch_to_paddle(state).items()})
model.eval()
with paddle.no_grad():
    logits = model(paddle.to_tensor(official['input'].astype(np.float32))).numpy()
print(float(np.abs(logits - official['logits']).max()))
'''


def test_gpu_logits_equal_the_official_ones_as_the_cpus_do():
    for device in ('cpu', 'gpu'):
        error = float(run('-c', OFFICIAL_LOGITS, device, FIXTURES).strip().splitlines()[-1])
        assert error < 1e-4, device


@pytest.mark.parametrize('amp', ['float16', 'bfloat16'])
def test_mixed_precision_trains_and_resumes(tmp_path, amp):
    """AMP on the GPU: finite, falling loss; float16's loss scaler is saved and resumed."""
    data = write_image_folder(tmp_path / 'data', train_per_class=16, val_per_class=2)
    flags = ['train.py', '--data-path', data, '--amp-dtype', amp, '--lr', '0.05', '--warmup-epochs', '0',
             '--mixup', '0', '--cutmix', '0', '--output-dir', tmp_path / 'out', *TINY]
    stdout = run(*flags, '--epochs', '2')
    assert f'AMP {amp}' in stdout
    run(*flags, '--epochs', '4', '--resume', 'auto')
    losses = [entry['train_loss'] for entry in read_log(tmp_path / 'out')]
    assert len(losses) == 4 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    from weights import read_checkpoint
    scaler = read_checkpoint(tmp_path / 'out' / 'checkpoint.pdckpt')['scaler']
    assert (scaler is not None) == (amp == 'float16')


def test_the_demo_on_one_gpu(tmp_path):
    stdout = run('train.py', '--demo', '--epochs', '2', '--output-dir', tmp_path / 'demo')
    assert 'best acc1' in stdout and len(read_log(tmp_path / 'demo')) == 2


@pytest.mark.skipif(GPUS < 2, reason='needs two GPUs')
def test_the_demo_under_the_launcher_on_two_gpus(tmp_path):
    run('-m', 'paddle.distributed.launch', '--devices', '0,1', '--log_dir', tmp_path / 'log', 'train.py',
        '--demo', '--epochs', '2', '--output-dir', tmp_path / 'demo')
    assert len(read_log(tmp_path / 'demo')) == 2


def test_export_and_predict_on_the_gpu(tmp_path):
    data = write_image_folder(tmp_path / 'data', train_per_class=8, val_per_class=1)
    run('train.py', '--data-path', data, '--epochs', '1', '--output-dir', tmp_path / 'out', *TINY)
    weights = tmp_path / 'out' / 'best.pdparams'
    run('export.py', '--weights', weights, '--output', tmp_path / 'exported')   # checked on the CPU
    image = next((Path(data) / 'val').rglob('*.png'))
    eager = json.loads(run('predict.py', image, '--weights', weights, '--device', 'gpu', '--json'))
    deployed = json.loads(run('predict.py', image, '--inference-model', tmp_path / 'exported', '--json'))
    assert [p['class_id'] for p in eager['predictions']] == [p['class_id'] for p in deployed['predictions']]


def test_benchmark_on_the_gpu_against_deform_conv2d():
    report = json.loads(run('benchmark.py', '--batch-size', '8', '--impls', 'index,deform', '--skip-deploy',
                            '--json').strip().splitlines()[-1])
    assert 'gpu' in report['device']
