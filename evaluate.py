"""Evaluate a CycleMLP checkpoint on an ImageNet-style validation set: top-1, top-5 and loss.

    python evaluate.py --weights CycleMLP_B1.pth --data-path /data/imagenet
    ...
    * Acc@1 78.900 Acc@5 94.500 loss 0.912

The weights may be anything `cyclemlp.create_model` reads (the official .pth release, a
.pdparams, a .safetensors file, a training checkpoint; `--ema` for its EMA weights); the model
name is taken from the file when it records one. The evaluation transform is the official one
(data.eval_transform). Under `python -m paddle.distributed.launch` every rank evaluates its own
shard and the sums are reduced, so each validation image counts exactly once.

train.py imports `evaluate` (the loop) and `common_args_parser` (the shared flags) from here;
predict.py and export.py reuse `model_args_parser`.
"""
import argparse
import datetime
import json
import sys
import threading
import time
from typing import Callable, Dict, Optional, Tuple

import cpu_setup  # first: sets up the CPU before Paddle loads (threads, MKL, memory)
import paddle
import paddle.distributed as dist
import paddle.nn.functional as F

from cyclemlp import MODELS, create_model
from data import DEFAULT_CROP_PCT, INTERPOLATIONS, DatasetError, build_dataset, build_loader
from weights import WeightsError

DEFAULT_TRAIN_MODEL = 'CycleMLP_B1'
DEFAULT_INPUT_SIZE = 224
DATA_DEFAULTS = dict(input_size=DEFAULT_INPUT_SIZE, crop_pct=DEFAULT_CROP_PCT, interpolation='bicubic')
DEFAULT_BATCH_SIZE = 64
DEFAULT_PRINT_FREQ = 10
TOP_K = 5
USAGE_ERROR = 2  # exit code for a bad file, folder or flag, as argparse uses
# What Paddle's DataLoader raises in the main process when a worker's dataset raised.
LOADER_FAILED = 'Blocking queue is killed'


def model_args_parser(training: bool = False) -> argparse.ArgumentParser:
    """The model and its evaluation transform; shared by train, evaluate, predict and export.

    For evaluation, prediction and export every default is None, meaning "what the weights file
    records" (resolve_data_config); for training they are the model to train and DATA_DEFAULTS.
    """
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group('model and evaluation transform')
    recorded = '' if training else 'as recorded in the weights, else '
    group.add_argument('--model', default=DEFAULT_TRAIN_MODEL if training else None,
                       choices=list(MODELS), metavar='NAME',
                       help=f'architecture, one of {", ".join(MODELS)} (default: '
                            + (f'{DEFAULT_TRAIN_MODEL})' if training else 'the one the weights file records)'))
    group.add_argument('--input-size', '--input_size', type=int,
                       default=DEFAULT_INPUT_SIZE if training else None,
                       help=f'side of the square image the model sees (default: {recorded}{DEFAULT_INPUT_SIZE})')
    group.add_argument('--crop-pct', '--crop_pct', type=float, default=DEFAULT_CROP_PCT if training else None,
                       help='evaluation resizes the shorter side to input_size / crop_pct, then '
                            f'center-crops input_size (default: {recorded}{DEFAULT_CROP_PCT})')
    # dest is the name data.build_dataset reads; train.py has its own --train-interpolation.
    group.add_argument('--interpolation', '--eval-interpolation', dest='eval_interpolation',
                       default='bicubic' if training else None, choices=list(INTERPOLATIONS),
                       help=f'resampling of the evaluation resize (default: {recorded}bicubic)')
    parser.add_argument('--threads', type=positive_int, default=None,
                        help='CPU threads of the compute kernels; no effect on GPU (default: '
                             'OMP_NUM_THREADS if set, else every core this process may use, '
                             f'{cpu_setup.available_cores()} here)')
    return parser


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
    return value


def resolve_data_config(args: argparse.Namespace, recorded: Optional[dict]) -> None:
    """Fill the evaluation-transform flags left unset with what a weights file recorded (its
    data_config, from train.py), else the ImageNet defaults; explicit flags always win."""
    recorded = recorded or {}
    for dest, key in (('input_size', 'input_size'), ('crop_pct', 'crop_pct'),
                      ('eval_interpolation', 'interpolation')):
        if getattr(args, dest) is None:
            setattr(args, dest, recorded.get(key, DATA_DEFAULTS[key]))


def common_args_parser(training: bool = False) -> argparse.ArgumentParser:
    """The flags train.py and evaluate.py share: model, transform, data and loader."""
    parser = argparse.ArgumentParser(add_help=False, parents=[model_args_parser(training)])
    group = parser.add_argument_group('data')
    group.add_argument('--data-path', '--data_path', default=None,
                       help='dataset root holding train/<class>/ and val/<class>/, or the root '
                            'the list files are relative to (default: None)')
    group.add_argument('--train-list', '--train_list', default=None,
                       help='PaddleClas-style list file "relative/path label" of the training '
                            'set (default: None, use DATA/train/<class>/)')
    group.add_argument('--val-list', '--val_list', default=None,
                       help='list file of the validation set (default: None, use DATA/val/<class>/)')
    group.add_argument('--batch-size', '--batch_size', type=int, default=DEFAULT_BATCH_SIZE,
                       help=f'images per batch on each device (default: {DEFAULT_BATCH_SIZE})')
    group.add_argument('--num-workers', '--num_workers', type=int, default=cpu_setup.default_num_workers(),
                       help='data loading processes per device; 10 on GPU as in the official '
                            'main.py, on CPU a quarter of the cores, at least 1 (default: '
                            f'{cpu_setup.default_num_workers()} here)')
    group.add_argument('--seed', type=int, default=0, help='random seed (default: 0)')
    group.add_argument('--print-freq', '--print_freq', type=int, default=DEFAULT_PRINT_FREQ,
                       help=f'log every this many iterations (default: {DEFAULT_PRINT_FREQ})')
    return parser


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        'CycleMLP evaluation', add_help=add_help, parents=[common_args_parser()],
        description='Top-1 / top-5 accuracy and loss of a CycleMLP checkpoint on a validation set.')
    group = parser.add_argument_group('weights and output')
    group.add_argument('--weights', required=True,
                       help='.pth, .pdparams, .safetensors or training checkpoint (.pdckpt) '
                            '(default: required)')
    group.add_argument('--ema', action='store_true',
                       help="evaluate a training checkpoint's EMA weights (default: off)")
    group.add_argument('--json', action='store_true',
                       help='print one JSON object {"acc1", "acc5", "loss", "images"} on stdout; '
                            'progress goes to stderr (default: off)')
    return parser


def setup_distributed() -> Tuple[int, int]:
    """(rank, world size); initialises the parallel environment when started by the launcher."""
    world_size = dist.get_world_size()
    if world_size > 1:
        dist.init_parallel_env()
    return dist.get_rank(), world_size


def format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


@paddle.no_grad()
def evaluate(model: paddle.nn.Layer, loader, print_freq: int = DEFAULT_PRINT_FREQ,
             amp_dtype: Optional[str] = None, log: Callable[[str], None] = print,
             header: str = 'Test:') -> Dict[str, float]:
    """Top-1 and top-5 accuracy (percent), mean cross-entropy and image count over `loader`.

    Top-5 becomes top-min(5, classes) for models with fewer classes. Sums stay on the device
    during the loop (the host waits for them only at log lines); with several ranks they are
    summed with all_reduce afterwards, so the result covers every rank's shard: the
    evaluation sampler gives each image to exactly one rank. Rank 0 alone logs, through `log`.
    amp_dtype ('float16' or 'bfloat16') runs the forward under autocast; the loss is float32.
    The model is put in eval mode and returned to training mode afterwards if it was in it.
    """
    was_training = model.training
    model.eval()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    total_steps = len(loader)
    correct1 = correct5 = loss_sum = None
    images = 0
    start = time.time()
    for step, (batch, labels) in enumerate(loader):
        with paddle.amp.auto_cast(enable=amp_dtype is not None, dtype=amp_dtype or 'float16'):
            logits = model(batch)
        logits = logits.astype('float32')
        labels = labels.reshape([-1, 1]).astype('int64')
        top = paddle.topk(logits, k=min(TOP_K, logits.shape[-1]), axis=1)[1]   # (B, k)
        hits = (top == labels).astype('int64')
        batch_correct1 = hits[:, 0].sum()
        batch_correct5 = hits.sum()
        batch_loss = F.cross_entropy(logits, labels, reduction='sum').astype('float64')
        if correct1 is None:
            correct1, correct5, loss_sum = batch_correct1, batch_correct5, batch_loss
        else:
            correct1, correct5, loss_sum = (correct1 + batch_correct1, correct5 + batch_correct5,
                                            loss_sum + batch_loss)
        images += labels.shape[0]
        if rank == 0 and print_freq > 0 and (step % print_freq == 0 or step == total_steps - 1):
            elapsed = time.time() - start
            eta = elapsed / (step + 1) * (total_steps - step - 1)
            log(f'{header} [{step + 1:>{len(str(total_steps))}}/{total_steps}] eta {format_eta(eta)} '
                f'acc1 {100.0 * float(correct1) / images:.3f} acc5 {100.0 * float(correct5) / images:.3f} '
                f'loss {float(loss_sum) / images:.4f} {images / max(elapsed, 1e-9):.0f} img/s')
    if correct1 is None:  # this rank had no images (more ranks than images)
        correct1 = correct5 = paddle.zeros([], dtype='int64')
        loss_sum = paddle.zeros([], dtype='float64')
    totals = paddle.concat([paddle.stack([correct1, correct5]).astype('float64'),
                            loss_sum.reshape([1]), paddle.to_tensor([images], dtype='float64')])
    if world_size > 1:
        dist.all_reduce(totals)
    correct1, correct5, loss_sum, images = totals.numpy().tolist()
    images = int(images)
    if images == 0:
        raise ValueError('evaluate: the loader yielded no images')
    stats = dict(acc1=100.0 * correct1 / images, acc5=100.0 * correct5 / images,
                 loss=loss_sum / images, images=images)
    if rank == 0:
        log(f'* Acc@1 {stats["acc1"]:.3f} Acc@5 {stats["acc5"]:.3f} loss {stats["loss"]:.3f}')
    if was_training:
        model.train()
    return stats


def check_classes(model, dataset, args) -> Optional[str]:
    """Raise DatasetError if the data has labels the model cannot predict; return a warning
    when the class names recorded in the weights differ from the data's."""
    if args.val_list:
        labels = max(label for _, label in dataset.samples) + 1
        if labels > model.num_classes:
            raise DatasetError(f'{args.val_list}: labels go up to {labels - 1} but the weights '
                               f'{args.weights} have {model.num_classes} classes')
    elif len(dataset.classes) != model.num_classes:
        raise DatasetError(f'the validation set has {len(dataset.classes)} classes but the '
                           f'weights {args.weights} have {model.num_classes}')
    if model.class_names and model.class_names[:len(dataset.classes)] != list(dataset.classes):
        return (f'warning: the class names stored in {args.weights} differ from the validation '
                f"set's ({model.class_names[:3]}... vs {list(dataset.classes)[:3]}...); "
                'labels are matched by index')
    return None


def main(args: argparse.Namespace) -> Dict[str, float]:
    if args.data_path is None:
        raise DatasetError('--data-path is required: the folder holding val/<class>/ '
                           '(or the root of --val-list)')
    cpu_setup.set_threads(args.threads)
    rank, world_size = setup_distributed()
    model = create_model(args.model, weights=args.weights, ema=args.ema)
    resolve_data_config(args, model.data_config)
    dataset = build_dataset(is_train=False, args=args)
    warning = check_classes(model, dataset, args)
    if warning and rank == 0:
        print(warning, file=sys.stderr)
    loader = build_loader(dataset, is_train=False, batch_size=args.batch_size,
                          num_workers=args.num_workers, num_replicas=world_size, rank=rank,
                          seed=args.seed)
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else print
    if rank == 0:
        log(f'{args.weights}{" (EMA)" if args.ema else ""}: {len(dataset)} images, '
            f'{model.num_classes} classes, {world_size} process{"es" if world_size > 1 else ""}')
    stats = evaluate(model, loader, print_freq=args.print_freq, log=log)
    if args.json and rank == 0:
        print(json.dumps(stats), flush=True)
    return stats


def report_loader_error(hook_args) -> None:
    """threading.excepthook: one line for an image a DataLoader worker could not read.

    With worker processes, Paddle re-raises the worker's error in a loader thread (whose
    message is the worker's whole traceback) and the main thread gets a SystemError; the
    last line of that message is the DatasetError naming the file.
    """
    lines = str(hook_args.exc_value).strip().splitlines()
    print(f'error: {lines[-1] if lines else hook_args.exc_type.__name__}', file=sys.stderr)


if __name__ == '__main__':
    arguments = get_args_parser().parse_args()
    threading.excepthook = report_loader_error
    try:
        main(arguments)
    except (WeightsError, DatasetError) as error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(USAGE_ERROR)
    except SystemError as error:
        if LOADER_FAILED not in str(error):
            raise
        sys.exit(USAGE_ERROR)  # report_loader_error has printed the reason
