"""Export a CycleMLP checkpoint for deployment: a Paddle inference model and, optionally, ONNX.

    python export.py --weights CycleMLP_B1.pth --output exported/ [--dynamic-size] [--onnx]

writes to the output folder
    model.json (Paddle 3) or model.pdmodel (Paddle 2.x), model.pdiparams   paddle.jit.save
    model.onnx           with --onnx, converted by paddle2onnx (optional: pip install paddle2onnx)
    meta.json            model name and arguments, input size, crop_pct, interpolation, mean, std
    class_names.json     the class names (or null), for predict.py --inference-model
The input is float32 'images' (N, 3, S, S) normalised as data.eval_transform does, N free;
with --dynamic-size H and W are free too (the CycleFC gather indices are built in the graph
from the input size). The output is the logits (N, classes).

This exports cleanly because CycleFC is plain gather and matmul ops; ports that compute it with
deformable convolution have no ONNX equivalent for it.
"""
import argparse
import json
import os
import sys
from typing import Optional

import cpu_setup  # first: sets up the CPU before Paddle loads (threads, MKL, memory)
import paddle

from cyclemlp import CycleNet, create_model
from data import IMAGENET_MEAN, IMAGENET_STD
from evaluate import USAGE_ERROR, model_args_parser, resolve_data_config
from predict import CLASS_NAMES_FILE, META_FILE, default_class_names, exported_model_file
from weights import WeightsError

ONNX_FILE = 'model.onnx'
DEFAULT_OPSET = 13
INPUT_NAME = 'images'


class ExportError(RuntimeError):
    """The conversion failed; the message names the file."""


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        'CycleMLP export', add_help=add_help, parents=[model_args_parser()],
        description='Write a Paddle inference model (and optionally ONNX) of a checkpoint.')
    parser.add_argument('--weights', required=True,
                        help='.pth, .pdparams, .safetensors or training checkpoint (default: required)')
    parser.add_argument('--ema', action='store_true',
                        help="export a training checkpoint's EMA weights (default: off)")
    parser.add_argument('--output', required=True, metavar='DIR',
                        help='folder to write the exported files to (default: required)')
    parser.add_argument('--dynamic-size', action='store_true',
                        help='accept any input height and width, not only --input-size (default: off)')
    parser.add_argument('--onnx', action='store_true',
                        help=f'also write {ONNX_FILE} with paddle2onnx (default: off)')
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET,
                        help=f'ONNX opset version (default: {DEFAULT_OPSET})')
    return parser


def export_paddle(model: CycleNet, output: str, input_size: Optional[int]) -> str:
    """paddle.jit.save an inference model to output/model.*; input_size None = dynamic H, W.

    Returns the model file written (model.json or model.pdmodel, depending on Paddle's version).
    """
    os.makedirs(output, exist_ok=True)
    spec = paddle.static.InputSpec([None, 3, input_size, input_size], 'float32', INPUT_NAME)
    model.eval()
    paddle.jit.save(model, os.path.join(output, 'model'), input_spec=[spec])
    return exported_model_file(output)


def export_onnx(model_file: str, params_file: str, onnx_file: str, opset: int) -> None:
    """Convert a saved Paddle inference model to ONNX with paddle2onnx."""
    import paddle2onnx
    # save_file=None returns the bytes; passing a path would also run paddle2onnx's optional
    # polygraphy pass, which tries to pip-install onnx_graphsurgeon when it is missing.
    onnx_bytes = None
    try:
        onnx_bytes = paddle2onnx.export(model_file, params_file, None, opset_version=opset)
    except Exception as error:  # paddle2onnx wraps its C++ errors in whatever it meets first
        raise ExportError(f'paddle2onnx could not convert {model_file}: {error}') from None
    if not onnx_bytes:
        raise ExportError(f'paddle2onnx could not convert {model_file} (see its log above)')
    with open(onnx_file, 'wb') as file:
        file.write(onnx_bytes)


def main(args: argparse.Namespace) -> None:
    cpu_setup.set_threads(args.threads)
    if args.onnx:
        try:
            import paddle2onnx  # noqa: F401  (checked before the slow export starts)
        except ImportError:
            raise ExportError('--onnx needs paddle2onnx, an optional dependency: '
                              'pip install paddle2onnx onnxruntime') from None
    model = create_model(args.model, weights=args.weights, ema=args.ema)
    resolve_data_config(args, model.data_config)
    input_size = None if args.dynamic_size else args.input_size
    model_file = export_paddle(model, args.output, input_size)
    class_names = default_class_names(model.class_names, model.num_classes)
    meta = dict(model_name=model.name, model_args=model.config, num_classes=model.num_classes,
                input_size=args.input_size, dynamic_size=args.dynamic_size,
                crop_pct=args.crop_pct, interpolation=args.eval_interpolation,
                mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), input_name=INPUT_NAME,
                weights=os.path.basename(args.weights), ema=args.ema,
                paddle_version=paddle.__version__)
    with open(os.path.join(args.output, META_FILE), 'w', encoding='utf-8') as file:
        json.dump(meta, file, indent=2)
    with open(os.path.join(args.output, CLASS_NAMES_FILE), 'w', encoding='utf-8') as file:
        json.dump(class_names, file, indent=0)
    written = [model_file, os.path.join(args.output, 'model.pdiparams')]
    if args.onnx:
        onnx_file = os.path.join(args.output, ONNX_FILE)
        export_onnx(model_file, written[1], onnx_file, args.opset)
        written.append(onnx_file)
    shape = 'N x 3 x H x W' if args.dynamic_size else f'N x 3 x {args.input_size} x {args.input_size}'
    print(f'exported {args.weights} ({shape} -> N x {model.num_classes}): {", ".join(written)}')


if __name__ == '__main__':
    arguments = get_args_parser().parse_args()
    try:
        main(arguments)
    except (WeightsError, ExportError) as error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(USAGE_ERROR)
