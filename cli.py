"""What every command shares: the flags of the model and its data, the distributed set-up,
and one way to end.

Imported first by every command (train, evaluate, predict, export, convert_weights, benchmark),
it imports Paddle without Paddle's import-time notices (see `_import_paddle_quietly`). Each
command's main() sets the CPU up first (cpu_setup.configure), and its `__main__` calls
`run(main, args)`, which ends every user error (a file, the data, the environment) as one line
on stderr with exit code 1, and Ctrl-C or SIGTERM as one line with 128 + the signal's number
(temporary files are removed on the way out; `held_signals` keeps a write whole). Flags out of
range are argparse's errors (exit code 2).
"""
import argparse
import contextlib
import fcntl
import io
import logging
import math
import os
import signal
import sys
import warnings
from typing import Callable, List, Optional

# Notices Paddle prints on import that say nothing to a user of the commands: its warning that
# OMP_NUM_THREADS is above 1 (the commands honour that setting; see cpu_setup.py), and Paddle 3's
# note that ccache, a compiler cache for building C++ extensions, is missing.
PADDLE_IMPORT_NOISE = ('WARNING: OMP_NUM_THREADS set to', 'PLEASE USE OMP_NUM_THREADS WISELY.')
PADDLE_IMPORT_WARNING = 'No ccache found'


def _import_paddle_quietly() -> None:
    """Import Paddle with the notices above dropped and anything else it prints passed on."""
    if 'paddle' in sys.modules:
        return
    import zlib  # noqa: F401  before Paddle: Paddle 2.6 bundles a zlib that crashes one loaded after it
    printed = io.StringIO()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(printed):
            warnings.simplefilter('always')
            import paddle  # noqa: F401
    finally:
        # Paddle's loggers made their StreamHandlers during the import, on the stderr of then.
        for logger in [logging.getLogger()] + list(logging.Logger.manager.loggerDict.values()):
            for handler in getattr(logger, 'handlers', []):
                if isinstance(handler, logging.StreamHandler) and handler.stream is printed:
                    handler.setStream(sys.stderr)
        for line in printed.getvalue().splitlines(keepends=True):
            if not line.startswith(PADDLE_IMPORT_NOISE):
                sys.stderr.write(line)
    for warning in caught:
        if PADDLE_IMPORT_WARNING not in str(warning.message):
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


_import_paddle_quietly()

import paddle  # noqa: E402
import paddle.distributed as dist  # noqa: E402

import cpu_setup  # noqa: E402
from cyclemlp import ARCHITECTURES  # noqa: E402
from data import DEFAULT_CROP_PCT, EVAL_DEFAULTS, INTERPOLATIONS, DatasetError  # noqa: E402
from weights import CROP_PCT_RANGE, INPUT_SIZE_RANGE, WeightsError, check_data_config, one_line  # noqa: E402


# Flags

def bounded(kind: type, low=None, high=None, low_open: bool = False, high_open: bool = False):
    """An argparse type: `kind` (int or float) parsed, finite and within [low, high] (an open
    end excludes it); out of range is argparse's own error, naming the flag."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            expected = 'an integer' if kind is int else 'a number'
            raise argparse.ArgumentTypeError(f'expected {expected}, got {text!r}') from None
        if not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) \
                or (high is not None and (value >= high if high_open else value > high)):
            interval = ('(' if low_open else '[') + f'{low if low is not None else "-inf"}, ' \
                       f'{high if high is not None else "inf"}' + (')' if high_open else ']')
            raise argparse.ArgumentTypeError(f'expected a value in {interval}, got {text}')
        return value
    parse.__name__ = kind.__name__   # argparse names the type in its messages
    return parse


def device_name(text: str) -> str:
    """An argparse type: a device as Paddle names it ('cpu', 'gpu', 'gpu:N'), from that or from
    PyTorch's name ('cuda', 'cuda:N')."""
    name = 'gpu' + text[len('cuda'):] if text.startswith('cuda') else text
    if not (name in ('cpu', 'gpu') or (name.startswith('gpu:') and name[4:].isdigit() and len(name) < 10)):
        raise argparse.ArgumentTypeError(f'expected cpu, gpu, gpu:N, cuda or cuda:N, got {text[:40]!r}')
    return name


def model_args_parser(training: bool = False) -> argparse.ArgumentParser:
    """The model, its evaluation transform and the CPU threads: every command's flags.

    For evaluation, prediction and export the defaults are None, meaning "what the weights
    file records" (resolve_data_config); for training, the model to train and EVAL_DEFAULTS.
    """
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    group = parser.add_argument_group('model and evaluation transform')
    recorded = '' if training else 'as recorded in the weights, else '
    group.add_argument('--model', default='CycleMLP_B1' if training else None,
                       choices=list(ARCHITECTURES), metavar='NAME',
                       help=f'architecture, one of {", ".join(ARCHITECTURES)} (default: '
                            + ('CycleMLP_B1)' if training else 'the one the weights file records)'))
    group.add_argument('--input-size', '--input_size', type=bounded(int, *INPUT_SIZE_RANGE),
                       default=EVAL_DEFAULTS['input_size'] if training else None,
                       help=f'side of the square image the model sees, in {list(INPUT_SIZE_RANGE)} '
                            f'(default: {recorded}{EVAL_DEFAULTS["input_size"]})')
    group.add_argument('--crop-pct', '--crop_pct', type=bounded(float, *CROP_PCT_RANGE),
                       default=DEFAULT_CROP_PCT if training else None,
                       help='evaluation resizes the shorter side to input_size / crop_pct, then '
                            f'center-crops input_size; in {list(CROP_PCT_RANGE)} (default: '
                            f'{recorded}{DEFAULT_CROP_PCT})')
    # dest is the name the evaluation transform reads; train.py has its own --train-interpolation.
    group.add_argument('--interpolation', '--eval-interpolation', dest='eval_interpolation',
                       default='bicubic' if training else None, choices=list(INTERPOLATIONS),
                       help=f'resampling of the evaluation resize (default: {recorded}bicubic)')
    group.add_argument('--device', type=device_name, default=None,
                       help='cpu, gpu (under the launcher: each rank\'s own GPU) or gpu:N; cuda and '
                            'cuda:N, the official spellings, are the same (default: Paddle\'s '
                            'default device, a GPU when Paddle has CUDA and one is visible)')
    group.add_argument('--threads', type=bounded(int, 1, cpu_setup.MAX_THREADS), default=None,
                       help='CPU threads of the compute kernels; no effect on GPU (default: '
                            'OMP_NUM_THREADS if set, else every core this process may use, '
                            f'{cpu_setup.available_cores()} here)')
    return parser


def loader_args_parser() -> argparse.ArgumentParser:
    """The data and loader flags train.py and evaluate.py share."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    group = parser.add_argument_group('data')
    group.add_argument('--data-path', '--data_path', default=None,
                       help='dataset root holding train/<class>/ and val/<class>/, or the root '
                            'the list files are relative to (default: None)')
    group.add_argument('--train-list', '--train_list', default=None,
                       help='PaddleClas-style list file "relative/path label" of the training '
                            'set (default: None, use DATA/train/<class>/)')
    group.add_argument('--val-list', '--val_list', default=None,
                       help='list file of the validation set (default: None, use DATA/val/<class>/)')
    group.add_argument('--batch-size', '--batch_size', type=bounded(int, 1), default=64,
                       help='images per batch on each device (default: 64)')
    workers = cpu_setup.default_num_workers()
    group.add_argument('--num-workers', '--num_workers', type=bounded(int, 0), default=workers,
                       help='data loading processes per device; 10 on GPU as in the official '
                            f'main.py, on CPU a quarter of the cores, at least 1 (default: {workers} here)')
    group.add_argument('--seed', type=bounded(int, 0, 2**31 - 1), default=0,
                       help='random seed (default: 0)')
    group.add_argument('--print-freq', '--print_freq', type=bounded(int, 1), default=10,
                       help='log every this many iterations (default: 10)')
    group.add_argument('--to-static', '--to_static', action='store_true',
                       help='run the model\'s forward as a static graph (paddle.jit.to_static), '
                            'as PaddleClas and PaddleSeg name it; on GPU the road to fused kernels '
                            '(default: off)')
    return parser


def static_if(to_static: bool, model: paddle.nn.Layer) -> paddle.nn.Layer:
    """model, its forward converted by paddle.jit.to_static when to_static (--to-static). The
    static graph computes the official layers (fast_layers' eager CPU rules do not apply)."""
    return paddle.jit.to_static(model, full_graph=True) if to_static else model


def resolve_data_config(args: argparse.Namespace, recorded: Optional[dict], source: str) -> None:
    """Fill the evaluation-transform flags left unset (None) with what `source` recorded (a
    checkpoint's data_config, from train.py), else EVAL_DEFAULTS; explicit flags win."""
    recorded = check_data_config(recorded or {}, source)
    for dest, key in (('input_size', 'input_size'), ('crop_pct', 'crop_pct'),
                      ('eval_interpolation', 'interpolation')):
        if getattr(args, dest) is None:
            setattr(args, dest, recorded.get(key, EVAL_DEFAULTS[key]))


class InUseError(Exception):
    """An output folder another process is writing."""


@contextlib.contextmanager
def locked(folder: str, flag: str, wait: bool = False):
    """Hold an exclusive lock on the folder itself while the block runs; if another process
    holds it, wait for it, or with wait False raise InUseError at once. The kernel releases the
    lock when the process ends, however it ends, and nothing is left in the folder."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise InUseError(f'{flag} {folder} is in use by another run; wait for it to end') from None
        yield
    finally:
        os.close(descriptor)


# The errors a command reports as one line: what the user gave is wrong, or the system refused.
USER_ERRORS = (WeightsError, DatasetError, OSError, InUseError, cpu_setup.ThreadSettingError,
               cpu_setup.DeviceError, FloatingPointError)


# Distributed set-up

def init_distributed() -> tuple:
    """(rank, world size), joining the launcher's process group when there is one."""
    if dist.get_world_size() > 1:
        dist.init_parallel_env()
    return dist.get_rank(), dist.get_world_size()


# Stopping: Ctrl-C and SIGTERM end a command at once, but not in the middle of a write

stop_requested: List[int] = []
_held = False


def request_stop(signum, frame) -> None:
    """SIGINT or SIGTERM: raise KeyboardInterrupt now, or at the end of a held_signals() block;
    a second signal raises at once."""
    stop_requested.append(signum)
    if not _held or len(stop_requested) > 1:
        raise KeyboardInterrupt


@contextlib.contextmanager
def held_signals():
    """Let Ctrl-C and SIGTERM wait until the block has run: what it writes is written whole."""
    global _held
    previous, _held = _held, True
    try:
        yield
    finally:
        _held = previous
    if stop_requested and not _held:
        raise KeyboardInterrupt


def run(main: Callable[[argparse.Namespace], object], args: argparse.Namespace,
        interrupted: Callable[[], str] = lambda: 'interrupted') -> None:
    """Run a command's main(args) as its __main__ does, and exit: with main's return value if
    that is an exit status, else 0; one line `error: ...` and 1 for a user error; the line
    interrupted() returns and 128 + the signal's number after Ctrl-C or SIGTERM, whatever
    exception the interruption became inside Paddle. Any other exception is one line and 1 too,
    with its type named: no error reaches the user as a traceback. Paddle's own handler for
    SIGTERM (a C++ stack dump) is replaced."""
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        status = main(args)
    except Exception as error:
        if not stop_requested:    # every error, expected or not, ends as one line
            kind = '' if isinstance(error, USER_ERRORS) else f'unexpected {type(error).__name__} (please report it): '
            print(f'error: {kind}{one_line(error, 1000)}', file=sys.stderr)
            sys.exit(1)
    except KeyboardInterrupt:
        pass
    else:
        sys.exit(status if type(status) is int else 0)
    print(interrupted(), file=sys.stderr)
    sys.exit(128 + stop_requested[0])
