"""The README's commands, run as a newcomer runs them: in order, in a fresh copy of the repository,
as real processes. Every command in the README's code blocks is either run here or listed in
NOT_RUN with the reason, so a new command in the README must be placed in one or the other.

The official weights come from a local server in the release layout (CYCLEMLP_MIRROR; the tests
have no internet), a B1-sized file with random weights. The only change to a command: the demo
trains 1 epoch, not 20 (20 reach 97% top-1; one reaches 60% and more)."""
import json
import os
import re
import shutil
import subprocess
import sys

import paddle
import pytest
from PIL import Image

import download
import zoo
from conftest import REPO_ROOT, photo_like_array
from torch_files import paddle_to_torch, write_release

README = (REPO_ROOT / 'README.md').read_text()
# Run in this order; the demo trains 1 epoch (the README's run takes a minute).
RUN = [
    ('python predict.py cat.jpg', ''),
    ('python train.py --demo --output-dir out/demo', ' --epochs 1'),
    ('python evaluate.py --weights out/demo/checkpoint.pdckpt --ema --data-path demo_data', ''),
    ('python predict.py demo_data/val/3/0059.png --weights out/demo/best.pdparams --topk 2', ''),
    ('python convert_weights.py CycleMLP_B1 weights/cyclemlp_b1.pdparams', ''),
    ('python export.py --weights out/demo/best.pdparams --output exported/demo --onnx', ''),
    ('python predict.py demo_data/val/3/0059.png --inference-model exported/demo', ''),
    ('python predict.py demo_data/val/3/0059.png --inference-model exported/demo --runtime onnx', ''),
]
NOT_RUN = {
    'pip install -r requirements.txt': 'CI has installed it',
    'pip install -r requirements-gpu.txt': 'CI builds its second environment from it, with the CPU twin',
    'python -m pytest -q tests': 'this is it',
    'python benchmark.py': 'minutes of timing, not a test',
    'python benchmark.py --dense': 'the same',
    'python export.py --weights CycleMLP_B1 --output exported/b1 --onnx': 'the demo export runs the same code, '
                                                                          'at B1 it takes half a minute',
    'python export.py --weights CycleMLP_B1 --output exported/b1_any --dynamic-size': 'the same',
    'python predict.py cat.jpg --inference-model exported/b1': 'needs the B1 export',
    'python predict.py cat.jpg holiday/ --weights CycleMLP_B2 --topk 3': 'the B2 file is not served here',
}
NEEDS_DATA_OR_GPUS = ('/data/', '--devices', '...', '--nnodes')   # ImageNet, several GPUs or machines


def readme_commands() -> list:
    """Every command line of the README's bash blocks, comments and continuations joined."""
    commands = []
    for block in re.findall(r'```bash\n(.*?)```', README, re.S):
        for line in block.replace('\\\n', ' ').splitlines():
            command = ' '.join(line.split('#')[0].split())
            if command:
                commands.append(command)
    return commands


def test_every_readme_command_is_run_here_or_has_a_reason():
    run = {command for command, _ in RUN}
    for command in readme_commands():
        assert (command in run or command in NOT_RUN
                or any(part in command for part in NEEDS_DATA_OR_GPUS)), f'README command not covered: {command}'
    assert all(command in readme_commands() for command in run | set(NOT_RUN)), 'a command left the README'


@pytest.fixture
def fresh_copy(tmp_path):
    """The repository's files (what git tracks, and new files it does not ignore) in a new folder."""
    listed = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard'], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    files = listed.stdout.splitlines() if listed.returncode == 0 else None
    copy = tmp_path / 'repo'
    if files is None:
        shutil.copytree(REPO_ROOT, copy, ignore=shutil.ignore_patterns('.git', '__pycache__', 'out', 'log'))
    for name in files or []:
        if (REPO_ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, copy / name)
    return copy


def test_the_readme_commands_run_in_order_in_a_fresh_copy(fresh_copy, tmp_path):
    import http.server
    import threading
    mirror = tmp_path / 'mirror'
    mirror.mkdir()
    paddle.seed(0)
    write_release(mirror / 'CycleMLP_B1.pth', paddle_to_torch(zoo.numpy_state(zoo.create_model('CycleMLP_B1'))))
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(mirror))  # noqa: E731
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True).start()
    Image.fromarray(photo_like_array(300, 200, 1)).save(fresh_copy / 'cat.jpg')
    env = {key: value for key, value in os.environ.items() if not key.startswith(('CYCLEMLP_', 'PYTHON'))}
    env.update({download.MIRROR_VARIABLE: f'http://127.0.0.1:{server.server_port}',
                download.CACHE_VARIABLE: str(tmp_path / 'cache')})
    outputs = {}
    try:
        for command, extra in RUN:
            result = subprocess.run([sys.executable] + (command + extra).split()[1:], cwd=fresh_copy, env=env,
                                    capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, f'{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}'
            outputs[command] = result
    finally:
        server.shutdown()
        server.server_close()
    names = (REPO_ROOT / 'imagenet_classes.txt').read_text().splitlines()
    cat = outputs['python predict.py cat.jpg'].stdout.splitlines()
    assert cat[0] == 'cat.jpg' and len(cat) == 6 and all(line.split(maxsplit=2)[2] in names for line in cat[1:])
    [epoch] = [json.loads(line) for line in (fresh_copy / 'out' / 'demo' / 'log.txt').read_text().splitlines()]
    assert epoch['test_acc1'] >= 60.0, epoch      # 10 classes: chance is 10%
    assert outputs[RUN[2][0]].stdout.splitlines()[-1].startswith('* Acc@1 ')
    for command in (RUN[3][0], RUN[6][0], RUN[7][0]):
        assert outputs[command].stdout.splitlines()[0] == 'demo_data/val/3/0059.png'
    assert (fresh_copy / 'weights' / 'cyclemlp_b1.pdparams').is_file()     # its folder was made
    assert sorted(os.listdir(fresh_copy / 'exported' / 'demo')) == sorted([
        'meta.json', 'model.json' if paddle.__version__ >= '3' else 'model.pdmodel', 'model.onnx', 'model.pdiparams'])
