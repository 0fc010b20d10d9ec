"""Classify images with a CycleMLP checkpoint or an exported model: images in, class names out.

    python predict.py cat.jpg photos/ --weights CycleMLP_B1.pth --topk 3
    cat.jpg
        0.6205  281  tabby, tabby cat
        ...

Preprocessing is the official evaluation transform (data.eval_transform: bicubic resize of the
shorter side to input_size / crop_pct, center crop, ImageNet normalisation), so the same
weights on the same file give the official model's probabilities. Any image Pillow reads is
accepted (modes are converted as data.load_image does, EXIF orientation applied); an image
that cannot be read gets a one-line error and the others are still predicted (exit code 1).

Very large images: when the shorter side is at least LARGE_IMAGE_FACTOR times the resize
target, a JPEG is decoded at a reduced scale (Pillow's draft, DCT scaling) and any other image
is shrunk by an integer box-filter reduce, both to no less than twice the target, before the
bicubic resize. That bounds memory and time; for such images the probabilities differ
slightly from the official transform's. Ordinary images take exactly the official path.
Pillow's decompression-bomb guard stays on: such a file is reported like any unreadable one.

Class names: those the weights file (or exported model) records, else the ImageNet-1k names
in imagenet_classes.txt for a 1000-class model (WordNet lemmas in class-index order, as timm
ships them, Apache-2.0), else none.
"""
import argparse
import json
import os
import sys
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import cpu_setup  # first: sets up the CPU before Paddle loads (threads, MKL, memory)
import numpy as np
import paddle
import paddle.nn.functional as F
from PIL import Image, ImageOps

from cyclemlp import create_model
from data import IMAGE_EXTENSIONS, UNREADABLE_IMAGE_ERRORS, eval_transform, load_image
from evaluate import USAGE_ERROR, model_args_parser, resolve_data_config
from weights import WeightsError

IMAGENET_CLASSES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'imagenet_classes.txt')
IMAGENET_NUM_CLASSES = 1000
DEFAULT_TOPK = 5
DEFAULT_BATCH_SIZE = 16
LARGE_IMAGE_FACTOR = 4   # shorter side >= 4x the resize target: shrink cheaply first
SHRINK_TO_FACTOR = 2     # ... but never below 2x the target, so the bicubic resize still smooths
FAILED = 1               # exit code when some image could not be predicted
CLASS_NAMES_FILE = 'class_names.json'   # written by export.py next to the exported model
META_FILE = 'meta.json'
META_KEYS = ('num_classes', 'input_size', 'dynamic_size', 'crop_pct', 'interpolation')


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        'CycleMLP prediction', add_help=add_help, parents=[model_args_parser()],
        description='Top-k classes of each image. Input size, crop_pct and interpolation default '
                    'to the values the weights file or export.py recorded.')
    parser.add_argument('images', nargs='+', help='image files or folders (searched recursively)')
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--weights', help='.pth, .pdparams, .safetensors or training checkpoint '
                                          '(default: None; this or --inference-model is required)')
    source.add_argument('--inference-model', metavar='DIR',
                        help='a folder written by export.py (default: None)')
    parser.add_argument('--ema', action='store_true',
                        help="use a training checkpoint's EMA weights (default: off)")
    parser.add_argument('--topk', type=int, default=DEFAULT_TOPK,
                        help=f'classes shown per image (default: {DEFAULT_TOPK})')
    parser.add_argument('--batch-size', '--batch_size', type=int, default=DEFAULT_BATCH_SIZE,
                        help=f'images per forward pass (default: {DEFAULT_BATCH_SIZE})')
    parser.add_argument('--json', action='store_true',
                        help='one JSON object per image and line (default: off)')
    return parser


def imagenet_class_names() -> List[str]:
    with open(IMAGENET_CLASSES_FILE, encoding='utf-8') as lines:
        return [line.rstrip('\n') for line in lines]


def default_class_names(stored: Optional[Sequence[str]], num_classes: int) -> Optional[List[str]]:
    """The names a model file stores, else ImageNet-1k's for a 1000-class model, else None."""
    if stored and len(stored) == num_classes:
        return list(stored)
    if num_classes == IMAGENET_NUM_CLASSES:
        return imagenet_class_names()
    return None


def load_image_bounded(path: str, resize_size: int) -> Image.Image:
    """An RGB image ready for the evaluation transform, shrunk cheaply first if very large.

    Ordinary images are exactly data.load_image(path). See the module docstring for large ones.
    """
    with Image.open(path) as img:
        large = min(img.size) >= LARGE_IMAGE_FACTOR * resize_size
        if not large:
            return load_image(path)
        if img.format == 'JPEG':
            # draft picks the smallest DCT scale (1/2, 1/4, 1/8) that keeps at least this size.
            scale = SHRINK_TO_FACTOR * resize_size / min(img.size)
            img.draft('RGB', (int(np.ceil(img.width * scale)), int(np.ceil(img.height * scale))))
            img.load()
            # JPEG modes are L, RGB and CMYK, for which load_image's conversion is Pillow's own.
            img = ImageOps.exif_transpose(img).convert('RGB')
        else:
            img = load_image(path)
    factor = min(img.size) // (SHRINK_TO_FACTOR * resize_size)
    return img.reduce(factor) if factor > 1 else img


def expand_inputs(paths: Sequence[str]) -> Iterator[Tuple[str, Optional[str]]]:
    """(path, None) for each image to predict, or (path, error) for an input that yields none.

    Folders are searched recursively for files with an image extension, in sorted order.
    Files named explicitly are tried whatever their extension.
    """
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
    """One line naming what went wrong with path, without repeating the path."""
    if isinstance(error, FileNotFoundError):
        return 'no such file'
    if isinstance(error, IsADirectoryError):
        return 'is a directory'
    if isinstance(error, Image.DecompressionBombError):
        return f'refused by Pillow\'s decompression-bomb guard ({error})'
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return 'file is empty'
    message = str(error).replace(f"'{path}'", '').replace(path, '').strip() or type(error).__name__
    return 'cannot read image: ' + ' '.join(message.split())


class Predictor:
    """Probabilities for batches of (3, S, S) float32 arrays, from eager weights or an export."""

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], class_names: Optional[List[str]],
                 input_size: int, crop_pct: float, interpolation: str):
        self.forward = forward
        self.class_names = class_names
        self.transform = eval_transform(input_size, crop_pct, interpolation)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        logits = self.forward(batch)
        return F.softmax(paddle.to_tensor(logits, dtype='float32'), axis=-1).numpy()


def eager_predictor(args) -> Predictor:
    model = create_model(args.model, weights=args.weights, ema=args.ema)
    model.eval()
    resolve_data_config(args, model.data_config)

    @paddle.no_grad()
    def forward(batch: np.ndarray) -> np.ndarray:
        return model(paddle.to_tensor(batch)).numpy()

    return Predictor(forward, default_class_names(model.class_names, model.num_classes),
                     args.input_size, args.crop_pct, args.eval_interpolation)


def exported_model_file(directory: str) -> str:
    """DIR/model.json (Paddle 3 PIR) or DIR/model.pdmodel (Paddle 2.x), whichever export wrote."""
    for name in ('model.json', 'model.pdmodel'):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise WeightsError(f'{directory}: no exported model (model.json or model.pdmodel); '
                       'expected a folder written by export.py')


def load_inference_model(directory: str) -> Tuple[Callable[[np.ndarray], np.ndarray], dict, Optional[list]]:
    """(forward, meta, class names) of a model export.py wrote, loaded with paddle.jit.load.

    (paddle.inference's predictor crashed on this graph with Paddle 3.3.1 on CPU; jit.load runs
    the same saved program.)
    """
    exported_model_file(directory)
    try:
        with open(os.path.join(directory, META_FILE), encoding='utf-8') as file:
            meta = json.load(file)
        with open(os.path.join(directory, CLASS_NAMES_FILE), encoding='utf-8') as file:
            class_names = json.load(file)
        missing = [key for key in META_KEYS if key not in meta]
    except (OSError, ValueError) as error:
        raise WeightsError(f'{directory}: cannot read {META_FILE} / {CLASS_NAMES_FILE} ({error}); '
                           'expected a folder written by export.py') from None
    if missing:
        raise WeightsError(f'{os.path.join(directory, META_FILE)}: missing {", ".join(missing)}; '
                           'expected the file export.py writes')
    model = paddle.jit.load(os.path.join(directory, 'model'))
    model.eval()

    @paddle.no_grad()
    def forward(batch: np.ndarray) -> np.ndarray:
        return model(paddle.to_tensor(batch, dtype='float32')).numpy()

    return forward, meta, class_names


def exported_predictor(args) -> Predictor:
    forward, meta, class_names = load_inference_model(args.inference_model)
    input_size = args.input_size or meta['input_size']
    if not meta.get('dynamic_size') and input_size != meta['input_size']:
        raise WeightsError(f'{args.inference_model} was exported for {meta["input_size"]}x'
                           f'{meta["input_size"]} inputs, not {input_size}; re-export it with '
                           '--dynamic-size or that --input-size')
    crop_pct = args.crop_pct or meta['crop_pct']
    interpolation = args.eval_interpolation or meta['interpolation']
    return Predictor(forward, default_class_names(class_names, meta['num_classes']),
                     input_size, crop_pct, interpolation)


def top_predictions(probabilities: np.ndarray, topk: int, class_names: Optional[List[str]]) -> List[dict]:
    order = np.argsort(-probabilities, kind='stable')[:topk]
    return [dict(class_id=int(index), label=class_names[index] if class_names else None,
                 probability=float(probabilities[index])) for index in order]


def predict(predictor: Predictor, paths: Sequence[str], topk: int = DEFAULT_TOPK,
            batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[dict]:
    """{'image', 'predictions'} or {'image', 'error'} per image, in input order, batch by batch."""
    pending: List[Tuple[str, Optional[np.ndarray], Optional[str]]] = []

    def flush():
        arrays = [array for _, array, _ in pending if array is not None]
        probabilities = iter(predictor.probabilities(np.stack(arrays)) if arrays else [])
        for path, array, error in pending:
            if error is not None:
                yield dict(image=path, error=error)
            else:
                yield dict(image=path, predictions=top_predictions(next(probabilities), topk,
                                                                   predictor.class_names))
        pending.clear()

    for path, error in expand_inputs(paths):
        array = None
        if error is None:
            try:
                image = load_image_bounded(path, predictor.transform.resize_size)
                array = predictor.transform(image)
            except UNREADABLE_IMAGE_ERRORS as exception:
                error = describe_error(path, exception)
        pending.append((path, array, error))
        if sum(item[1] is not None for item in pending) >= batch_size:
            yield from flush()
    yield from flush()


def format_result(result: dict) -> str:
    if 'error' in result:
        return f'error: {result["image"]}: {result["error"]}'
    lines = [result['image']]
    for prediction in result['predictions']:
        label = f'  {prediction["label"]}' if prediction['label'] is not None else ''
        lines.append(f'    {prediction["probability"]:.4f}  {prediction["class_id"]:>4}{label}')
    return '\n'.join(lines)


def main(args: argparse.Namespace) -> int:
    """Print predictions; return 0, or FAILED if any image could not be predicted."""
    cpu_setup.set_threads(args.threads)
    predictor = exported_predictor(args) if args.inference_model else eager_predictor(args)
    failed = 0
    for result in predict(predictor, args.images, args.topk, args.batch_size):
        failed += 'error' in result
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(format_result(result), file=sys.stderr if 'error' in result else sys.stdout,
                  flush=True)
    return FAILED if failed else 0


if __name__ == '__main__':
    argument_parser = get_args_parser()
    arguments = argument_parser.parse_args()
    if arguments.topk < 1 or arguments.batch_size < 1:
        argument_parser.error('--topk and --batch-size must be at least 1')
    try:
        sys.exit(main(arguments))
    except WeightsError as error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(USAGE_ERROR)
