"""train.py on tiny real image folders: in-process runs of main() for what it computes and
writes, real processes where the process is the point (the command line, SIGKILL, SIGINT and
SIGTERM, the distributed launcher).

The tests' tiny CycleNet (conftest.TINY_CONFIG) on 32x32 crops keeps every
run to seconds; the recipe (RandAugment, erasing, Mixup/CutMix, smoothing, EMA, drop path,
repeated augmentation) stays on everywhere.
"""
import contextlib
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cpu_setup
import train
from conftest import TINY_CONFIG, write_image_folder
from zoo import load_model
from data import DatasetError
from weights import WeightsError, atomic_save, read_checkpoint

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = str(REPO / 'train.py')
TINY = ['--layers', *map(str, TINY_CONFIG['layers']), '--embed-dims', *map(str, TINY_CONFIG['embed_dims']),
        '--mlp-ratios', *map(str, TINY_CONFIG['mlp_ratios']), '--input-size', '32', '--batch-size', '4',
        '--num-workers', '0', '--print-freq', '1']
PROGRESS = re.compile(r'^Epoch \[(\d+)/(\d+)\] \[ *(\d+)/(\d+)\] eta \d+:\d\d:\d\d lr (\d+\.\d{6}) '
                      r'loss (\d+\.\d{4}) \((\d+\.\d{4})\) \d+ img/s$', re.MULTILINE)
RUN_ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(REPO)}


def train_in_process(*flags) -> dict:
    """train.main on the parsed flags: {'entry', 'stdout', 'stderr'}."""
    stdout, stderr = io.StringIO(), io.StringIO()
    warnings = logging.StreamHandler(stderr)      # data.py's warnings, as the command prints them
    logging.getLogger('data').addHandler(warnings)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            entry = train.main(train.parse_args([str(flag) for flag in flags]))
    finally:
        logging.getLogger('data').removeHandler(warnings)
    return dict(entry=entry, stdout=stdout.getvalue(), stderr=stderr.getvalue())


def parse_error(*flags) -> str:
    """The one-line argparse error that train.parse_args exits with (status 2)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_info:
        train.parse_args([str(flag) for flag in flags])
    assert exit_info.value.code == 2
    return stderr.getvalue().strip().splitlines()[-1]


def run_train(*flags, cwd=None, check=True, timeout=240) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, TRAIN_SCRIPT, *map(str, flags)], cwd=cwd, env=RUN_ENV,
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
    result = train_in_process('--data-path', data, '--output-dir', output, '--epochs', '1',
                              '--no-repeated-aug', *TINY)
    return dict(data=data, output=output, **result)


def test_help_documents_every_flag_with_its_default():
    text = ' '.join(train.get_args_parser().format_help().split())   # argparse wraps lines
    for flag in ('--output-dir', '--output_dir', '--num_workers', '--model-ema-decay', '--no-amp',
                 '--amp-dtype', '--resume', '--overwrite', '--finetune', '--eval-interval', '--demo',
                 '--threads', '--drop', '--dist-eval'):
        assert flag in text
    assert '(default: CycleMLP_B1)' in text
    for action in train.get_args_parser()._actions:
        if action.dest != 'help':
            assert re.search(r'\(default: [^()]*(\([^()]*\)[^()]*)*\)$', action.help), action.option_strings


def test_defaults_follow_the_official_main_py():
    args = train.parse_args(['--data-path', 'd'])
    assert (args.model, args.epochs, args.batch_size, args.lr, args.warmup_lr, args.warmup_epochs,
            args.min_lr, args.weight_decay, args.opt_eps, args.opt_betas, args.clip_grad,
            args.smoothing, args.drop_path, args.model_ema, args.model_ema_decay, args.repeated_aug,
            args.mixup, args.cutmix, args.mixup_prob, args.mixup_switch_prob, args.aa, args.reprob,
            args.remode, args.recount, args.scale, args.num_workers) == (
        'CycleMLP_B1', 300, 64, 5e-4, 1e-6, 5, 1e-5, 0.05, 1e-8, [0.9, 0.999], None, 0.1, 0.1,
        True, 0.99996, True, 0.8, 1.0, 1.0, 0.5, 'rand-m9-mstd0.5-inc1', 0.25, 'pixel', 1,
        [0.08, 1.0], cpu_setup.default_num_workers())
    aliases = train.parse_args(['--data-path', 'd', '--output_dir', 'o', '--num_workers', '3', '--no_amp',
                                '--no-model-ema', '--no-repeated-aug', '--batch_size', '8'])
    assert (aliases.output_dir, aliases.num_workers, aliases.no_amp, aliases.model_ema,
            aliases.repeated_aug, aliases.batch_size) == ('o', 3, True, False, False, 8)


def test_official_command_lines_run_and_prefixes_select_nothing():
    # The official main.py's flags: accepted, and none of them reaches another flag.
    args = train.parse_args(['--data-path', 'd', '--drop', '0.0', '--dr', '0.5', '--opt', 'adamw',
                             '--sched', 'cosine', '--dist-eval', '--pin-mem', '--model-ema-force-cpu',
                             '--start_epoch', '0', '--device', 'cuda'])
    assert args.drop_path == 0.1 and args.decay_rate == 0.5 and args.drop == 0.0
    assert 'unrecognized arguments: --dro 0.0' in parse_error('--data-path', 'd', '--dro', '0.0')
    assert 'unrecognized arguments: --drop-pa 0' in parse_error('--data-path', 'd', '--drop-pa', '0')
    # ... but never with a value that needs behaviour this repo does not have.
    assert parse_error('--data-path', 'd', '--opt', 'sgd').endswith('--opt sgd: only adamw is implemented here')
    assert '--lr-noise [0.5]' in parse_error('--data-path', 'd', '--lr-noise', '0.5')
    assert '--distillation-type hard' in parse_error('--data-path', 'd', '--distillation-type', 'hard')


@pytest.mark.parametrize('flags, message', [
    (['--batch-size', '0'], 'argument --batch-size/--batch_size: expected a value in [1, inf], got 0'),
    (['--print-freq', '0'], 'argument --print-freq/--print_freq: expected a value in [1, inf]'),
    (['--eval-interval', '0'], 'argument --eval-interval'),
    (['--input-size', '0'], 'argument --input-size/--input_size: expected a value in [8, 4096]'),
    (['--crop-pct', '2'], 'argument --crop-pct/--crop_pct: expected a value in [0.05, 1.0]'),
    (['--recount', '0'], 'argument --recount'),
    (['--seed', '-1'], 'argument --seed'),
    (['--seed', '1' + '0' * 400], 'argument --seed: expected a value in [0, 2147483647], got 1000'),
    (['--seed', 'abc'], "argument --seed: invalid int value: 'abc'"),
    (['--lr', '1e-3x'], "argument --lr: invalid float value: '1e-3x'"),
    (['--scale', '1.0', '0.08'], '--scale 1.0 0.08: the smaller area fraction comes first'),
    (['--num-workers', '-1'], 'argument --num-workers/--num_workers'),
    (['--opt-betas', '1.5', '2'], 'argument --opt-betas'),
    (['--layers', '1', '1', '1', '1', '--embed-dims', '0', '0', '0', '0', '--mlp-ratios', '1', '1', '1', '1'],
     'argument --embed-dims: expected a value in [4, 8192], got 0'),
    (['--lr', '-1'], 'argument --lr: expected a value in (0.0, inf]'),
    (['--smoothing', '2'], 'argument --smoothing'),
    (['--model-ema-decay', 'nan'], 'argument --model-ema-decay: expected a value in [0.0, 1.0], got nan'),
    (['--batch-size', '5'], '--batch-size 5: Mixup/CutMix pair each image with another'),
    (['--aa', 'rand-x9'], "--aa: bad section 'x9' of policy 'rand-x9'"),
    (['--layers', '1', '1', '1', '1'], '--layers needs --embed-dims and --mlp-ratios'),
], ids=lambda value: value[0] if isinstance(value, list) else None)
def test_flags_out_of_range_are_argparse_errors(flags, message):
    assert message in parse_error('--data-path', 'd', *flags)


def test_data_path_is_required():
    assert parse_error().endswith('the following arguments are required: --data-path/--data_path')


def test_demo_preset_yields_to_explicit_flags():
    args = train.parse_args(['--demo', '--epochs', '3', '--batch-size', '16'])
    assert (args.epochs, args.batch_size) == (3, 16)
    assert args.input_size == train.DEMO_PRESET['input_size']
    assert Path(args.data_path) == REPO / 'demo_data' and (REPO / 'demo_data' / 'train').is_dir()
    assert args.layers == train.DEMO_PRESET['layers']


# The lr each epoch trains at in the official run, from timm itself (timm 1.0.31):
# timm.scheduler.create_scheduler(Namespace(sched='cosine', epochs=300, lr=1e-3, warmup_lr=1e-6,
# min_lr=1e-5, warmup_epochs=5, cooldown_epochs=10, decay_rate=0.1, lr_noise=None, ...), optimizer),
# read from the optimizer before each epoch, then lr_scheduler.step(epoch) as main.py does.
TIMM_LRS = {0: 1e-06, 1: 1e-06, 2: 0.00020080000000000003, 3: 0.0004006000000000001,
            5: 0.0008002000000000002, 6: 0.000999321619703514, 7: 0.0009990232305719944,
            100: 0.0007569755007964338, 299: 1.0108561679951479e-05}


def test_lr_schedule_matches_timms_scheduler_stepped_as_main_py_steps_it():
    for epoch, lr in TIMM_LRS.items():
        assert train.scheduled_lr(epoch, 1e-3, 300, 5, 1e-6, 1e-5) == pytest.approx(lr, rel=1e-12), epoch
    assert train.scheduled_lr(0, 1e-3, 10, 0, 1e-6, 1e-5) == 1e-3  # no warmup


def test_soft_target_and_label_smoothing_cross_entropy():
    import paddle
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 7)).astype(np.float32) * 3
    targets = rng.dirichlet(np.ones(7), size=6).astype(np.float32)
    labels = rng.integers(0, 7, size=6)
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    loss = train.soft_target_cross_entropy(paddle.to_tensor(logits), paddle.to_tensor(targets))
    assert float(loss) == pytest.approx(-(targets * log_p).sum(axis=1).mean(), rel=1e-5)
    nll = -log_p[np.arange(6), labels]
    for smoothing in (0.0, 0.1):       # the targets without Mixup: label smoothing
        targets = train.smooth_one_hot(paddle.to_tensor(labels), 7, smoothing)
        loss = train.soft_target_cross_entropy(paddle.to_tensor(logits), targets)
        assert float(loss) == pytest.approx(((1 - smoothing) * nll + smoothing * -log_p.mean(axis=1)).mean(), rel=1e-5)


def test_one_epoch_logs_checkpoints_and_skips_the_bad_image(trained):
    lines = PROGRESS.findall(trained['stdout'])
    # 16 samples (the corrupt one replaced by the next image): 4 batches of 4.
    assert [line[2:4] for line in lines] == [('1', '4'), ('2', '4'), ('3', '4'), ('4', '4')]
    assert all(line[:2] == ('1', '1') for line in lines)
    assert 'dog_7.JPEG' in trained['stderr']
    assert '1 unreadable training image(s) skipped' in trained['stdout']
    [entry] = read_log(trained['output'])
    assert entry == trained['entry']
    assert entry['epoch'] == 1 and entry['skipped_images'] == 1
    assert entry['lr'] == pytest.approx(1e-6)  # the warmup start (lr 5e-4 * 4 / 512 afterwards)
    assert math.isfinite(entry['train_loss']) and 0.5 < entry['train_loss'] < 3.0
    for key in ('test_acc1', 'test_acc5', 'test_acc1_ema', 'test_acc5_ema'):
        assert entry[key] * 6 / 100 == pytest.approx(round(entry[key] * 6 / 100))  # of 6 images
    assert entry['test_acc5'] == 100.0  # two classes: top-min(5, 2)
    assert entry['n_parameters'] > 0 and entry['epoch_time'] > 0
    # The last progress line's running mean is the epoch's mean loss.
    assert float(lines[-1][6]) == pytest.approx(entry['train_loss'], abs=1e-4)


def test_log_lines_stay_json_whatever_the_values():
    line = train.json_line({'epoch': 2, 'test_loss': float('nan'), 'lr': float('inf'), 'acc': 1.5})
    assert json.loads(line) == {'epoch': 2, 'test_loss': None, 'lr': None, 'acc': 1.5}


def test_checkpoint_holds_everything_resuming_and_rebuilding_need(trained):
    checkpoint = read_checkpoint(trained['output'] / 'checkpoint.pdckpt')
    assert checkpoint['epoch'] == 1 and checkpoint['best_acc1'] == read_log(trained['output'])[0]['test_acc1']
    assert checkpoint['class_names'] == ['cat', 'dog']
    assert checkpoint['model_name'] is None        # a custom shape: load_model reads it off the weights
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
    # evaluate.py and predict.py need only the file: load_model rebuilds both weight sets.
    rebuilt, meta = load_model(str(trained['output'] / 'checkpoint.pdckpt'), ema=True)
    assert rebuilt.config == dict(TINY_CONFIG, num_classes=2)
    assert meta['class_names'] == ['cat', 'dog']
    np.testing.assert_array_equal(rebuilt.state_dict()['head.weight'].numpy(), ema['head.weight'])
    best, best_meta = load_model(str(trained['output'] / 'best.pdparams'))
    # The evaluation transform the run used, for predict.py and evaluate.py to default to.
    assert checkpoint['data_config'] == best_meta['data_config'] == dict(
        input_size=32, crop_pct=0.875, interpolation='bicubic')
    np.testing.assert_array_equal(best.state_dict()['head.bias'].numpy(), model['head.bias'])


def test_eval_only_reports_the_checkpoint_accuracy(trained):
    result = train_in_process('--data-path', trained['data'], '--eval', '--resume',
                              trained['output'] / 'checkpoint.pdckpt', *TINY)
    entry = read_log(trained['output'])[0]
    assert f'* Acc@1 {entry["test_acc1"]:.3f} Acc@5 {entry["test_acc5"]:.3f}' in result['stdout']
    assert 'Epoch [' not in result['stdout']
    assert len(read_log(trained['output'])) == 1


def test_finetune_replaces_a_head_of_another_class_count(trained, tmp_path):
    data = write_image_folder(tmp_path / 'three', classes=('a', 'b', 'c'), train_per_class=4,
                              val_per_class=1)
    weights = str(trained['output'] / 'best.pdparams')
    result = train_in_process('--data-path', data, '--output-dir', tmp_path / 'out', '--epochs', '1',
                              '--finetune', weights, '--no-model-ema', *TINY)
    assert f'{weights}: dropped its 2-class head' in result['stdout']
    finetuned = read_checkpoint(tmp_path / 'out' / 'checkpoint.pdckpt')
    assert finetuned['model']['head.bias'].shape == (3,) and finetuned['model_ema'] is None
    # The backbone started from the file: the first stage's norm moved only by one epoch.
    start = read_checkpoint(weights)['model']['network.0.0.norm1.weight']
    assert np.abs(finetuned['model']['network.0.0.norm1.weight'] - start).max() < 0.01
    assert not np.array_equal(finetuned['model']['network.0.0.norm1.weight'], start)


def test_file_and_data_errors_name_the_file(trained, tmp_path):
    cases = [
        (['--data-path', tmp_path / 'nowhere'], DatasetError, f'{tmp_path / "nowhere"}/train does not exist'),
        (['--data-path', trained['data'], '--resume', tmp_path / 'missing.pdckpt'], WeightsError,
         'missing.pdckpt: no such file'),
        (['--data-path', trained['data'], '--resume', trained['output'] / 'log.txt'], WeightsError,
         'log.txt: not a weights file'),
    ]
    for flags, kind, message in cases:
        with pytest.raises(kind) as error:
            train_in_process(*flags, *TINY, '--epochs', '1')
        assert message in str(error.value) and '\n' not in str(error.value)


@pytest.mark.parametrize('change, message', [
    (lambda c: c.pop('epoch'), 'epoch is None, expected a count of epochs (a checkpoint of train.py)'),
    (lambda c: c.update(epoch='3'), "epoch is '3', expected a count of epochs"),
    (lambda c: c.update(epoch=1.5), 'epoch is 1.5'),
    (lambda c: c.update(epoch=-1), 'epoch is -1'),
    (lambda c: c.update(best_acc1='high'), "best_acc1 is 'high', expected a percentage"),
    (lambda c: c.update(model=[1, 2]), 'the state dict is a list, expected a dict'),
    (lambda c: c['model'].update({'head.bias': 'zero'}), "state dict entry 'head.bias' is 'zero', expected an array"),
    (lambda c: c.update(optimizer=['moment']), 'optimizer is a list, expected a dict'),
    (lambda c: c['optimizer'].update({'head.bias/moment1_0': 'big'}),
     "optimizer entry 'head.bias/moment1_0' is 'big', expected a float array of shape [2]"),
    (lambda c: c['optimizer'].update({'head.bias/moment1_0': np.zeros(5, np.float32)}),
     "optimizer entry 'head.bias/moment1_0' is an array of shape [5] (float32), expected a float array of shape [2]"),
    (lambda c: c['optimizer'].update({'head.bias/beta1_pow_acc_0': np.zeros(2, np.float32)}),
     "optimizer entry 'head.bias/beta1_pow_acc_0' is an array of shape [2] (float32), expected one float"),
    (lambda c: c['optimizer'].update({'stem.weight/moment1_0': np.zeros(5, np.float32)}),
     "the parameter of optimizer entry 'stem.weight/moment1_0' is 'stem.weight', expected one of the model's"),
    (lambda c: c['optimizer'].update({3: np.zeros(1, np.float32)}), 'an optimizer key is 3, expected a str'),
    (lambda c: c['optimizer'].update({'LR_Scheduler': {'last_epoch': 3}}),
     "the parameter of optimizer entry 'LR_Scheduler' is 'LR_Scheduler', expected one of the model's"),
], ids=['no epoch', 'epoch str', 'epoch float', 'epoch negative', 'best str', 'model list', 'model str value',
        'optimizer list', 'optimizer str value', 'moment shape', 'accumulator size', 'unknown parameter',
        'key not a str', 'no parameter'])
def test_resume_checks_the_checkpoint_structure(trained, tmp_path, change, message):
    checkpoint = read_checkpoint(trained['output'] / 'checkpoint.pdckpt')
    change(checkpoint)
    path = tmp_path / 'odd.pdckpt'
    atomic_save(checkpoint, str(path))
    with pytest.raises(WeightsError, match=re.escape(f'{path}: {message}')):
        train_in_process('--data-path', trained['data'], '--resume', path, *TINY, '--epochs', '2')


def test_a_run_is_never_overwritten_by_accident(tmp_path):
    data = write_image_folder(tmp_path / 'data', train_per_class=4, val_per_class=1)
    output = tmp_path / 'out'
    flags = ['--data-path', data, '--output-dir', output, '--epochs', '1', *TINY]
    train_in_process(*flags)
    before = {name: (output / name).read_bytes() for name in train.RUN_FILES}
    assert parse_error(*flags) == (f'CycleMLP training: error: --output-dir {output} holds a run (checkpoint.pdckpt, '
                                   'best.pdparams, log.txt): continue it with --resume auto, or start over '
                                   'with --overwrite')
    assert {name: (output / name).read_bytes() for name in train.RUN_FILES} == before
    with pytest.raises(NotADirectoryError, match=re.escape(str(output / 'log.txt' / 'x'))):
        train_in_process('--data-path', data, '--output-dir', output / 'log.txt' / 'x', *TINY)
    # --overwrite deletes the old run only once the new one has its data, model and weights.
    with pytest.raises(DatasetError):
        train_in_process('--data-path', tmp_path / 'nowhere', '--output-dir', output, '--overwrite', *TINY)
    assert {name: (output / name).read_bytes() for name in train.RUN_FILES} == before
    for no_weights in ([], ['--resume', 'auto']):      # --eval with no weights, or none found by --resume auto
        with pytest.raises(WeightsError, match=re.escape('--eval needs weights: --resume PATH, --finetune PATH, '
                                                         f'or --resume auto with a checkpoint.pdckpt in --output-dir '
                                                         f'({tmp_path / "empty"})')):
            train_in_process('--data-path', data, '--output-dir', tmp_path / 'empty', '--eval', *no_weights, *TINY)
    # A checkpoint write killed mid-way left its temporary file; the next run removes it.
    stale = output / '.checkpoint.pdckpt.abc123.tmp'
    stale.write_bytes(b'half a checkpoint')
    train_in_process(*flags, '--overwrite', '--epochs', '2')
    assert [entry['epoch'] for entry in read_log(output)] == [1, 2] and not stale.exists()


def test_list_files(tmp_path):
    data = write_image_folder(tmp_path / 'data', train_per_class=4, val_per_class=2)
    for split in ('train', 'val'):
        lines = [f'{split}/{name}/{file} {label}' for label, name in enumerate(('cat', 'dog'))
                 for file in sorted(os.listdir(os.path.join(data, split, name)))]
        Path(data, f'{split}.txt').write_text('\n'.join(lines) + '\n')
    output = tmp_path / 'out'
    train_in_process('--data-path', data, '--train-list', os.path.join(data, 'train.txt'),
                     '--val-list', os.path.join(data, 'val.txt'), '--output-dir', output,
                     '--epochs', '1', '--no-repeated-aug', *TINY)
    [entry] = read_log(output)
    assert entry['test_acc1'] in (0.0, 25.0, 50.0, 75.0, 100.0)
    assert read_checkpoint(output / 'checkpoint.pdckpt')['class_names'] == ['0', '1']


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    data = write_image_folder(tmp_path / 'data', train_per_class=4, val_per_class=1)
    output = tmp_path / 'out'
    # Two epochs at the warmup lr 1e-6, then an lr of 1e35 blows the weights up.
    with pytest.raises(FloatingPointError, match=r'loss is (nan|inf|-inf) at epoch 3, iteration \d+/\d+'):
        train_in_process('--data-path', data, '--output-dir', output, '--epochs', '3',
                         '--warmup-epochs', '2', '--lr', '1e37', '--no-model-ema', *TINY)
    assert [entry['epoch'] for entry in read_log(output)] == [1, 2]
    checkpoint = read_checkpoint(output / 'checkpoint.pdckpt')
    assert checkpoint['epoch'] == 2
    assert all(np.isfinite(value).all() for value in checkpoint['model'].values())


def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    data = write_image_folder(tmp_path / 'data', train_per_class=6, val_per_class=1)
    # No warmup and 3 epochs, so the lr changes between epochs (epoch 3 is on the cosine).
    flags = ['--data-path', data, '--epochs', '3', '--warmup-epochs', '0', '--lr', '0.05',
             '--drop-path', '0.2', *TINY]
    train_in_process(*flags, '--output-dir', tmp_path / 'straight')

    killed = tmp_path / 'killed'
    # The same thread count as this process's runs: another would round differently.
    same_threads = {**RUN_ENV, 'OMP_NUM_THREADS': str(cpu_setup.current_threads())}
    process = subprocess.Popen([sys.executable, TRAIN_SCRIPT, *map(str, flags), '--output-dir', str(killed)],
                               env=same_threads, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / 'log.txt').exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.kill()  # SIGKILL right after epoch 1's checkpoint and log line
    process.wait()
    assert [entry['epoch'] for entry in read_log(killed)] == [1]
    assert read_checkpoint(killed / 'checkpoint.pdckpt')['epoch'] == 1

    result = train_in_process(*flags, '--output-dir', killed, '--resume', 'auto')
    assert 'resumed from' in result['stdout'] and 'Epoch [1/3]' not in result['stdout']
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


@pytest.mark.parametrize('stop', [signal.SIGINT, signal.SIGTERM], ids=['SIGINT', 'SIGTERM'])
def test_stopping_with_a_signal_is_one_line_and_keeps_the_checkpoint(tmp_path, stop):
    data = write_image_folder(tmp_path / 'data', train_per_class=6, val_per_class=1)
    output = tmp_path / 'out'
    process = subprocess.Popen([sys.executable, TRAIN_SCRIPT, '--data-path', data, '--output-dir',
                                str(output), '--epochs', '50', *TINY], env=RUN_ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (output / 'log.txt').exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + stop
    assert stderr.strip().splitlines() == [f'interrupted; {output / "checkpoint.pdckpt"} holds the last '
                                           'complete epoch (--resume auto continues)']
    checkpoint = read_checkpoint(output / 'checkpoint.pdckpt')
    assert checkpoint['epoch'] >= 1 and not list(output.glob('.*.tmp'))


def test_two_processes_keep_equal_parameters(tmp_path):
    """Under the launcher each rank saves the parameters it trained; they must be identical."""
    data = write_image_folder(tmp_path / 'data', train_per_class=8, val_per_class=3)
    output = tmp_path / 'out'
    script = tmp_path / 'rank_parameters.py'
    script.write_text(
        'import sys\nimport numpy as np\nimport paddle.distributed as dist\nimport train\n'
        'models = []\noriginal = train.train_one_epoch\n'
        'def keep(model, *args):\n    models.append(model)\n    return original(model, *args)\n'
        'train.train_one_epoch = keep\ntrain.main(train.parse_args(sys.argv[1:]))\n'
        f'np.savez({str(tmp_path)!r} + f"/rank{{dist.get_rank()}}.npz", '
        '**{name: p.numpy() for name, p in models[-1].named_parameters()})\n')
    result = subprocess.run(
        [sys.executable, '-m', 'paddle.distributed.launch', '--nproc_per_node', '2', str(script),
         '--data-path', data, '--output-dir', str(output), '--epochs', '1', *TINY],
        cwd=tmp_path, env=RUN_ENV, capture_output=True, text=True, timeout=240)
    rank0 = (tmp_path / 'log' / 'workerlog.0').read_text()
    assert result.returncode == 0, rank0[-3000:] + (tmp_path / 'log' / 'workerlog.1').read_text()[-3000:]
    assert '2 processes, global batch 8' in rank0
    # Repeated augmentation: 16 images x 3 over 2 ranks, 8 per rank per epoch: 2 steps of 4.
    assert [line[2:4] for line in PROGRESS.findall(rank0)] == [('1', '2'), ('2', '2')]
    ranks = [np.load(tmp_path / f'rank{rank}.npz') for rank in (0, 1)]
    assert set(ranks[0].files) == set(ranks[1].files) and len(ranks[0].files) > 20
    for name in ranks[0].files:
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name], err_msg=name)
    # ... and they are the parameters rank 0 saved, which moved from their start.
    saved = read_checkpoint(output / 'checkpoint.pdckpt')['model']
    np.testing.assert_array_equal(ranks[0]['_layers.head.weight'], saved['head.weight'])
    [entry] = read_log(output)  # rank 0 alone writes
    assert entry['test_acc1'] * 6 / 100 == pytest.approx(round(entry['test_acc1'] * 6 / 100))


def test_a_second_run_into_the_same_output_dir_stops_at_once(tmp_path):
    """Two runs into one --output-dir: the second ends at once with one line (no interleaved
    log, no checkpoint of whichever wrote last)."""
    data = write_image_folder(tmp_path / 'data', train_per_class=6, val_per_class=1)
    output = tmp_path / 'out'
    first = subprocess.Popen([sys.executable, TRAIN_SCRIPT, '--data-path', data, '--output-dir', str(output),
                              '--epochs', '100', *TINY], env=RUN_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.time() + 60
    while not (output / 'log.txt').exists() and time.time() < deadline:
        time.sleep(0.05)
    second = run_train('--data-path', data, '--output-dir', output, '--epochs', '100', '--resume', 'auto', *TINY,
                       check=False)
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=60)
    assert first.returncode == 128 + signal.SIGINT
    assert second.returncode == 1 and second.stdout == ''
    assert second.stderr == f'error: --output-dir {output} is in use by another run; wait for it to end\n'
    epochs = [entry['epoch'] for entry in read_log(output)]
    assert epochs == list(range(1, len(epochs) + 1))


def test_resume_refuses_a_run_of_another_meaning(trained, tmp_path):
    output = tmp_path / 'run'
    shutil.copytree(trained['output'], output)
    flags = ['--data-path', trained['data'], '--output-dir', output, '--epochs', '2', '--no-repeated-aug',
             '--resume', 'auto', *TINY]
    with pytest.raises(WeightsError, match=r'checkpoint.pdckpt: this run differs from the one the checkpoint '
                                           r'continues: input_size 40 \(the checkpoint: 32\).*--allow-changes'):
        train_in_process(*flags, '--input-size', '40')
    renamed = tmp_path / 'renamed'
    shutil.copytree(trained['data'], renamed)
    for split in ('train', 'val'):
        (renamed / split / 'dog').rename(renamed / split / 'wolf')
    flags[1] = renamed
    with pytest.raises(WeightsError, match=r"class 1 is 'wolf' \(the checkpoint: 'dog'\)"):
        train_in_process(*flags)
    assert read_checkpoint(output / 'checkpoint.pdckpt')['epoch'] == 1          # nothing was rewritten
    assert train_in_process(*flags, '--allow-changes')['entry']['epoch'] == 2


def test_a_broken_validation_image_is_found_before_an_epoch_is_spent(tmp_path):
    data = write_image_folder(tmp_path / 'data', train_per_class=6, val_per_class=1)
    line = Path(data, 'val', 'cat', 'line.png')
    Image.new('RGB', (1, 100_000)).save(line)
    started = []
    original = train.train_one_epoch
    with pytest.raises(DatasetError, match=re.escape(f'cannot read image {line}: a 1x100000 image resizes to')):
        train.train_one_epoch = lambda *args: started.append(1) or original(*args)
        try:
            train_in_process('--data-path', data, '--output-dir', tmp_path / 'out', '--epochs', '1', *TINY)
        finally:
            train.train_one_epoch = original
    assert started == [] and not (tmp_path / 'out' / 'checkpoint.pdckpt').exists()


def test_checkpoints_follow_the_umask(trained):
    for name in ('checkpoint.pdckpt', 'best.pdparams', 'log.txt'):
        assert (trained['output'] / name).stat().st_mode & 0o777 == 0o666 & ~current_umask(), name


def current_umask() -> int:
    with open('/proc/self/status') as status:
        return int(next(line for line in status if line.startswith('Umask:')).split()[1], 8)


def test_rank_0_decides_the_resume_point_for_every_rank(tmp_path, monkeypatch):
    """--resume auto under the launcher: this process plays a rank whose view differs from rank
    0's (the broadcast carries rank 0's), as on machines without a shared --output-dir."""
    import argparse
    import paddle
    args = argparse.Namespace(resume='auto', output_dir=str(tmp_path))
    rank_0_found = paddle.to_tensor([1])
    monkeypatch.setattr(train.dist, 'broadcast', lambda tensor, src: paddle.assign(rank_0_found, tensor))
    monkeypatch.setattr(train.dist, 'all_reduce', lambda tensor: None)     # one rank's count
    with pytest.raises(WeightsError, match='rank 0 resumes from it but 1 of 2 ranks cannot read it'):
        train.resolve_resume(args, world_size=2)
    (tmp_path / 'checkpoint.pdckpt').write_bytes(b'')
    assert train.resolve_resume(args, world_size=2) == str(tmp_path / 'checkpoint.pdckpt')
    rank_0_found = paddle.to_tensor([0])     # rank 0 has none: no rank resumes, whatever it sees
    assert train.resolve_resume(args, world_size=2) is None


@pytest.mark.skipif(cpu_setup.paddle.device.is_compiled_with_cuda(), reason='this Paddle has CUDA')
def test_a_gpu_device_without_cuda_is_one_line(tmp_path):
    data = write_image_folder(tmp_path / 'data')
    result = subprocess.run([sys.executable, TRAIN_SCRIPT, '--data-path', data, '--device', 'cuda', *TINY],
                            env=RUN_ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ''
    assert result.stderr.startswith('error: --device gpu: this Paddle') and result.stderr.count('\n') == 1


def test_the_ema_moves_each_parameter_by_one_minus_decay():
    from cyclemlp import CycleNet
    model = CycleNet(**TINY_CONFIG, num_classes=3)
    ema = train.ModelEma(model, decay=0.75)
    before = {name: param.numpy() for name, param in ema.module.named_parameters()}
    for param in model.parameters():
        param.set_value(param + 1.0)
    ema.update()
    for name, param in ema.module.named_parameters():
        np.testing.assert_allclose(param.numpy(), before[name] + 0.25, rtol=1e-6, atol=1e-6, err_msg=name)


def test_a_to_static_step_equals_the_eager_step():
    """--to-static: forward, loss and one AdamW step of the static graph equal eager's (the
    eager model computes by fast_layers, the static one by Paddle's layers: rounding only)."""
    import paddle
    from cli import static_if
    from cyclemlp import CycleNet
    results = []
    for to_static in (False, True):
        paddle.seed(3)
        model = static_if(to_static, CycleNet(**TINY_CONFIG, num_classes=3))
        optimizer = paddle.optimizer.AdamW(learning_rate=0.01, parameters=model.parameters())
        images, labels = paddle.to_tensor(np.random.default_rng(0).normal(size=(4, 3, 64, 64)).astype('float32')), \
            paddle.to_tensor([0, 1, 2, 1])
        logits = model(images)
        loss = train.soft_target_cross_entropy(logits, train.smooth_one_hot(labels, 3, 0.1))
        loss.backward()
        optimizer.step()
        results.append([logits.numpy(), loss.numpy()] + [param.numpy() for param in model.parameters()])
    assert len(results[0]) == len(results[1]) > 40
    for eager, static in zip(results[0][:2], results[1][:2]):      # logits and loss
        np.testing.assert_allclose(static, eager, rtol=1e-5, atol=1e-6)
    for eager, static in zip(results[0][2:], results[1][2:]):      # parameters after a step of lr 0.01
        np.testing.assert_allclose(static, eager, rtol=0, atol=1e-5)


def test_training_and_evaluating_to_static(tmp_path):
    data = write_image_folder(tmp_path / 'data')
    eager = train_in_process('--data-path', data, '--epochs', '1', *TINY, '--seed', '1')['entry']
    static = train_in_process('--data-path', data, '--epochs', '1', *TINY, '--seed', '1', '--to_static')['entry']
    for key in ('train_loss', 'test_loss', 'test_loss_ema'):
        assert abs(static[key] - eager[key]) < 1e-4 * abs(eager[key]), key
