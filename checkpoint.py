"""A training run's files: the checkpoint (written every epoch, checked before a resume restores
anything), the best weights, the JSON log, and how a resumed run differs from the one it continues."""
import argparse
import json
import math
import os
from typing import List, Optional

import zlib  # noqa: F401  before Paddle: Paddle 2.6 bundles a zlib that crashes one loaded after it
import numpy as np
import paddle
import paddle.distributed as dist

from cyclemlp import CycleNet
from safe_io import WeightsError, describe, remove_stale_temporaries
from weights import atomic_save, check_state, read_checkpoint
from zoo import load_state, numpy_state, variant_name

CHECKPOINT_FILE = 'checkpoint.pdckpt'
BEST_FILE = 'best.pdparams'
LOG_FILE = 'log.txt'
RUN_FILES = (CHECKPOINT_FILE, BEST_FILE, LOG_FILE)


def expect(condition, source: str, what: str, value, expected: str) -> None:
    """The one check of what a checkpoint holds: unless condition, 'SOURCE: WHAT is VALUE, expected ...'."""
    if not condition:
        shown = (f'an array of shape {list(value.shape)} ({value.dtype})' if isinstance(value, np.ndarray)
                 else describe(value))
        raise WeightsError(f'{source}: {what} is {shown}, expected {expected}')


def optimizer_state(optimizer: paddle.optimizer.Optimizer, model: CycleNet) -> dict:
    """The optimizer's state keyed 'head.weight/moment1_0', not Paddle's 'linear_61.w_0_moment1_0'."""
    # Generated names depend on what the process built before, so they differ between runs. AdamW at
    # a float lr holds only per-parameter tensors (no LR_Scheduler, no master weights without O2).
    paths = {param.name: name for name, param in model.named_parameters()}
    tensor_names = sorted(paths, key=len, reverse=True)  # longest first: linear_10 before linear_1
    state = {}
    for key, value in optimizer.state_dict().items():
        owner = next(name for name in tensor_names if key.startswith(name + '_'))
        state[f'{paths[owner]}/{key[len(owner) + 1:]}'] = value.numpy()
    return state


def load_optimizer_state(optimizer: paddle.optimizer.Optimizer, model: CycleNet, state, source: str) -> None:
    """Restore optimizer_state's output, checking every entry first."""
    expect(isinstance(state, dict), source, 'optimizer', state, 'a dict')
    params = dict(model.named_parameters())
    renamed = {}
    for key, value in state.items():
        expect(isinstance(key, str), source, 'an optimizer key', key, 'a str')
        path, _, accumulator = key.partition('/')
        expect(path in params and accumulator, source, f'the parameter of optimizer entry {describe(key)}',
               path, 'one of the model\'s')
        param, moment = params[path], accumulator.startswith('moment')
        expect(isinstance(value, np.ndarray) and value.dtype.kind == 'f' and (
            list(value.shape) == list(param.shape) if moment else value.size == 1), source,
            f'optimizer entry {describe(key)}', value, f'a float array of shape {list(param.shape)}'
            if moment else 'one float')
        renamed[f'{param.name}_{accumulator}'] = value
    optimizer.set_state_dict(renamed)


def data_config(args: argparse.Namespace) -> dict:
    return dict(input_size=args.input_size, crop_pct=args.crop_pct, interpolation=args.eval_interpolation)


def model_meta(run, args: argparse.Namespace) -> dict:
    """What evaluate.py, predict.py and export.py need besides the weights (model_name None: custom)."""
    return dict(model_name=variant_name(run.model.config), class_names=list(run.train_set.classes),
                data_config=data_config(args))


def save_checkpoint(path: str, run, epoch: int, best_acc1: float, args: argparse.Namespace) -> None:
    """Everything resuming needs (the lr and the random state are functions of the epoch)."""
    atomic_save({
        'model': numpy_state(run.model),
        'model_ema': numpy_state(run.ema.module) if run.ema is not None else None,
        'optimizer': optimizer_state(run.optimizer, run.model),
        'scaler': run.scaler.state_dict() or None,   # numpy already; {} from a disabled scaler
        'epoch': epoch,
        'best_acc1': best_acc1,
        'args': vars(args),
        **model_meta(run, args),
    }, path)


def load_checkpoint(path: str, run, args: argparse.Namespace) -> tuple:
    """Restore a checkpoint into the run, every part checked first; (epochs trained, best acc1)."""
    checkpoint = read_checkpoint(path)
    epoch, best = checkpoint.get('epoch'), checkpoint.get('best_acc1')
    expect(type(epoch) is int and epoch >= 0, path, 'epoch', epoch,
           'a count of epochs (a checkpoint of train.py)')
    expect(type(best) in (int, float) and 0 <= best <= 100, path, 'best_acc1', best, 'a percentage')
    differences = changes(checkpoint, args, run.train_set.classes)
    if differences and not (args.eval or args.allow_changes):
        raise WeightsError(f'{path}: this run differs from the one the checkpoint continues: '
                           + '; '.join(differences) + '. Resume with --allow-changes to go on anyway')
    load_state(run.model, check_state(path, checkpoint.get('model')), source=path)
    if run.ema is not None:
        # A checkpoint of a run without EMA starts the average from the restored weights.
        ema_state = checkpoint.get('model_ema')
        ema_state = checkpoint.get('model') if ema_state is None else ema_state
        load_state(run.ema.module, check_state(path, ema_state), source=path)
    load_optimizer_state(run.optimizer, run.model, checkpoint.get('optimizer'), path)
    scaler_state = checkpoint.get('scaler')
    if scaler_state is not None:    # a disabled scaler ignores it
        expect(isinstance(scaler_state, dict) and scaler_state, path, 'scaler', scaler_state,
               'a loss scaler\'s state')
        run.scaler.load_state_dict(scaler_state)
    return epoch, best


def changes(checkpoint: dict, args: argparse.Namespace, class_names: List[str]) -> List[str]:
    """How this run's evaluation transform and class names differ from the checkpoint's."""
    # Other model shapes do not load at all; read_checkpoint checked the recorded types.
    asked = data_config(args)
    differences = [f'{key} {asked[key]} (the checkpoint: {value})'
                   for key, value in (checkpoint.get('data_config') or {}).items() if asked[key] != value]
    recorded = checkpoint.get('class_names')
    if recorded is not None and recorded != list(class_names):
        index = next((i for i, (name, old) in enumerate(zip(class_names, recorded)) if name != old), None)
        differences.append(f'class {index} is {describe(class_names[index])} (the checkpoint: '
                           f'{describe(recorded[index])})' if index is not None else
                           f'{len(class_names)} classes (the checkpoint: {len(recorded)})')
    return differences


def resolve_resume(args: argparse.Namespace, world_size: int) -> Optional[str]:
    """The checkpoint every rank resumes from: --resume, or for 'auto' OUTPUT/checkpoint.pdckpt
    if rank 0 sees it. Rank 0 decides for all (ranks at different epochs would wait for each
    other forever); a rank that cannot read that file stops them all with one line."""
    path = args.resume
    if path == 'auto':
        path = os.path.join(args.output_dir, CHECKPOINT_FILE)
        found = paddle.to_tensor([int(os.path.isfile(path))])
        if world_size > 1:
            dist.broadcast(found, src=0)
        if not found.item():
            return None
    if world_size > 1:
        missing = paddle.to_tensor([int(not os.path.isfile(path))])
        dist.all_reduce(missing)
        if missing.item():
            raise WeightsError(f'{path}: rank 0 resumes from it but {missing.item()} of {world_size} ranks '
                               'cannot read it; put --output-dir on a file system every machine shares')
    return path


def prepare_output_dir(args: argparse.Namespace) -> None:
    """With --overwrite remove --output-dir's run; remove what a killed write left."""
    for name in RUN_FILES if args.overwrite else ():
        if os.path.exists(os.path.join(args.output_dir, name)):
            os.remove(os.path.join(args.output_dir, name))
    for name in (CHECKPOINT_FILE, BEST_FILE):
        remove_stale_temporaries(os.path.join(args.output_dir, name))


def json_line(entry: dict) -> str:
    """One log.txt line; a value that is not finite is written as null, so the file stays JSON."""
    return json.dumps({key: value if not isinstance(value, float) or math.isfinite(value) else None
                       for key, value in entry.items()}, allow_nan=False)
