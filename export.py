"""Export a CycleMLP checkpoint for deployment, and read an export back (predict.py does).

    python export.py --weights CycleMLP_B1.pth --output exported/ [--dynamic-size] [--onnx]

writes model.json (Paddle 3) or model.pdmodel (Paddle 2.x) and model.pdiparams for Paddle Inference,
model.onnx with --onnx, and meta.json (model, transform, class names, checks, each file's sha256).
Input: float32 'images' (N, 3, S, S) as data.eval_transform gives; output: logits. Nothing is put in
place before every runtime gives the eager logits within PARITY_TOLERANCE on the CPU (no TF32 there).
An earlier export's files are replaced only by a complete one; other files are never touched.
"""
import argparse
import contextlib
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from typing import Callable, Iterator, List, Optional, Sequence

import cli  # first: imports Paddle without its import-time notices
import cpu_setup
import fast_layers
import numpy as np
import paddle

from cli import bounded, locked, model_args_parser, resolve_data_config, signals_deferred
from cyclemlp import CycleNet
from data import IMAGENET_MEAN, IMAGENET_STD
from safe_io import WeightsError, describe, one_line, open_regular_file, printable, sha256_of
from weights import MAX_CLASSES, check_data_config
from zoo import load_model, variant_name

IMAGENET_CLASSES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'imagenet_classes.txt')
IMAGENET_NUM_CLASSES = 1000
MODEL_FILES = ('model.json', 'model.pdmodel')   # what paddle.jit.save writes: Paddle 3 PIR, Paddle 2.x
PARAMS_FILE = 'model.pdiparams'
ONNX_FILE = 'model.onnx'
META_FILE = 'meta.json'
EXPORT_FILES = MODEL_FILES + (PARAMS_FILE, ONNX_FILE)   # meta.json records their sha256
MAX_META_BYTES = 16 << 20   # 100,000 class names of 100 characters would be 10 MiB
RUNTIMES = ('paddle', 'onnx')
DEFAULT_OPSET = 13
INPUT_NAME = 'images'
PARITY_TOLERANCE = 1e-4    # of the largest eager logit
CHECK_BATCH = 2
CHECK_DEVICE = 'cpu'       # where exports are checked: no TF32 there (see the module doc)
# The runtimes' settings predict.py and benchmark.py run exports with, each measured on B1 at
# 224, batch 1 and 16, 2 threads (docs/deployment.md):
PADDLE_INFERENCE_SETTINGS = dict(
    onednn=True,     # oneDNN's fc, matmul, conv and layer_norm kernels: 1.2x oneDNN off at batch 16, 1.1x at 1
    ir_optim=True,   # its fusions (matmul + bias -> fc, conv + bias): measured equal to IR off; its default
)
ONNXRUNTIME_SETTINGS = dict(
    graph_optimization_level='ORT_ENABLE_ALL',   # LayerNorm, BiasGelu fused, NCHWc convolutions: 1.2x DISABLE_ALL
    allow_spinning=False,   # threads that spin after a run take the cores from what runs next
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        'CycleMLP export', parents=[model_args_parser()], allow_abbrev=False,
        description='Write a Paddle inference model (and optionally ONNX) of a checkpoint.')
    parser.add_argument('--weights', required=True,
                        help='.pth, .pdparams, .safetensors or checkpoint, or a model name (CycleMLP_B1 ..) '
                             'for its official weights, downloaded once (default: required)')
    parser.add_argument('--ema', action='store_true',
                        help="export a training checkpoint's EMA weights (default: off)")
    parser.add_argument('--output', required=True, metavar='DIR',
                        help='folder to write; an earlier export there is replaced once the new one is '
                             'complete, other files stay (default: required)')
    parser.add_argument('--dynamic-size', action='store_true',
                        help='accept any input height and width, not only --input-size (default: off)')
    parser.add_argument('--onnx', action='store_true',
                        help=f'also write {ONNX_FILE} with paddle2onnx (default: off)')
    parser.add_argument('--opset', type=bounded(int, 9, 20), default=DEFAULT_OPSET,
                        help=f'ONNX opset version (default: {DEFAULT_OPSET})')
    return parser


def default_class_names(stored: Optional[Sequence[str]], num_classes: int) -> Optional[List[str]]:
    """The names a weights file stores, else ImageNet-1k's for a 1000-class model (timm's list), else None."""
    if stored and len(stored) == num_classes:
        return list(stored)
    if num_classes == IMAGENET_NUM_CLASSES:
        with open(IMAGENET_CLASSES_FILE, encoding='utf-8') as lines:
            return [line.rstrip('\n') for line in lines]
    return None


# Reading an export, an untrusted folder: meta.json is read with a bound and checked, the model
# files must have the sha256 it records, and the model must run on the size and classes it records.

def read_meta(directory: str) -> dict:
    """DIR/meta.json, checked to be what export.py writes, before anything runs, is replaced or deleted."""
    path = os.path.join(directory, META_FILE)
    with open_regular_file(path, MAX_META_BYTES) as file:
        try:
            meta = json.loads(file.read())
        except (ValueError, RecursionError):
            raise WeightsError(f'{path}: not JSON of sane depth, not what export.py writes') from None
    if not isinstance(meta, dict):
        raise WeightsError(f'{path}: expected a JSON object, found {describe(meta)}')
    checks = {'num_classes': lambda v: type(v) is int and 1 <= v <= MAX_CLASSES,
              'dynamic_size': lambda v: isinstance(v, bool),
              'class_names': lambda v: v is None or (isinstance(v, list) and len(v) == meta.get('num_classes')
                                                     and all(isinstance(n, str) and len(n) < 1000 for n in v)),
              'files': lambda v: isinstance(v, dict) and PARAMS_FILE in v and set(v) <= set(EXPORT_FILES)
              and sum(name in v for name in MODEL_FILES) == 1 and all(
                  isinstance(h, str) and len(h) == 64 and set(h) <= set('0123456789abcdef') for h in v.values())}
    for key, valid in checks.items():
        if key not in meta or not valid(meta[key]):
            raise WeightsError(f'{path}: {key} is {describe(meta.get(key))}, not what export.py writes'
                               + ('; export again with this version' if key == 'files' else ''))
    check_data_config({key: meta.get(key) for key in ('input_size', 'crop_pct', 'interpolation')}, path)
    return meta


@contextlib.contextmanager
def native_stdout_dropped() -> Iterator[None]:
    """fd 1 on /dev/null in the block: Paddle 3.3 and paddle2onnx print progress on stdout from C++."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, 'wb') as null:
        os.dup2(null.fileno(), 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def checked_bytes(directory: str, meta: dict, name: str) -> bytes:
    """DIR/name's bytes, read once, if they have meta.json's sha256; the runtimes load these very bytes."""
    path = os.path.join(directory, name)
    if name not in meta['files']:
        raise WeightsError(f'{directory}: this export has no {name}'
                           + ('; export with --onnx' if name == ONNX_FILE else ''))
    with open_regular_file(path) as file:
        data = file.read()
    if hashlib.sha256(data).hexdigest() != meta['files'][name]:
        raise WeightsError(f'{path}: not the file meta.json records (another export\'s, or damaged); '
                           'export again')
    return data


def model_file(names) -> str:
    return next(name for name in MODEL_FILES if name in names)


def probed(run: Callable[[np.ndarray], np.ndarray], directory: str, meta: dict, runtime: str,
           size: Optional[int] = None) -> Callable[[np.ndarray], np.ndarray]:
    """run, once it gave meta.json's class count for an image of the size it will be asked for."""
    asked = size or meta['input_size']
    try:
        logits = run(np.zeros((1, 3, asked, asked), np.float32))
    except Exception as error:   # the runtimes' own error types
        source = 'meta.json records' if asked == meta['input_size'] else 'it is asked for (meta.json: dynamic_size true)'
        raise WeightsError(f'{directory}: the model does not run in {runtime} on the {asked}x{asked} '
                           f'images {source} ({one_line(error)})') from None
    if logits.shape != (1, meta['num_classes']):
        raise WeightsError(f'{directory}: the model gives {list(logits.shape)[1:]} outputs per image, '
                           f'meta.json records {meta["num_classes"]} classes')
    return run


def paddle_runner(directory: str, default_config: bool = False,
                  size: Optional[int] = None) -> Callable[[np.ndarray], np.ndarray]:
    """Paddle Inference on Paddle's device; on the CPU with PADDLE_INFERENCE_SETTINGS or the default Config."""
    meta = read_meta(directory)
    device = paddle.get_device()
    names = model_file(meta['files']), PARAMS_FILE
    # The checked bytes, in a private folder (mode 0700) create_predictor reads: Paddle 3.3 crashes
    # reading a model.json from memory.
    with tempfile.TemporaryDirectory(prefix='cyclemlp-export.') as private:
        for name in names:
            with open(os.path.join(private, name), 'wb') as file:
                file.write(checked_bytes(directory, meta, name))
        config = paddle.inference.Config(*(os.path.join(private, name) for name in names))
        config.disable_glog_info()
        if device.startswith('gpu'):
            config.enable_use_gpu(256, int(device.partition(':')[2] or 0))
            settings = dict(device=device)
        else:
            config.set_cpu_math_library_num_threads(cpu_setup.current_threads())
            settings = dict(device='cpu', threads=cpu_setup.current_threads())
            if default_config:
                settings['config'] = 'default'
            else:
                config.enable_mkldnn() if PADDLE_INFERENCE_SETTINGS['onednn'] else config.disable_mkldnn()
                config.switch_ir_optim(PADDLE_INFERENCE_SETTINGS['ir_optim'])
                settings.update(PADDLE_INFERENCE_SETTINGS)
        try:
            predictor = paddle.inference.create_predictor(config)
        except Exception as error:  # Paddle raises its own C++ error types for a damaged model
            raise WeightsError(f'{directory}: Paddle Inference cannot load the model ({one_line(error)})') from None
    images = predictor.get_input_handle(predictor.get_input_names()[0])
    logits = predictor.get_output_handle(predictor.get_output_names()[0])

    def run(batch: np.ndarray) -> np.ndarray:
        images.reshape(batch.shape)
        images.copy_from_cpu(np.ascontiguousarray(batch, dtype=np.float32))
        predictor.run()
        return logits.copy_to_cpu()

    run.settings = settings
    with native_stdout_dropped():   # oneDNN checks each mean op at the first run
        return probed(run, directory, meta, 'Paddle Inference', size)


def onnx_runner(directory: str, size: Optional[int] = None) -> Callable[[np.ndarray], np.ndarray]:
    """Logits of a batch from ONNX Runtime's CPU provider with ONNXRUNTIME_SETTINGS (run.settings)."""
    meta = read_meta(directory)
    model = checked_bytes(directory, meta, ONNX_FILE)
    try:
        import onnxruntime
    except ImportError:
        raise WeightsError('--runtime onnx needs onnxruntime: pip install onnxruntime') from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = cpu_setup.current_threads()
    options.graph_optimization_level = getattr(onnxruntime.GraphOptimizationLevel,
                                               ONNXRUNTIME_SETTINGS['graph_optimization_level'])
    options.add_session_config_entry('session.intra_op.allow_spinning',
                                     '1' if ONNXRUNTIME_SETTINGS['allow_spinning'] else '0')
    try:
        session = onnxruntime.InferenceSession(model, options, providers=['CPUExecutionProvider'])
    except Exception as error:  # onnxruntime's own exception types
        raise WeightsError(f'{os.path.join(directory, ONNX_FILE)}: ONNX Runtime cannot load it '
                           f'({one_line(error)})') from None

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    run.settings = dict(device='cpu', threads=cpu_setup.current_threads(), **ONNXRUNTIME_SETTINGS)
    return probed(run, directory, meta, 'ONNX Runtime', size)


def load_runner(directory: str, runtime: str, size: Optional[int] = None) -> Callable[[np.ndarray], np.ndarray]:
    """predict.py's runner of an export, probed at the size it will be given."""
    return onnx_runner(directory, size=size) if runtime == 'onnx' else paddle_runner(directory, size=size)


# Writing an export

def export_paddle(model: CycleNet, output: str, input_size: Optional[int]) -> None:
    """paddle.jit.save the fastest exact graph (docs/deployment.md): grouped_by_shift, fused mixers; None: any H, W."""
    spec = paddle.static.InputSpec([None, 3, input_size, input_size], 'float32', INPUT_NAME)
    model.eval()
    with warnings.catch_warnings(), fast_layers.fused_mixer_traced():
        warnings.simplefilter('ignore', UserWarning)   # Paddle's own code warns while tracing
        paddle.jit.save(fast_layers.grouped_by_shift(model), os.path.join(output, 'model'), input_spec=[spec])


def without_dead_nodes(graph) -> set:
    """Remove, in place, the nodes whose outputs nothing uses, in graph and its If branches (paddle2onnx
    leaves them, and ONNX Runtime warns about each when loading); the names graph uses."""
    import onnx
    used, live = {output.name for output in graph.output}, []
    for node in reversed(graph.node):   # nodes are in topological order: every user comes later
        if any(name in used for name in node.output):
            live.append(node)
            used.update(node.input)
            for attribute in node.attribute:   # a branch also uses names of the graph around it
                branches = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs
                for branch in branches:
                    used |= without_dead_nodes(branch)
    del graph.node[:]
    graph.node.extend(reversed(live))
    return used


def export_onnx(output: str, opset: int) -> None:
    """Convert output's Paddle inference model to output/model.onnx."""
    import onnx
    import paddle2onnx
    graph = os.path.join(output, model_file(os.listdir(output)))
    # save_file=None returns the bytes; passing a path would also run paddle2onnx's optional
    # polygraphy pass, which tries to pip-install onnx_graphsurgeon when it is missing.
    try:
        with native_stdout_dropped():
            onnx_bytes = paddle2onnx.export(graph, os.path.join(output, PARAMS_FILE), None, opset_version=opset)
    except Exception as error:  # paddle2onnx wraps its C++ errors in whatever it meets first
        raise WeightsError(f'paddle2onnx could not convert {graph}: {one_line(error)}') from None
    if not onnx_bytes:
        raise WeightsError(f'paddle2onnx could not convert {graph}')
    model = onnx.load_from_string(onnx_bytes)
    without_dead_nodes(model.graph)
    onnx.save(model, os.path.join(output, ONNX_FILE))


def write_meta(folder: str, meta: dict) -> None:
    with open(os.path.join(folder, META_FILE), 'w', encoding='utf-8') as file:
        json.dump(meta, file, indent=2)


def check_parity(model: CycleNet, run: Callable[[np.ndarray], np.ndarray], sizes, name: str) -> float:
    """run's largest logit difference from the eager model's, relative; WeightsError beyond PARITY_TOLERANCE."""
    worst = 0.0
    rng = np.random.default_rng(0)
    for height, width in sizes:
        images = rng.standard_normal((CHECK_BATCH, 3, height, width)).astype(np.float32)
        with paddle.no_grad():
            expected = model(paddle.to_tensor(images)).numpy()
        difference = float(np.abs(run(images) - expected).max() / max(np.abs(expected).max(), 1e-12))
        if not difference <= PARITY_TOLERANCE:
            raise WeightsError(f'{name} gives logits {difference:.2g} (relative) away from the eager '
                               f'model at {height}x{width}; the export was not written')
        worst = max(worst, difference)
    return worst


def earlier_export(output: str) -> List[str]:
    """output's export files, which a new export may replace; WeightsError for any no recognised meta.json lists."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise WeightsError(f'{output}: exists and is not a folder; choose another --output')
    present = [name for name in EXPORT_FILES + (META_FILE,) if os.path.lexists(os.path.join(output, name))]
    try:   # recognised as export.py's by its whole content, not by a 'files' key
        listed = set(read_meta(output)['files']) | {META_FILE}
    except WeightsError:
        listed = set()
    foreign = [name for name in present if name not in listed]
    if foreign:
        raise WeightsError(f'{output}: holds {", ".join(foreign)}, which export.py did not write; '
                           'choose another --output')
    return present


def install(temporary: str, output: str, earlier: List[str]) -> None:
    """Move the new export's files into output, meta.json first (meanwhile a reader refuses the
    mismatched files; a killed install is replaced by the next), then remove the stale ones."""
    new = [name for name in EXPORT_FILES if os.path.exists(os.path.join(temporary, name))]
    for name in [META_FILE] + new:
        os.replace(os.path.join(temporary, name), os.path.join(output, name))
    for name in set(earlier) - set(new) - {META_FILE}:
        os.remove(os.path.join(output, name))


def build_export(model: CycleNet, output: str, args: argparse.Namespace, recorded: dict, sizes) -> dict:
    """Write the export into a temporary folder inside output, check it, install it; its meta."""
    for stale in glob.glob(os.path.join(glob.escape(output), '.export.*.tmp')):   # what a killed export left
        shutil.rmtree(stale, ignore_errors=True)     # (no other export runs: output is locked)
    earlier = earlier_export(output)
    temporary = tempfile.mkdtemp(prefix='.export.', suffix='.tmp', dir=output)
    try:
        names = default_class_names(recorded.get('class_names'), model.num_classes)
        meta = dict(model_name=variant_name(model.config), model_args=model.config,
                    num_classes=model.num_classes, input_size=args.input_size, dynamic_size=args.dynamic_size,
                    crop_pct=args.crop_pct, interpolation=args.eval_interpolation, mean=list(IMAGENET_MEAN),
                    std=list(IMAGENET_STD), input_name=INPUT_NAME, class_names=names,
                    weights=os.path.basename(args.weights), ema=args.ema, paddle_version=paddle.__version__)
        with signals_deferred():   # a stop raised while Paddle traces or converts can crash it (SIGSEGV)
            export_paddle(model, temporary, None if args.dynamic_size else args.input_size)
            if args.onnx:
                export_onnx(temporary, args.opset)
            # the sha256 a reader checks: the runtimes below load the bytes that have them
            meta['files'] = {name: sha256_of(os.path.join(temporary, name)) for name in EXPORT_FILES
                             if os.path.exists(os.path.join(temporary, name))}
            write_meta(temporary, meta)
            # on CHECK_DEVICE, which main selected
            runners = {'paddle_inference_default_config': (paddle_runner(temporary, default_config=True),
                                                           'Paddle Inference (default Config)'),
                       'paddle_inference': (paddle_runner(temporary), "Paddle Inference (predict.py's Config)")}
            if args.onnx:
                runners['onnxruntime'] = (onnx_runner(temporary), 'ONNX Runtime')
            checks = {key: check_parity(model, run, sizes, name) for key, (run, name) in runners.items()}
        meta['parity'] = {'tolerance': PARITY_TOLERANCE, 'sizes': sizes, 'max_difference': checks,
                          'runtime_settings': {key: run.settings for key, (run, _) in runners.items()}}
        write_meta(temporary, meta)
        install(temporary, output, earlier)
        return meta
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def main(args: argparse.Namespace) -> None:
    if args.device not in (None, CHECK_DEVICE):
        raise cpu_setup.DeviceError(f'--device {args.device}: export.py traces and checks the model on the '
                                    'CPU (a GPU\'s TF32 would fail the exact check); the export it writes '
                                    'runs on any device')
    cpu_setup.configure(args.threads, CHECK_DEVICE)   # tracing needs no GPU, and the checks must not see TF32
    if args.onnx:
        try:  # checked before the slow export starts
            import onnx, onnxruntime, paddle2onnx  # noqa: F401, E401
        except ImportError:
            raise WeightsError('--onnx needs paddle2onnx, an optional dependency: '
                               'pip install paddle2onnx onnxruntime') from None
    output = os.path.abspath(args.output)
    earlier_export(output)          # refused before the slow work, and again at the end
    model, recorded = load_model(args.weights, args.model, ema=args.ema)
    resolve_data_config(args, recorded.get('data_config'))
    sizes = [(args.input_size, args.input_size)]
    if args.dynamic_size:
        sizes.append((args.input_size - 32 if args.input_size > 64 else args.input_size + 32, args.input_size))
    created = not os.path.exists(output)
    os.makedirs(output, exist_ok=True)
    with locked(output, '--output', wait=True):     # another export into it: this one waits
        try:
            meta = build_export(model, output, args, recorded, sizes)
        finally:   # a failed export into a new folder leaves none
            if created and not os.listdir(output):
                os.rmdir(output)
    shape = 'N x 3 x H x W' if args.dynamic_size else f'N x 3 x {args.input_size} x {args.input_size}'
    print(f'exported {printable(args.weights)} ({shape} -> N x {model.num_classes}) to {printable(args.output)}: '
          + ', '.join(sorted(meta['files']) + [META_FILE]))


if __name__ == '__main__':
    cli.run(main, get_args_parser().parse_args())
