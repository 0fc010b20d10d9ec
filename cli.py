"""What every command shares: the model and data flags, the distributed set-up, and one way to end
(`run`): any exception as one line and exit 1, Ctrl-C or SIGTERM as one line and 128 + the signal."""
import argparse
import contextlib
import fcntl
import math
import os
import signal
import sys
import warnings
from typing import Callable, List, Optional

import zlib  # noqa: F401  before Paddle: Paddle 2.6 bundles a zlib that crashes one loaded after it

# Importing Paddle warns on stderr when OMP_NUM_THREADS is above 1 (the commands honour it: see
# cpu_setup.py), Paddle 3 warns that ccache, a compiler cache, is missing, and Paddle's C++ logs
# info and warning lines (glog reads GLOG_minloglevel when Paddle loads; a user's setting wins):
# none concerns a user of the commands, and an error must stay one line.
_user = {name: os.environ.get(name) for name in ('OMP_NUM_THREADS', 'GLOG_minloglevel')}
with warnings.catch_warnings():
    warnings.filterwarnings('ignore', message='No ccache found')
    os.environ.update(OMP_NUM_THREADS='1', GLOG_minloglevel=_user['GLOG_minloglevel'] or '2')
    import paddle
os.environ.update({name: value for name, value in _user.items() if value is not None})
if _user['GLOG_minloglevel'] is None:
    del os.environ['GLOG_minloglevel']
import paddle.distributed as dist  # noqa: E402

import cpu_setup  # noqa: E402
from cyclemlp import ARCHITECTURES  # noqa: E402
from data import DEFAULT_CROP_PCT, EVAL_DEFAULTS, INTERPOLATIONS, DatasetError  # noqa: E402
from safe_io import WeightsError, one_line  # noqa: E402
from weights import CROP_PCT_RANGE, INPUT_SIZE_RANGE  # noqa: E402


# Flags

def bounded(kind: type, low=-math.inf, high=math.inf, low_open: bool = False, high_open: bool = False):
    """An argparse type: `kind` parsed, finite and within [low, high] (an open end excludes it)."""
    interval = ('(' if low_open else '[') + f'{low}, {high}' + (')' if high_open else ']')

    def parse(text: str):
        value = kind(text)   # a ValueError is argparse's "invalid int value: 'x'", by parse.__name__
        # An int is finite (and math.isfinite would overflow on one of 400 digits).
        if not ((kind is int or math.isfinite(value)) and (low < value if low_open else low <= value)
                and (value < high if high_open else value <= high)):
            raise argparse.ArgumentTypeError(f'expected a value in {interval}, got {text[:40]}')
        return value
    parse.__name__ = kind.__name__
    return parse


def device_name(text: str) -> str:
    """An argparse type: 'cpu', 'gpu' or 'gpu:N', also spelled as PyTorch does ('cuda', 'cuda:N')."""
    name = 'gpu' + text[len('cuda'):] if text.startswith('cuda') else text
    if not (name in ('cpu', 'gpu') or (name.startswith('gpu:') and name[4:].isdigit() and len(name) < 10)):
        raise argparse.ArgumentTypeError(f'expected cpu, gpu, gpu:N, cuda or cuda:N, got {text[:40]!r}')
    return name


def model_args_parser(training: bool = False) -> argparse.ArgumentParser:
    """Every command's flags: the model, its evaluation transform, the device and threads."""
    # Except for training the defaults are None: what the weights file records (resolve_data_config).
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    group = parser.add_argument_group('model and evaluation transform')
    recorded = '' if training else 'as recorded in the weights, else '
    group.add_argument('--model', default='CycleMLP_B1' if training else None, choices=list(ARCHITECTURES),
                       metavar='NAME', help=f'architecture, one of {", ".join(ARCHITECTURES)} (default: '
                       + ('CycleMLP_B1)' if training else 'the one the weights file records)'))
    group.add_argument('--input-size', '--input_size', type=bounded(int, *INPUT_SIZE_RANGE),
                       default=EVAL_DEFAULTS['input_size'] if training else None, help='side of the square '
                       f'image the model sees (default: {recorded}{EVAL_DEFAULTS["input_size"]})')
    group.add_argument('--crop-pct', '--crop_pct', type=bounded(float, *CROP_PCT_RANGE),
                       default=DEFAULT_CROP_PCT if training else None, help='evaluation resizes to input_size '
                       f'/ crop_pct, then center-crops input_size (default: {recorded}{DEFAULT_CROP_PCT})')
    # dest is the name the evaluation transform reads; train.py has its own --train-interpolation.
    group.add_argument('--interpolation', '--eval-interpolation', dest='eval_interpolation',
                       default='bicubic' if training else None, choices=list(INTERPOLATIONS),
                       help=f'resampling of the evaluation resize (default: {recorded}bicubic)')
    group.add_argument('--device', type=device_name, help='cpu, gpu (under the launcher: each rank\'s own) '
                       'or gpu:N, also spelled cuda (default: a GPU if Paddle has CUDA and one is visible)')
    cores = cpu_setup.available_cores()
    group.add_argument('--threads', type=bounded(int, 1, cpu_setup.MAX_THREADS),
                       help=f'CPU compute threads (default: OMP_NUM_THREADS, else every core: {cores} here)')
    return parser


def loader_args_parser(data_required: bool = False) -> argparse.ArgumentParser:
    """The data and loader flags train.py and evaluate.py share."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    group = parser.add_argument_group('data')
    group.add_argument('--data-path', '--data_path', required=data_required, help='the folder of '
                       'train/<class>/ and val/<class>/, or the root of the list files (default: None)')
    group.add_argument('--train-list', '--train_list', help='PaddleClas-style list file "relative/path label" '
                       'of the training set (default: None, DATA/train/<class>/)')
    group.add_argument('--val-list', '--val_list', help='list file of the validation set (default: None, '
                       'DATA/val/<class>/)')
    group.add_argument('--batch-size', '--batch_size', type=bounded(int, 1), default=64,
                       help='images per batch on each device (default: 64)')
    workers = cpu_setup.default_num_workers()
    group.add_argument('--num-workers', '--num_workers', type=bounded(int, 0), default=workers,
                       help=f'loader processes per device: 10 on GPU, else cores / 4 (default: {workers})')
    group.add_argument('--seed', type=bounded(int, 0, 2**31 - 1), default=0, help='random seed (default: 0)')
    group.add_argument('--print-freq', '--print_freq', type=bounded(int, 1), default=10,
                       help='log every this many iterations (default: 10)')
    group.add_argument('--to-static', '--to_static', action='store_true',
                       help='run the forward as a static graph (paddle.jit.to_static) (default: off)')
    return parser


def static_if(to_static: bool, model: paddle.nn.Layer) -> paddle.nn.Layer:
    """model, converted by paddle.jit.to_static when to_static (the official layers' graph)."""
    return paddle.jit.to_static(model, full_graph=True) if to_static else model


def resolve_data_config(args: argparse.Namespace, recorded: Optional[dict]) -> None:
    """Fill the evaluation-transform flags left None with the recorded data_config, else EVAL_DEFAULTS."""
    # The readers checked `recorded` (weights.check_meta, export.read_meta).
    for dest, key in (('input_size', 'input_size'), ('crop_pct', 'crop_pct'),
                      ('eval_interpolation', 'interpolation')):
        if getattr(args, dest) is None:
            setattr(args, dest, (recorded or {}).get(key, EVAL_DEFAULTS[key]))


@contextlib.contextmanager
def locked(folder: str, flag: str, wait: bool = False):
    """An exclusive lock on the folder itself while the block runs (else wait, or an OSError)."""
    # The kernel releases it when the process ends, however it ends; nothing is left in the folder.
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise OSError(f'{flag} {folder} is in use by another run; wait for it to end') from None
        yield
    finally:
        os.close(descriptor)


# The errors a command reports as one line: what the user gave is wrong, or the system refused.
USER_ERRORS = (WeightsError, DatasetError, OSError, cpu_setup.ThreadSettingError, cpu_setup.DeviceError,
               FloatingPointError)


# Distributed set-up

def init_distributed() -> tuple:
    """(rank, world size), joining the launcher's process group when there is one."""
    if dist.get_world_size() > 1:
        dist.init_parallel_env()
    return dist.get_rank(), dist.get_world_size()


# Stopping: Ctrl-C and SIGTERM end a command at once

stop_requested: List[int] = []
deferring: List[bool] = []


def request_stop(signum, frame) -> None:
    stop_requested.append(signum)
    if not deferring or len(stop_requested) > 1:   # a second signal does not wait
        raise KeyboardInterrupt


@contextlib.contextmanager
def signals_deferred():
    """Ctrl-C or SIGTERM waits until the block has run (files that must agree; C++ calling Python)."""
    # Not the kernel's signal mask: the kernel hands a signal the main thread blocks to another
    # thread (Paddle's compute threads), and Python then runs the handler in the main thread.
    deferring.append(True)
    try:
        yield
    finally:
        deferring.pop()
    if stop_requested and not deferring:
        raise KeyboardInterrupt


def run(main: Callable[[argparse.Namespace], object], args: argparse.Namespace,
        interrupted: Callable[[], str] = lambda: 'interrupted') -> None:
    """Run main(args) and exit: its status (an int, else 0); any exception as one line and 1; after
    Ctrl-C or SIGTERM, whatever exception it became in Paddle, interrupted()'s line and 128 + signal."""
    # Paddle's own SIGTERM handler (a C++ stack dump) is replaced.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, request_stop)
    try:
        status = main(args)
    except Exception as error:
        if not stop_requested:    # every error, expected or not, ends as one line
            expected = isinstance(error, USER_ERRORS)
            kind = '' if expected else f'unexpected {type(error).__name__} (please report it): '
            print(f'error: {kind}{one_line(error, 1000)}', file=sys.stderr)
            sys.exit(1)
    except KeyboardInterrupt:
        pass
    else:
        sys.exit(status if type(status) is int else 0)
    print(interrupted(), file=sys.stderr)
    sys.exit(128 + stop_requested[0])
