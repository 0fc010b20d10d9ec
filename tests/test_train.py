"""train.py end to end on tiny real image folders, in real processes (CPU).

A four-block CycleNet (--layers 1 1 1 1 --embed-dims 8 16 16 16) on 32x32 crops keeps every
run to seconds; the recipe (RandAugment, erasing, Mixup/CutMix, smoothing, EMA, drop path,
repeated augmentation) stays on everywhere.
"""
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import cpu_setup
import train
from conftest import write_image_folder
from cyclemlp import create_model
from weights import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = str(REPO / 'train.py')
TINY = ['--layers', '1', '1', '1', '1', '--embed-dims', '8', '16', '16', '16',
        '--mlp-ratios', '2', '2', '2', '2', '--input-size', '32', '--batch-size', '4',
        '--num-workers', '0', '--print-freq', '1']
PROGRESS = re.compile(r'^Epoch \[(\d+)/(\d+)\] \[ *(\d+)/(\d+)\] eta \d+:\d\d:\d\d lr (\d+\.\d{6}) '
                      r'loss (\d+\.\d{4}) \((\d+\.\d{4})\) \d+ img/s$', re.MULTILINE)
RUN_ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(REPO)}


def run_train(*flags, cwd=None, check=True, timeout=240) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, TRAIN_SCRIPT, *flags], cwd=cwd, env=RUN_ENV,
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read_log(output_dir) -> list:
    with open(os.path.join(output_dir, 'log.txt')) as log_file:
        return [json.loads(line) for line in log_file]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """One epoch on cat/dog (8 + 8 JPEGs, one of them corrupt; 3 + 3 PNGs for val)."""
    root = tmp_path_factory.mktemp('trained')
    data = write_image_folder(root / 'data', train_per_class=8, val_per_class=3)
    Path(data, 'train', 'dog', 'dog_7.JPEG').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
    output = root / 'out'
    # Without repeated augmentation every training image, the corrupt one too, is read each epoch.
    result = run_train('--data-path', data, '--output-dir', str(output), '--epochs', '1',
                       '--no-repeated-aug', *TINY)
    return dict(data=data, output=output, stdout=result.stdout, stderr=result.stderr)


def test_help_documents_every_flag_with_its_default():
    result = run_train('--help')
    for flag in ('--output-dir', '--output_dir', '--num_workers', '--model-ema-decay', '--no-amp',
                 '--amp-dtype', '--resume', '--finetune', '--eval-interval', '--demo'):
        assert flag in result.stdout
    assert '(default: CycleMLP_B1)' in ' '.join(result.stdout.split())  # argparse wraps lines
    for action in train.get_args_parser()._actions:
        if action.dest != 'help':
            assert re.search(r'\(default: [^()]*(\([^()]*\)[^()]*)*\)$', action.help), action.option_strings


def test_defaults_follow_the_official_main_py():
    args = train.parse_args([])
    assert (args.model, args.epochs, args.batch_size, args.lr, args.warmup_lr, args.warmup_epochs,
            args.min_lr, args.weight_decay, args.opt_eps, args.opt_betas, args.clip_grad,
            args.smoothing, args.drop_path, args.model_ema, args.model_ema_decay, args.repeated_aug,
            args.mixup, args.cutmix, args.mixup_prob, args.mixup_switch_prob, args.aa, args.reprob,
            args.remode, args.recount, args.scale, args.num_workers) == (
        'CycleMLP_B1', 300, 64, 5e-4, 1e-6, 5, 1e-5, 0.05, 1e-8, [0.9, 0.999], None, 0.1, 0.1,
        True, 0.99996, True, 0.8, 1.0, 1.0, 0.5, 'rand-m9-mstd0.5-inc1', 0.25, 'pixel', 1,
        [0.08, 1.0], cpu_setup.default_num_workers())
    aliases = train.parse_args(['--output_dir', 'o', '--num_workers', '3', '--no_amp',
                                '--no-model-ema', '--no-repeated-aug', '--batch_size', '8'])
    assert (aliases.output_dir, aliases.num_workers, aliases.no_amp, aliases.model_ema,
            aliases.repeated_aug, aliases.batch_size) == ('o', 3, True, False, False, 8)


def test_demo_preset_yields_to_explicit_flags():
    args = train.parse_args(['--demo', '--epochs', '3', '--batch-size', '16'])
    assert (args.epochs, args.batch_size) == (3, 16)
    assert args.input_size == train.DEMO_PRESET['input_size']
    assert Path(args.data_path) == REPO / 'demo_data' and (REPO / 'demo_data' / 'train').is_dir()
    assert args.layers == train.DEMO_PRESET['layers']


def timm_cosine(t, base_lr, epochs, warmup_epochs, warmup_lr, min_lr):
    """timm CosineLRScheduler._get_lr(t), defaults of create_scheduler (written out here)."""
    if t < warmup_epochs:
        return warmup_lr + t * (base_lr - warmup_lr) / warmup_epochs
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * t / epochs))


def test_lr_schedule_is_timm_cosine_stepped_after_each_epoch_as_in_main_py():
    base_lr = 5e-4 * 1024 / 512
    kwargs = dict(base_lr=base_lr, epochs=300, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5)
    lrs = [train.scheduled_lr(epoch, **kwargs) for epoch in range(300)]
    # The scheduler starts at warmup_lr and main.py steps it with the finished epoch's index.
    assert lrs[0] == lrs[1] == 1e-6
    assert lrs[2] == pytest.approx(1e-6 + (base_lr - 1e-6) / 5, rel=1e-12)
    assert lrs[5] == pytest.approx(1e-6 + 4 * (base_lr - 1e-6) / 5, rel=1e-12)
    # The cosine counts from epoch 0 (warmup_prefix=False): at t = 5 it has already decayed.
    assert lrs[6] == pytest.approx(1e-5 + 0.5 * (base_lr - 1e-5) * (1 + math.cos(math.pi * 5 / 300)))
    assert lrs[6] < base_lr
    for epoch in range(1, 300):
        assert lrs[epoch] == pytest.approx(timm_cosine(epoch - 1, **kwargs), rel=1e-12)
    assert all(later < earlier for earlier, later in zip(lrs[6:], lrs[7:]))
    assert 1e-5 < lrs[-1] < 1.02e-5
    assert train.scheduled_lr(0, base_lr, 10, 0, 1e-6, 1e-5) == base_lr  # no warmup


def test_one_epoch_logs_checkpoints_and_skips_the_bad_image(trained):
    lines = PROGRESS.findall(trained['stdout'])
    # 16 samples (the corrupt one replaced by the next image): 4 batches of 4.
    assert [line[2:4] for line in lines] == [('1', '4'), ('2', '4'), ('3', '4'), ('4', '4')]
    assert all(line[:2] == ('1', '1') for line in lines)
    assert 'dog_7.JPEG' in trained['stderr']
    assert '1 unreadable training image(s) skipped' in trained['stdout']
    [entry] = read_log(trained['output'])
    assert entry['epoch'] == 1 and entry['skipped_images'] == 1
    assert entry['lr'] == pytest.approx(1e-6)  # the warmup start (lr 5e-4 * 4 / 512 afterwards)
    assert math.isfinite(entry['train_loss']) and 0.5 < entry['train_loss'] < 3.0
    for key in ('test_acc1', 'test_acc5', 'test_acc1_ema', 'test_acc5_ema'):
        assert entry[key] * 6 / 100 == pytest.approx(round(entry[key] * 6 / 100))  # of 6 images
    assert entry['test_acc5'] == 100.0  # two classes: top-min(5, 2)
    assert entry['n_parameters'] > 0 and entry['epoch_time'] > 0
    # The last progress line's running mean is the epoch's mean loss.
    assert float(lines[-1][6]) == pytest.approx(entry['train_loss'], abs=1e-4)


def test_checkpoint_holds_everything_resuming_and_rebuilding_need(trained):
    checkpoint = read_checkpoint(trained['output'] / 'checkpoint.pdckpt')
    assert checkpoint['epoch'] == 1 and checkpoint['best_acc1'] == read_log(trained['output'])[0]['test_acc1']
    assert checkpoint['class_names'] == ['cat', 'dog']
    assert checkpoint['model_name'] == 'CycleNet'
    assert checkpoint['model_args'] == dict(layers=[1, 1, 1, 1], embed_dims=[8, 16, 16, 16],
                                            mlp_ratios=[2.0, 2.0, 2.0, 2.0], num_classes=2)
    assert checkpoint['args']['epochs'] == 1 and checkpoint['args']['data_path'] == trained['data']
    assert checkpoint['scaler'] is None  # no AMP on CPU
    model, ema = checkpoint['model'], checkpoint['model_ema']
    assert set(model) == set(ema) and 'head.weight' in model
    assert any(not np.array_equal(model[key], ema[key]) for key in model)
    # Optimizer accumulators are keyed by parameter path; biases and norms are there too.
    optimizer = checkpoint['optimizer']
    for key in ('head.weight/moment1_0', 'head.bias/moment2_0', 'norm.weight/beta1_pow_acc_0'):
        assert isinstance(optimizer[key], np.ndarray)
    assert optimizer['head.weight/moment1_0'].shape == model['head.weight'].shape
    # evaluate.py and predict.py need only the file: create_model rebuilds both weight sets.
    rebuilt = create_model(weights=str(trained['output'] / 'checkpoint.pdckpt'), ema=True)
    assert rebuilt.config == checkpoint['model_args'] and rebuilt.class_names == ['cat', 'dog']
    np.testing.assert_array_equal(rebuilt.state_dict()['head.weight'].numpy(), ema['head.weight'])
    best = create_model(weights=str(trained['output'] / 'best.pdparams'))
    assert best.class_names == ['cat', 'dog']
    # The evaluation transform the run used, for predict.py and evaluate.py to default to.
    assert checkpoint['data_config'] == best.data_config == dict(
        input_size=32, crop_pct=0.875, interpolation='bicubic')
    np.testing.assert_array_equal(best.state_dict()['head.bias'].numpy(), model['head.bias'])


def test_eval_only_reports_the_checkpoint_accuracy(trained):
    result = run_train('--data-path', trained['data'], '--eval', '--resume',
                       str(trained['output'] / 'checkpoint.pdckpt'), *TINY)
    entry = read_log(trained['output'])[0]
    assert f'* Acc@1 {entry["test_acc1"]:.3f} Acc@5 {entry["test_acc5"]:.3f}' in result.stdout
    assert 'Epoch [' not in result.stdout
    assert len(read_log(trained['output'])) == 1


def test_finetune_replaces_a_head_of_another_class_count(trained, tmp_path):
    data = write_image_folder(tmp_path / 'three', classes=('a', 'b', 'c'), train_per_class=4,
                              val_per_class=1)
    weights = str(trained['output'] / 'best.pdparams')
    result = run_train('--data-path', data, '--output-dir', str(tmp_path / 'out'), '--epochs', '1',
                       '--finetune', weights, '--no-model-ema', *TINY)
    assert f'{weights}: dropped its 2-class head' in result.stdout
    finetuned = read_checkpoint(tmp_path / 'out' / 'checkpoint.pdckpt')
    assert finetuned['model']['head.bias'].shape == (3,) and finetuned['model_ema'] is None
    # The backbone started from the file: the first stage's norm moved only by one epoch.
    start = read_checkpoint(weights)['model']['network.0.0.norm1.weight']
    assert np.abs(finetuned['model']['network.0.0.norm1.weight'] - start).max() < 0.01
    assert not np.array_equal(finetuned['model']['network.0.0.norm1.weight'], start)


def test_user_errors_exit_2_with_one_line(trained, tmp_path):
    cases = [
        (['--data-path', str(tmp_path / 'nowhere')], str(tmp_path / 'nowhere')),
        (['--data-path', trained['data'], '--resume', str(tmp_path / 'missing.pdckpt')],
         'missing.pdckpt: no such file'),
        (['--data-path', trained['data'], '--resume', str(trained['output'] / 'log.txt')], 'log.txt'),
        ([], '--data-path is required'),
    ]
    for flags, message in cases:
        result = run_train(*flags, *TINY, '--epochs', '1', check=False)
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().splitlines()[-1].startswith('error: ')
        assert message in result.stderr and 'Traceback' not in result.stderr


def test_list_files(tmp_path):
    data = write_image_folder(tmp_path / 'data', train_per_class=4, val_per_class=2)
    for split in ('train', 'val'):
        lines = [f'{split}/{name}/{file} {label}' for label, name in enumerate(('cat', 'dog'))
                 for file in sorted(os.listdir(os.path.join(data, split, name)))]
        Path(data, f'{split}.txt').write_text('\n'.join(lines) + '\n')
    output = tmp_path / 'out'
    run_train('--data-path', data, '--train-list', os.path.join(data, 'train.txt'),
              '--val-list', os.path.join(data, 'val.txt'), '--output-dir', str(output),
              '--epochs', '1', '--no-repeated-aug', *TINY)
    [entry] = read_log(output)
    assert entry['test_acc1'] in (0.0, 25.0, 50.0, 75.0, 100.0)
    assert read_checkpoint(output / 'checkpoint.pdckpt')['class_names'] == ['0', '1']


def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    data = write_image_folder(tmp_path / 'data', train_per_class=6, val_per_class=1)
    # No warmup and 3 epochs, so the lr changes between epochs (epoch 3 is on the cosine).
    flags = ['--data-path', data, '--epochs', '3', '--warmup-epochs', '0', '--lr', '0.05',
             '--drop-path', '0.2', *TINY]
    run_train(*flags, '--output-dir', str(tmp_path / 'straight'))

    killed = tmp_path / 'killed'
    process = subprocess.Popen([sys.executable, TRAIN_SCRIPT, *flags, '--output-dir', str(killed)],
                               env=RUN_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / 'log.txt').exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.kill()  # SIGKILL right after epoch 1's checkpoint and log line
    process.wait()
    assert [entry['epoch'] for entry in read_log(killed)] == [1]
    assert read_checkpoint(killed / 'checkpoint.pdckpt')['epoch'] == 1

    result = run_train(*flags, '--output-dir', str(killed), '--resume', 'auto')
    assert 'resumed from' in result.stdout and 'Epoch [1/3]' not in result.stdout
    straight = read_checkpoint(tmp_path / 'straight' / 'checkpoint.pdckpt')
    resumed = read_checkpoint(killed / 'checkpoint.pdckpt')
    assert resumed['epoch'] == straight['epoch'] == 3
    for part in ('model', 'model_ema', 'optimizer'):
        assert set(resumed[part]) == set(straight[part])
        for key, value in straight[part].items():
            np.testing.assert_array_equal(resumed[part][key], value, err_msg=f'{part} {key}')
    logs = read_log(tmp_path / 'straight'), read_log(killed)
    assert [entry['train_loss'] for entry in logs[0]] == [entry['train_loss'] for entry in logs[1]]
    assert logs[0][2]['lr'] < logs[0][1]['lr']


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    data = write_image_folder(tmp_path / 'data', train_per_class=4, val_per_class=1)
    output = tmp_path / 'out'
    # Two epochs at the warmup lr 1e-6, then an lr of 1e35 blows the weights up.
    result = run_train('--data-path', data, '--output-dir', str(output), '--epochs', '3',
                       '--warmup-epochs', '2', '--lr', '1e37', '--no-model-ema', *TINY, check=False)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert re.search(r'error: loss is (nan|inf|-inf) at epoch 3, iteration \d+/\d+', result.stderr)
    assert 'Traceback' not in result.stderr
    assert [entry['epoch'] for entry in read_log(output)] == [1, 2]
    checkpoint = read_checkpoint(output / 'checkpoint.pdckpt')
    assert checkpoint['epoch'] == 2
    assert all(np.isfinite(value).all() for value in checkpoint['model'].values())


def test_two_processes_keep_equal_parameters(tmp_path):
    data = write_image_folder(tmp_path / 'data', train_per_class=8, val_per_class=3)
    output = tmp_path / 'out'
    result = subprocess.run(
        [sys.executable, '-m', 'paddle.distributed.launch', '--nproc_per_node', '2', TRAIN_SCRIPT,
         '--data-path', data, '--output-dir', str(output), '--epochs', '1', *TINY],
        cwd=tmp_path, env=RUN_ENV, capture_output=True, text=True, timeout=240)
    rank0 = (tmp_path / 'log' / 'workerlog.0').read_text()
    assert result.returncode == 0, rank0[-3000:] + (tmp_path / 'log' / 'workerlog.1').read_text()[-3000:]
    assert '2 processes, global batch 8' in rank0
    # Repeated augmentation: 16 images x 3 over 2 ranks, 8 per rank per epoch: 2 steps of 4.
    assert [line[2:4] for line in PROGRESS.findall(rank0)] == [('1', '2'), ('2', '2')]
    sums = re.search(r'parameters identical on all 2 ranks; sum per rank: (\S+) (\S+)', rank0)
    assert sums and sums.group(1) == sums.group(2)
    # ... and they are the sums of the parameters rank 0 saved.
    model = read_checkpoint(output / 'checkpoint.pdckpt')['model']
    saved = sum(value.astype(np.float64).sum() for key, value in model.items()
                if not key.endswith('.offset'))
    assert float(sums.group(1)) == pytest.approx(saved, rel=1e-9, abs=1e-9)
    [entry] = read_log(output)  # rank 0 alone writes
    assert entry['test_acc1'] * 6 / 100 == pytest.approx(round(entry['test_acc1'] * 6 / 100))
    assert 'Epoch [' not in (tmp_path / 'log' / 'workerlog.1').read_text()
