"""A training run's files: the checkpoint train.py writes every epoch and resumes from (checked
before anything is restored), the best weights, the JSON log, and how a resumed run differs from
the one it continues."""
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
from weights import (WeightsError, atomic_save, check_state, describe, read_checkpoint,
                     remove_stale_temporaries)
from zoo import load_state, numpy_state, variant_name

CHECKPOINT_FILE = 'checkpoint.pdckpt'
BEST_FILE = 'best.pdparams'
LOG_FILE = 'log.txt'
RUN_FILES = (CHECKPOINT_FILE, BEST_FILE, LOG_FILE)


def to_numpy(value):
    """Tensors in nested dicts and lists as numpy arrays, which read_checkpoint reads back."""
    if isinstance(value, paddle.Tensor):
        return value.numpy()
    if isinstance(value, dict):
        return {key: to_numpy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_numpy(item) for item in value]
    return value


def optimizer_state(optimizer: paddle.optimizer.Optimizer, model: CycleNet) -> dict:
    """The optimizer's state keyed 'head.weight/moment1_0', not Paddle's 'linear_61.w_0_moment1_0':
    generated names depend on what the process built before, so they differ between runs."""
    paths = {param.name: name for name, param in model.named_parameters()}
    tensor_names = sorted(paths, key=len, reverse=True)  # longest first: linear_10 before linear_1
    state = {}
    for key, value in optimizer.state_dict().items():
        owner = next((name for name in tensor_names if key.startswith(name + '_')), None)
        state[key if owner is None else f'{paths[owner]}/{key[len(owner) + 1:]}'] = to_numpy(value)
    return state


def load_optimizer_state(optimizer: paddle.optimizer.Optimizer, model: CycleNet, state, source: str) -> None:
    """Restore optimizer_state's output, checking every entry first."""
    if not isinstance(state, dict):
        raise WeightsError(f'{source}: optimizer is {describe(state)}, expected a dict')
    params = dict(model.named_parameters())
    renamed = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise WeightsError(f'{source}: optimizer entry {describe(key)} is not a name')
        path, _, accumulator = key.partition('/')
        if not accumulator:   # optimizer-wide entries ('LR_Scheduler' and the like)
            renamed[key] = value
            continue
        if path not in params:
            raise WeightsError(f'{source}: optimizer state names parameter {describe(path)} the model lacks')
        param = params[path]
        if not isinstance(value, np.ndarray) or value.dtype.kind != 'f':
            raise WeightsError(f'{source}: optimizer entry {describe(key)} is {describe(value)}, '
                               'expected a float array')
        if accumulator.startswith('moment') and list(value.shape) != list(param.shape):
            raise WeightsError(f'{source}: optimizer entry {describe(key)} has shape {list(value.shape)}, '
                               f'the parameter {list(param.shape)}')
        if not accumulator.startswith('moment') and value.size != 1:
            raise WeightsError(f'{source}: optimizer entry {describe(key)} has {value.size} values, expected 1')
        renamed[f'{param.name}_{accumulator}'] = value
    optimizer.set_state_dict(renamed)


def model_meta(model: CycleNet, args: argparse.Namespace, class_names: List[str]) -> dict:
    """What evaluate.py, predict.py and export.py need besides the weights."""
    meta = dict(class_names=list(class_names), data_config=dict(
        input_size=args.input_size, crop_pct=args.crop_pct, interpolation=args.eval_interpolation))
    name = variant_name(model.config)
    return {**meta, 'model_name': name} if name else meta   # custom shapes: from the file


def save_checkpoint(path: str, run, epoch: int, best_acc1: float, args: argparse.Namespace) -> None:
    """Everything resuming needs (the lr and the random state are functions of the epoch)."""
    atomic_save({
        'model': numpy_state(run.model),
        'model_ema': numpy_state(run.ema.module) if run.ema is not None else None,
        'optimizer': optimizer_state(run.optimizer, run.model),
        'scaler': to_numpy(run.scaler.state_dict()) if run.scaler is not None else None,
        'epoch': epoch,
        'best_acc1': best_acc1,
        'args': vars(args),
        **model_meta(run.model, args, run.train_set.classes),
    }, path)


def load_checkpoint(path: str, model: CycleNet, ema, optimizer,
                    scaler: Optional[paddle.amp.GradScaler]) -> dict:
    """Restore a checkpoint into the objects, checked first; returns it."""
    checkpoint = read_checkpoint(path)
    missing = [key for key in ('model', 'optimizer', 'epoch', 'best_acc1') if key not in checkpoint]
    if missing:
        raise WeightsError(f'{path}: not a training checkpoint of train.py (no {", ".join(missing)})')
    if type(checkpoint['epoch']) is not int or checkpoint['epoch'] < 0:
        raise WeightsError(f'{path}: epoch is {describe(checkpoint["epoch"])}, expected a count of epochs')
    best = checkpoint['best_acc1']
    if type(best) not in (int, float) or not 0 <= best <= 100:
        raise WeightsError(f'{path}: best_acc1 is {describe(best)}, expected a percentage')
    load_state(model, check_state(path, checkpoint['model']), source=path)
    if ema is not None:
        # A checkpoint of a run without EMA starts the average from the restored weights.
        ema_state = checkpoint.get('model_ema')
        load_state(ema.module, check_state(path, ema_state if ema_state is not None else checkpoint['model']),
                   source=path)
    load_optimizer_state(optimizer, model, checkpoint['optimizer'], path)
    if scaler is not None and checkpoint.get('scaler'):
        if not isinstance(checkpoint['scaler'], dict):
            raise WeightsError(f'{path}: scaler is {describe(checkpoint["scaler"])}, expected a dict')
        scaler.load_state_dict(checkpoint['scaler'])
    return checkpoint


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
    """Create --output-dir; with --overwrite remove its run; remove what a killed write left."""
    os.makedirs(args.output_dir, exist_ok=True)
    if args.overwrite:
        for name in RUN_FILES:
            if os.path.exists(os.path.join(args.output_dir, name)):
                os.remove(os.path.join(args.output_dir, name))
    for name in (CHECKPOINT_FILE, BEST_FILE):
        remove_stale_temporaries(os.path.join(args.output_dir, name))


def changes(checkpoint: dict, args: argparse.Namespace, class_names: List[str]) -> List[str]:
    """How this run's input size, evaluation transform and class names differ from the
    checkpoint's (other model shapes do not load at all)."""
    recorded = checkpoint.get('data_config') or {}
    asked = dict(input_size=args.input_size, crop_pct=args.crop_pct, interpolation=args.eval_interpolation)
    differences = [f'{key} {asked[key]} (the checkpoint: {value})' for key, value in recorded.items()
                   if key in asked and asked[key] != value]
    recorded_names, names = checkpoint.get('class_names'), list(class_names)
    recorded_names = recorded_names if isinstance(recorded_names, list) else None
    if recorded_names not in (None, names):
        if len(recorded_names) != len(names):
            differences.append(f'{len(names)} classes (the checkpoint: {len(recorded_names)})')
        else:
            index = next(i for i, (a, b) in enumerate(zip(names, recorded_names)) if a != b)
            differences.append(f'class {index} is {describe(names[index])} (the checkpoint: '
                               f'{describe(recorded_names[index])})')
    return differences


def json_line(entry: dict) -> str:
    """One log.txt line; a value that is not finite is written as null, so the file stays JSON."""
    return json.dumps({key: value if not isinstance(value, float) or math.isfinite(value) else None
                       for key, value in entry.items()}, allow_nan=False)
