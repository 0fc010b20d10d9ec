"""Classify images with a CycleMLP checkpoint or an exported model: images in, class names out.

    python predict.py cat.jpg                       # CycleMLP_B1's official weights, downloaded once
    python predict.py cat.jpg photos/ --weights out/b1/best.pdparams --topk 3
    python predict.py cat.jpg --inference-model exported/                  # Paddle Inference
    python predict.py cat.jpg --inference-model exported/ --runtime onnx   # ONNX Runtime

Preprocessing is the official evaluation transform (data.eval_transform) on the fully decoded image,
so the same weights on the same file give the official model's probabilities. Unlike evaluate.py,
the EXIF orientation of a photo is applied first: it is classified the way up a person sees it. An
image that cannot be read (Pillow's decompression-bomb guard stays on) is one error line, the others
are still predicted, and the exit code is 1. --fast-decode shrinks very large photos cheaply before
the resize (JPEG DCT scaling, else a box filter, to no less than twice the target): faster, with
slightly different probabilities.
"""
import argparse
import json
import os
import sys
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import cli  # first: imports Paddle without its import-time notices
import cpu_setup
import numpy as np
import paddle
import paddle.nn.functional as F

import export
from cli import bounded, model_args_parser, resolve_data_config
from data import IMAGE_EXTENSIONS, UNREADABLE_IMAGE_ERRORS, eval_transform, load_image, normalize
from safe_io import WeightsError, printable
from zoo import load_model

DEFAULT_WEIGHTS = 'CycleMLP_B1'   # the official weights of the model the earlier Paddle port trained
DEFAULT_TOPK = 5
DEFAULT_BATCH_SIZE = 16
SHRINK_TO_FACTOR = 2   # --fast-decode: never below 2x the resize target, so the bicubic resize still smooths


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        'CycleMLP prediction', parents=[model_args_parser()], allow_abbrev=False,
        description='Top-k classes of each image. Input size, crop_pct and interpolation default '
                    'to the values the weights file or export.py recorded.')
    parser.add_argument('images', nargs='+', help='image files or folders (searched recursively)')
    source = parser.add_mutually_exclusive_group()
    source.add_argument('--weights', help='.pth, .pdparams, .safetensors or checkpoint, or a model name for '
                                          'its official weights, downloaded once (default: CycleMLP_B1, '
                                          'without --inference-model)')
    source.add_argument('--inference-model', metavar='DIR', help='a folder export.py wrote (default: None)')
    parser.add_argument('--runtime', choices=export.RUNTIMES, default='paddle',
                        help='runtime of --inference-model: Paddle Inference, or ONNX Runtime on the '
                             'model.onnx of export.py --onnx (default: paddle)')
    parser.add_argument('--ema', action='store_true',
                        help="use a training checkpoint's EMA weights (default: off)")
    parser.add_argument('--topk', type=bounded(int, 1), default=DEFAULT_TOPK,
                        help=f'classes shown per image (default: {DEFAULT_TOPK})')
    parser.add_argument('--batch-size', '--batch_size', type=bounded(int, 1), default=DEFAULT_BATCH_SIZE,
                        help=f'images per forward pass (default: {DEFAULT_BATCH_SIZE})')
    parser.add_argument('--fast-decode', action='store_true',
                        help='decode large photos at reduced scale first: faster, approximate '
                             'probabilities (default: off, the exact official transform)')
    parser.add_argument('--json', action='store_true',
                        help='one JSON object per image and line (default: off)')
    return parser


def expand_inputs(paths: Sequence[str]) -> Iterator[Tuple[str, Optional[str]]]:
    """(path, None) per image to predict, (path, error) per input that yields none. Folders are searched
    recursively for image extensions, in sorted order; files named explicitly are tried whatever theirs."""
    for path in paths:
        if not os.path.isdir(path):
            yield path, None
            continue
        found = sorted(os.path.join(folder, name) for folder, _, names in os.walk(path)
                       for name in names if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS)
        if not found:
            yield path, 'folder holds no images'
        for image_path in found:
            yield image_path, None


def describe_error(path: str, error: Exception) -> str:
    """One line naming what went wrong with path, without repeating the path (Pillow names it)."""
    if isinstance(error, FileNotFoundError):
        return 'no such file'
    message = str(error)
    for form in (repr(path), f"'{path}'", path):
        message = message.replace(form, '')
    return 'cannot read image: ' + (' '.join(message.split()) or type(error).__name__)


class Predictor:
    """Probabilities for batches of (3, S, S) float32 arrays, from eager weights or an export."""

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], class_names: Optional[List[str]],
                 input_size: int, crop_pct: float, interpolation: str, fast_decode: bool = False):
        self.forward, self.class_names, self.fast_decode = forward, class_names, fast_decode
        self.transform = eval_transform(input_size, crop_pct, interpolation)

    def load(self, path: str) -> np.ndarray:
        reduce_to = SHRINK_TO_FACTOR * self.transform.resize_size if self.fast_decode else None
        return normalize(self.transform(load_image(path, exif_orientation=True, reduce_to=reduce_to)))

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return F.softmax(paddle.to_tensor(self.forward(batch), dtype='float32'), axis=-1).numpy()


def load_predictor(args: argparse.Namespace) -> Predictor:
    """The model of --inference-model or --weights, with the evaluation transform it records."""
    if args.inference_model:
        meta = export.read_meta(args.inference_model)
        resolve_data_config(args, {key: meta[key] for key in ('input_size', 'crop_pct', 'interpolation')})
        if not meta['dynamic_size'] and args.input_size != meta['input_size']:
            raise WeightsError(f'{args.inference_model} was exported for {meta["input_size"]}x'
                               f'{meta["input_size"]} inputs, not {args.input_size}; re-export it with '
                               '--dynamic-size or that --input-size')
        forward = export.load_runner(args.inference_model, args.runtime, args.input_size)
        class_names, num_classes = meta['class_names'], meta['num_classes']
    else:
        model, recorded = load_model(args.weights or DEFAULT_WEIGHTS, args.model, ema=args.ema)
        model.eval()
        resolve_data_config(args, recorded.get('data_config'))
        forward = paddle.no_grad()(lambda batch: model(paddle.to_tensor(batch)).numpy())
        class_names, num_classes = recorded.get('class_names'), model.num_classes
    return Predictor(forward, export.default_class_names(class_names, num_classes), args.input_size,
                     args.crop_pct, args.eval_interpolation, args.fast_decode)


def top_predictions(probabilities: np.ndarray, topk: int, class_names: Optional[List[str]]) -> List[dict]:
    order = np.argsort(-probabilities, kind='stable')[:topk]
    return [dict(class_id=int(index), label=class_names[index] if class_names else None,
                 probability=float(probabilities[index])) for index in order]


def predict(predictor: Predictor, paths: Sequence[str], topk: int = DEFAULT_TOPK,
            batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[dict]:
    """{'image', 'predictions'} or {'image', 'error'} per image, in input order, batch by batch; an
    error as soon as it is found (the images before it predicted first), and for a non-finite output."""
    pending: List[Tuple[str, np.ndarray]] = []

    def flush():
        probabilities = predictor.probabilities(np.stack([array for _, array in pending])) if pending else []
        for (path, _), row in zip(pending, probabilities):
            if np.isfinite(row).all():
                yield dict(image=path, predictions=top_predictions(row, topk, predictor.class_names))
            else:
                yield dict(image=path, error='the model\'s output is not finite (NaN or infinite)')
        pending.clear()

    for path, error in expand_inputs(paths):
        if error is None:
            try:
                pending.append((path, predictor.load(path)))
            except UNREADABLE_IMAGE_ERRORS as exception:
                error = describe_error(path, exception)
        if error is not None:
            yield from flush()
            yield dict(image=path, error=error)
        elif len(pending) >= batch_size:
            yield from flush()
    yield from flush()


def format_result(result: dict) -> str:
    """The text output of one result, names from files and folders escaped (weights.printable)."""
    if 'error' in result:
        return f'error: {printable(result["image"])}: {printable(result["error"])}'
    lines = [printable(result['image'])]
    for prediction in result['predictions']:
        label = f'  {printable(prediction["label"])}' if prediction['label'] is not None else ''
        lines.append(f'    {prediction["probability"]:.4f}  {prediction["class_id"]:>4}{label}')
    return '\n'.join(lines)


def main(args: argparse.Namespace) -> int:
    """Print predictions; the exit status is 1 if any image could not be predicted (as for any error)."""
    cpu_setup.configure(args.threads, args.device)
    predictor = load_predictor(args)
    failed = 0
    for result in predict(predictor, args.images, args.topk, args.batch_size):
        failed += 'error' in result
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(format_result(result), file=sys.stderr if 'error' in result else sys.stdout, flush=True)
    return 1 if failed else 0


if __name__ == '__main__':
    argument_parser = get_args_parser()
    arguments = argument_parser.parse_args()
    if arguments.runtime != 'paddle' and not arguments.inference_model:
        argument_parser.error('--runtime applies to --inference-model')
    if arguments.inference_model and (arguments.model or arguments.ema):
        argument_parser.error('--model and --ema apply to --weights; an export is one model')
    cli.run(main, arguments)
