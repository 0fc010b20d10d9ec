"""Evaluate a CycleMLP checkpoint on an ImageNet-style validation set: top-1, top-5 and loss.

    python evaluate.py --weights CycleMLP_B1.pth --data-path /data/imagenet
    ...
    * Acc@1 78.900 Acc@5 94.500 loss 0.912

The weights are anything zoo.load_model reads; the model name and evaluation transform are taken from
the file when it records them. Images are read as the official loader reads them (no EXIF rotation).
Under `python -m paddle.distributed.launch` every rank evaluates its own shard and the sums are
reduced, so each image counts once. train.py imports the `evaluate` loop.
"""
import argparse
import datetime
import json
import sys
import time
from typing import Callable, Dict, Optional

import cli  # first: imports Paddle without its import-time notices
import cpu_setup
import paddle
import paddle.distributed as dist
import paddle.nn.functional as F

from cli import init_distributed, loader_args_parser, model_args_parser, resolve_data_config, static_if
from data import DatasetError, build_dataset, build_loader, check_image_headers, eval_transform, iterate
from safe_io import printable
from zoo import load_model

TOP_K = 5


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        'CycleMLP evaluation', parents=[model_args_parser(), loader_args_parser(data_required=True)],
        allow_abbrev=False,
        description='Top-1 / top-5 accuracy and loss of a CycleMLP checkpoint on a validation set.')
    group = parser.add_argument_group('weights and output')
    group.add_argument('--weights', required=True,
                       help='.pth, .pdparams, .safetensors or checkpoint (.pdckpt), or a model name '
                            '(CycleMLP_B1 ..) for its official weights, downloaded once (default: required)')
    group.add_argument('--ema', action='store_true',
                       help="evaluate a training checkpoint's EMA weights (default: off)")
    group.add_argument('--json', action='store_true', help='print one JSON object {"acc1", "acc5", "loss", '
                       '"images"} on stdout; progress goes to stderr (default: off)')
    return parser


def validation_loader(args: argparse.Namespace, rank: int, world_size: int) -> tuple:
    """(dataset, this rank's loader) of the validation split; a broken image is found here, before any work."""
    dataset = build_dataset(False, args, eval_transform(args.input_size, args.crop_pct, args.eval_interpolation))
    check_image_headers(dataset)
    return dataset, build_loader(dataset, is_train=False, batch_size=args.batch_size,
                                 num_workers=args.num_workers, num_replicas=world_size, rank=rank)


@paddle.no_grad()
def evaluate(model: paddle.nn.Layer, loader, print_freq: int = 10, amp_dtype: Optional[str] = None,
             log: Callable[[str], None] = print, header: str = 'Test:') -> Dict[str, float]:
    """Top-1 and top-min(5, classes) accuracy (percent), mean cross-entropy and image count over every
    rank's shard. The sums stay on the device until log lines (log: a no-op on ranks but 0)."""
    model.eval()    # train_one_epoch sets training mode again
    total_steps = len(loader)
    # On the device: correct top-1, correct top-k, summed loss, images with non-finite logits, images.
    sums = paddle.zeros([5], dtype='float64')
    start = time.time()
    for step, (batch, labels) in enumerate(iterate(loader)):
        with paddle.amp.auto_cast(enable=amp_dtype is not None, dtype=amp_dtype or 'float16'):
            logits = model(batch)
        logits = logits.astype('float32')
        labels = labels.reshape([-1, 1]).astype('int64')
        top = paddle.topk(logits, k=min(TOP_K, logits.shape[-1]), axis=1)[1]   # (B, k)
        hits = (top == labels).astype('float64')
        nonfinite = paddle.logical_not(paddle.isfinite(logits).all(axis=1)).astype('float64')
        loss = F.cross_entropy(logits, labels, reduction='sum').astype('float64')
        parts = (hits[:, 0], hits, loss, nonfinite, paddle.ones_like(nonfinite))
        sums = sums + paddle.concat([part.sum().reshape([1]) for part in parts])
        if step % print_freq == 0 or step == total_steps - 1:
            elapsed = time.time() - start
            eta = elapsed / (step + 1) * (total_steps - step - 1)
            correct1, correct5, loss_sum, _, images = sums.numpy().tolist()
            log(f'{header} [{step + 1:>{len(str(total_steps))}}/{total_steps}] eta {datetime.timedelta(seconds=int(eta))} '
                f'acc1 {100.0 * correct1 / images:.3f} acc5 {100.0 * correct5 / images:.3f} '
                f'loss {loss_sum / images:.4f} {images / max(elapsed, 1e-9):.0f} img/s')
    if dist.get_world_size() > 1:
        dist.all_reduce(sums)
    correct1, correct5, loss_sum, nonfinite, images = sums.numpy().tolist()
    images = int(images)   # never 0: a dataset holds images, and the sampler gives each to one rank
    if nonfinite:
        raise FloatingPointError(f'the model\'s logits are not finite (NaN or infinite) for {int(nonfinite)} of '
                                 f'{images} images: no accuracy is reported')
    stats = dict(acc1=100.0 * correct1 / images, acc5=100.0 * correct5 / images,
                 loss=loss_sum / images, images=images)
    log(f'* Acc@1 {stats["acc1"]:.3f} Acc@5 {stats["acc5"]:.3f} loss {stats["loss"]:.3f}')
    return stats


def check_classes(model, class_names: Optional[list], dataset, args) -> Optional[str]:
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
    if class_names and class_names[:len(dataset.classes)] != list(dataset.classes):
        return (f'warning: the class names stored in {args.weights} differ from the validation '
                f"set's ({class_names[:3]}... vs {list(dataset.classes)[:3]}...); "
                'labels are matched by index')
    return None


def main(args: argparse.Namespace) -> Dict[str, float]:
    cpu_setup.configure(args.threads, args.device)
    rank, world_size = init_distributed()
    model, meta = load_model(args.weights, args.model, ema=args.ema)
    resolve_data_config(args, meta.get('data_config'))
    dataset, loader = validation_loader(args, rank, world_size)
    warning = check_classes(model, meta.get('class_names'), dataset, args)
    if warning and rank == 0:
        print(printable(warning), file=sys.stderr)
    stream = sys.stderr if args.json else sys.stdout     # --json: stdout holds the result alone
    log = (lambda line: print(line, file=stream, flush=True)) if rank == 0 else (lambda line: None)
    log(f'{printable(args.weights)}{" (EMA)" if args.ema else ""}: {len(dataset)} images, '
        f'{model.num_classes} classes, {world_size} process{"es" if world_size > 1 else ""}')
    stats = evaluate(static_if(args.to_static, model), loader, print_freq=args.print_freq, log=log)
    if args.json and rank == 0:
        print(json.dumps(stats), flush=True)
    return stats


if __name__ == '__main__':
    cli.run(main, get_args_parser().parse_args())
