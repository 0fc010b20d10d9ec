"""Export a CycleMLP checkpoint for deployment, and read an export back (predict.py does).

    python export.py --weights CycleMLP_B1.pth --output exported/ [--dynamic-size] [--onnx]

writes the folder
    model.json (Paddle 3) or model.pdmodel (Paddle 2.x), model.pdiparams   for Paddle Inference
    model.onnx           with --onnx, converted by paddle2onnx (pip install paddle2onnx onnxruntime)
    meta.json            model, input size, crop_pct, interpolation, mean, std, class names, checks
The input is float32 'images' (N, 3, S, S) normalised as data.eval_transform does, N free;
with --dynamic-size H and W are free too (the CycleFC gather indices are built in the graph
from the input size). The output is the logits (N, classes).

Nothing is trusted unchecked: before the folder is put in place, the Paddle model runs in Paddle
Inference's predictor with its default CPU Config (oneDNN on, as deployments run it) and
model.onnx in ONNX Runtime, and each must give the eager model's logits within 1e-4 of the
largest logit (at a non-square size too, for --dynamic-size). meta.json records the check. The
folder is written beside the target and renamed into place, so a failed or interrupted export
leaves no partial folder and an earlier export stays intact until the new one is complete.

This exports cleanly because CycleFC is plain gather and matmul ops; ports that compute it with
deformable convolution have no ONNX equivalent for it.
"""
import argparse
import json
import os
import shutil
import tempfile
import warnings
from typing import Callable, List, Optional, Sequence

import cli  # first: imports Paddle without its import-time notices
import cpu_setup
import numpy as np
import paddle

from cli import bounded, held_signals, model_args_parser, resolve_data_config
from cyclemlp import CycleNet
from data import IMAGENET_MEAN, IMAGENET_STD, check_data_config
from weights import WeightsError, describe
from zoo import load_model, variant_name

IMAGENET_CLASSES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'imagenet_classes.txt')
IMAGENET_NUM_CLASSES = 1000
MODEL_FILES = ('model.json', 'model.pdmodel')   # what paddle.jit.save writes: Paddle 3 PIR, Paddle 2.x
PARAMS_FILE = 'model.pdiparams'
ONNX_FILE = 'model.onnx'
META_FILE = 'meta.json'
RUNTIMES = ('paddle', 'onnx')
DEFAULT_OPSET = 13
INPUT_NAME = 'images'
PARITY_TOLERANCE = 1e-4    # of the largest eager logit
CHECK_BATCH = 2


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        'CycleMLP export', parents=[model_args_parser()], allow_abbrev=False,
        description='Write a Paddle inference model (and optionally ONNX) of a checkpoint.')
    parser.add_argument('--weights', required=True,
                        help='.pth, .pdparams, .safetensors or training checkpoint, or a model name '
                             '(CycleMLP_B1 ..) for its official weights, downloaded once (default: required)')
    parser.add_argument('--ema', action='store_true',
                        help="export a training checkpoint's EMA weights (default: off)")
    parser.add_argument('--output', required=True, metavar='DIR',
                        help='folder to write; an earlier export there is replaced once the new '
                             'one is complete (default: required)')
    parser.add_argument('--dynamic-size', action='store_true',
                        help='accept any input height and width, not only --input-size (default: off)')
    parser.add_argument('--onnx', action='store_true',
                        help=f'also write {ONNX_FILE} with paddle2onnx (default: off)')
    parser.add_argument('--opset', type=bounded(int, 9, 20), default=DEFAULT_OPSET,
                        help=f'ONNX opset version (default: {DEFAULT_OPSET})')
    return parser


def default_class_names(stored: Optional[Sequence[str]], num_classes: int) -> Optional[List[str]]:
    """The names a weights file stores, else ImageNet-1k's for a 1000-class model (WordNet
    lemmas in class-index order, as timm ships them, Apache-2.0), else None."""
    if stored and len(stored) == num_classes:
        return list(stored)
    if num_classes == IMAGENET_NUM_CLASSES:
        with open(IMAGENET_CLASSES_FILE, encoding='utf-8') as lines:
            return [line.rstrip('\n') for line in lines]
    return None


# Reading an export

def exported_model_file(directory: str) -> str:
    """DIR/model.json (Paddle 3) or DIR/model.pdmodel (Paddle 2.x), whichever export wrote."""
    for name in MODEL_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise WeightsError(f'{directory}: no exported model ({" or ".join(MODEL_FILES)}); '
                       'expected a folder written by export.py')


def read_meta(directory: str) -> dict:
    """DIR/meta.json, checked: num_classes, input_size, dynamic_size, crop_pct, interpolation,
    class_names (a list of num_classes strings, or null)."""
    path = os.path.join(directory, META_FILE)
    try:
        with open(path, encoding='utf-8') as file:
            meta = json.load(file)
    except (OSError, ValueError) as error:
        raise WeightsError(f'{path}: cannot read ({error}); expected the meta.json export.py '
                           'writes') from None
    checks = {'num_classes': lambda v: type(v) is int and v >= 1,
              'dynamic_size': lambda v: isinstance(v, bool),
              'class_names': lambda v: v is None or (isinstance(v, list) and all(isinstance(n, str) for n in v)
                                                     and len(v) == meta.get('num_classes'))}
    if not isinstance(meta, dict):
        raise WeightsError(f'{path}: expected a JSON object, found {describe(meta)}')
    for key, valid in checks.items():
        if key not in meta or not valid(meta[key]):
            raise WeightsError(f'{path}: {key} is {describe(meta.get(key))}, not what export.py writes')
    check_data_config({key: meta.get(key) for key in ('input_size', 'crop_pct', 'interpolation')}, path)
    return meta


def paddle_runner(directory: str, onednn: Optional[bool] = False) -> Callable[[np.ndarray], np.ndarray]:
    """Logits of a batch from Paddle Inference's predictor (GPU if there is one). On CPU oneDNN
    is off by default, which is faster for this model (README: Deployment); None keeps the
    default Config (oneDNN on), True turns it on. All give the eager logits."""
    config = paddle.inference.Config(exported_model_file(directory), os.path.join(directory, PARAMS_FILE))
    config.disable_glog_info()
    if paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        config.enable_use_gpu(256, 0)
    else:
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(cpu_setup.current_threads())
        if onednn is not None:
            config.enable_mkldnn() if onednn else config.disable_mkldnn()
    try:
        predictor = paddle.inference.create_predictor(config)
    except Exception as error:  # Paddle raises its own C++ error types for a damaged model
        raise WeightsError(f'{directory}: Paddle Inference cannot load the model '
                           f'({" ".join(str(error).split())[:200]})') from None
    images = predictor.get_input_handle(predictor.get_input_names()[0])
    logits = predictor.get_output_handle(predictor.get_output_names()[0])

    def run(batch: np.ndarray) -> np.ndarray:
        images.reshape(batch.shape)
        images.copy_from_cpu(np.ascontiguousarray(batch, dtype=np.float32))
        predictor.run()
        return logits.copy_to_cpu()

    return run


def onnx_runner(directory: str) -> Callable[[np.ndarray], np.ndarray]:
    """Logits of a batch from ONNX Runtime on DIR/model.onnx."""
    path = os.path.join(directory, ONNX_FILE)
    if not os.path.isfile(path):
        raise WeightsError(f'{directory}: no {ONNX_FILE}; export with --onnx')
    try:
        import onnxruntime
    except ImportError:
        raise WeightsError('--runtime onnx needs onnxruntime: pip install onnxruntime') from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = cpu_setup.current_threads()
    # Without this its threads spin after each run, taking the cores from whatever runs next.
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    try:
        session = onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    except Exception as error:  # onnxruntime's own exception types
        raise WeightsError(f'{path}: ONNX Runtime cannot load it ({" ".join(str(error).split())[:200]})') from None
    return lambda batch: session.run(None, {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def load_runner(directory: str, runtime: str) -> Callable[[np.ndarray], np.ndarray]:
    return onnx_runner(directory) if runtime == 'onnx' else paddle_runner(directory)


# Writing an export

def export_paddle(model: CycleNet, output: str, input_size: Optional[int]) -> None:
    """paddle.jit.save an inference model to output/model.*; input_size None = dynamic H, W."""
    spec = paddle.static.InputSpec([None, 3, input_size, input_size], 'float32', INPUT_NAME)
    model.eval()
    with warnings.catch_warnings():
        # Paddle's own code warns while tracing (full_like asks a graph value for its place;
        # both sides of a branch on a symbolic size differ in type); the checks below stand.
        warnings.simplefilter('ignore', UserWarning)
        paddle.jit.save(model, os.path.join(output, 'model'), input_spec=[spec])


def without_dead_nodes(model) -> None:
    """Remove, in place, the nodes (constants mostly) whose outputs nothing uses, in the graph and
    its subgraphs: paddle2onnx leaves them, and ONNX Runtime warns about each when loading."""
    import onnx

    def graphs(graph):
        """The graph and its subgraphs (If branches), innermost first: rewriting a graph's node
        list copies its nodes, so their subgraphs must be final by then."""
        for node in graph.node:
            for attribute in node.attribute:
                subgraphs = list(attribute.graphs)
                if attribute.type == onnx.AttributeProto.GRAPH:
                    subgraphs.append(attribute.g)
                for subgraph in subgraphs:
                    yield from graphs(subgraph)
        yield graph

    removed = True
    while removed:
        every_graph = list(graphs(model.graph))
        used = {name for graph in every_graph for node in graph.node for name in node.input}
        used |= {output.name for graph in every_graph for output in graph.output}
        removed = False
        for graph in every_graph:
            live = [node for node in graph.node if any(name in used for name in node.output)]
            if len(live) < len(graph.node):
                removed = True
                del graph.node[:]
                graph.node.extend(live)


def export_onnx(output: str, opset: int) -> None:
    """Convert output's Paddle inference model to output/model.onnx with paddle2onnx."""
    import onnx
    import paddle2onnx
    model_file = exported_model_file(output)
    # save_file=None returns the bytes; passing a path would also run paddle2onnx's optional
    # polygraphy pass, which tries to pip-install onnx_graphsurgeon when it is missing.
    try:
        onnx_bytes = paddle2onnx.export(model_file, os.path.join(output, PARAMS_FILE), None, opset_version=opset)
    except Exception as error:  # paddle2onnx wraps its C++ errors in whatever it meets first
        raise WeightsError(f'paddle2onnx could not convert {model_file}: {error}') from None
    if not onnx_bytes:
        raise WeightsError(f'paddle2onnx could not convert {model_file} (see its log above)')
    model = onnx.load_from_string(onnx_bytes)
    without_dead_nodes(model)
    onnx.save(model, os.path.join(output, ONNX_FILE))


def check_parity(model: CycleNet, run: Callable[[np.ndarray], np.ndarray], sizes, name: str) -> float:
    """Largest difference from the eager logits, relative to the largest logit, over random
    batches of each (height, width); WeightsError beyond PARITY_TOLERANCE."""
    worst = 0.0
    rng = np.random.default_rng(0)
    for height, width in sizes:
        images = rng.standard_normal((CHECK_BATCH, 3, height, width)).astype(np.float32)
        with held_signals(), paddle.no_grad():
            expected = model(paddle.to_tensor(images)).numpy()
        difference = float(np.abs(run(images) - expected).max() / max(np.abs(expected).max(), 1e-12))
        if not difference <= PARITY_TOLERANCE:
            raise WeightsError(f'{name} gives logits {difference:.2g} (relative) away from the eager '
                               f'model at {height}x{width}; the export was not written')
        worst = max(worst, difference)
    return worst


def check_output(output: str) -> None:
    """--output may be new, empty or an earlier export; the folders above it are created."""
    if os.path.exists(output) and (not os.path.isdir(output) or (
            os.listdir(output) and not os.path.isfile(os.path.join(output, META_FILE)))):
        raise WeightsError(f'{output}: exists and is not an export; choose a new --output')


def replace_folder(temporary: str, output: str) -> None:
    """Move the finished export to output; an earlier export there goes only after that."""
    if not os.path.exists(output):
        os.replace(temporary, output)
        return
    old = tempfile.mkdtemp(prefix=f'.{os.path.basename(output)}.old.', dir=os.path.dirname(output))
    os.replace(output, os.path.join(old, 'export'))
    os.replace(temporary, output)
    shutil.rmtree(old)


def main(args: argparse.Namespace) -> None:
    cpu_setup.configure(args.threads)
    if args.onnx:
        try:  # checked before the slow export starts
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import paddle2onnx  # noqa: F401
        except ImportError:
            raise WeightsError('--onnx needs paddle2onnx, an optional dependency: '
                               'pip install paddle2onnx onnxruntime') from None
    output = os.path.abspath(args.output)
    check_output(output)
    model, recorded = load_model(args.weights, args.model, ema=args.ema)
    model.eval()
    resolve_data_config(args, recorded.get('data_config'), args.weights)
    sizes = [(args.input_size, args.input_size)]
    if args.dynamic_size:
        sizes.append((args.input_size - 32 if args.input_size > 64 else args.input_size + 32, args.input_size))
    os.makedirs(os.path.dirname(output), exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=f'.{os.path.basename(output)}.', dir=os.path.dirname(output))
    try:
        with held_signals():     # tracing runs the model's code: Ctrl-C there would be Paddle's error
            export_paddle(model, temporary, None if args.dynamic_size else args.input_size)
        checks = {'paddle_inference_default_config': check_parity(
            model, paddle_runner(temporary, onednn=None), sizes, 'Paddle Inference (default Config)')}
        if args.onnx:
            export_onnx(temporary, args.opset)
            checks['onnxruntime'] = check_parity(model, onnx_runner(temporary), sizes, 'ONNX Runtime')
        meta = dict(model_name=variant_name(model.config), model_args=model.config, num_classes=model.num_classes,
                    input_size=args.input_size, dynamic_size=args.dynamic_size,
                    crop_pct=args.crop_pct, interpolation=args.eval_interpolation,
                    mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), input_name=INPUT_NAME,
                    class_names=default_class_names(recorded.get('class_names'), model.num_classes),
                    weights=os.path.basename(args.weights), ema=args.ema,
                    paddle_version=paddle.__version__,
                    parity={'tolerance': PARITY_TOLERANCE, 'sizes': sizes, 'max_difference': checks})
        with open(os.path.join(temporary, META_FILE), 'w', encoding='utf-8') as file:
            json.dump(meta, file, indent=2)
        with held_signals():
            replace_folder(temporary, output)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    shape = 'N x 3 x H x W' if args.dynamic_size else f'N x 3 x {args.input_size} x {args.input_size}'
    print(f'exported {args.weights} ({shape} -> N x {model.num_classes}) to {args.output}: '
          + ', '.join(sorted(os.listdir(output))))


if __name__ == '__main__':
    cli.run(main, get_args_parser().parse_args())
