"""Train CycleMLP with the official recipe, on one CPU, one GPU, or many through the launcher.

    python train.py --demo --output-dir out/demo                       # digits, minutes on CPU
    python -m paddle.distributed.launch --devices 0,1,2,3,4,5,6,7 train.py \\
        --model CycleMLP_B1 --data-path /data/imagenet --output-dir out/b1

The defaults are the official main.py's (DeiT's recipe); its underscore spellings, and its flags
that change nothing here, are accepted. Every epoch writes OUTPUT/checkpoint.pdckpt (`--resume
auto` continues from it), OUTPUT/best.pdparams and one JSON line of OUTPUT/log.txt. Everything
random is reseeded every epoch from (seed, epoch, rank), so on the CPU a run killed and resumed
ends with the same parameters, bit for bit, as one never stopped (on a GPU, up to rounding).
"""
import argparse
import datetime
import importlib.util
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import cli  # first: imports Paddle without its import-time notices
import cpu_setup
import paddle
import paddle.distributed as dist
import paddle.nn.functional as F

from augment import Mixup, RandomErasing, rand_augment, smooth_one_hot, train_transform
from checkpoint import (BEST_FILE, CHECKPOINT_FILE, LOG_FILE, RUN_FILES, json_line, load_checkpoint,
                        model_meta, prepare_output_dir, resolve_resume, save_checkpoint)
from cli import (bounded, init_distributed, loader_args_parser, locked, model_args_parser, signals_deferred,
                 static_if)
from cyclemlp import MAX_BLOCKS_PER_STAGE, MAX_CHANNELS, MAX_MLP_RATIO, CycleNet
from data import DatasetError, build_dataset, build_loader, iterate, set_loader_epoch
from evaluate import evaluate, validation_loader
from safe_io import WeightsError, printable
from weights import write_weights
from zoo import count_flops, count_parameters, create_model, load_state, numpy_state, read_state, variant_name

LR_REFERENCE_BATCH = 512  # the base lr is the lr of a global batch of this many images
INIT_LOSS_SCALE = 2.0 ** 16  # timm's NativeScaler (torch.cuda.amp.GradScaler) starts here
# Per-epoch seed (drop path, Mixup, random erasing) = seed + rank * RANK_SEED_STRIDE + epoch *
# EPOCH_SEED_STRIDE: distinct for up to 1000 ranks and 1000 epochs apart.
RANK_SEED_STRIDE = 1000
EPOCH_SEED_STRIDE = 1_000_000
DEMO_DATA = Path(__file__).resolve().parent / 'demo_data'
# `--demo`: the bundled 8x8 digits upscaled to 32x32, a four-block CycleNet and the full
# pipeline (RandAugment, erasing, Mixup, smoothing, EMA, drop path), milder than on ImageNet:
# the digits fill their frame, so 8%-area crops and 40% translations leave no digit to learn,
# and a mirrored digit is another digit or none, so there is no flip.
# lr 3.2e-2 is the base for a batch of 512: 2e-3 at the demo's batch of 32. The EMA decay suits
# a few hundred steps; repeated augmentation is off because on 1,442 images it only repeats.
DEMO_PRESET = dict(
    data_path=str(DEMO_DATA), input_size=32, crop_pct=1.0, scale=[0.5, 1.0], hflip=0.0,
    layers=[1, 1, 1, 1], embed_dims=[32, 64, 96, 128], mlp_ratios=[4, 4, 4, 4],
    epochs=20, warmup_epochs=0, batch_size=32, lr=3.2e-2, min_lr=1e-5, num_workers=2,
    aa='rand-m3-mstd0.5-inc1', mixup=0.2, cutmix=0.0, model_ema_decay=0.99,
    repeated_aug=False, drop_path=0.05, print_freq=50,
)
# The official main.py's flags that change nothing here, with their defaults: accepted so that an
# official command line runs ('flag alias'; the type is the default's, a bool default makes a switch).
OFFICIAL_NO_EFFECT = {
    '--drop': 0.0, '--model-ema-force-cpu': False, '--opt': 'adamw', '--momentum': 0.9, '--sched': 'cosine',
    '--lr-noise': [], '--lr-noise-pct': 0.67, '--lr-noise-std': 1.0, '--decay-epochs': 30.0,
    '--cooldown-epochs': 10, '--patience-epochs': 10, '--decay-rate --dr': 0.1, '--resplit': False,
    '--cutmix-minmax': [], '--mixup-mode': 'batch', '--teacher-model': 'regnety_160', '--teacher-path': '',
    '--distillation-type': 'none', '--distillation-alpha': 0.5, '--distillation-tau': 1.0,
    '--data-set': 'IMNET', '--mcloader': False, '--inat-category': 'name', '--start_epoch': 0,
    '--dist-eval': False, '--pin-mem': True, '--no-pin-mem': False, '--world_size': 1, '--dist_url': 'env://',
}
# Those of them that this repo implements only with their default (the others: any value).
OFFICIAL_DEFAULT_ONLY = ('--opt', '--sched', '--lr-noise', '--cutmix-minmax', '--mixup-mode',
                         '--distillation-type', '--data-set', '--mcloader', '--start_epoch')


def get_args_parser(demo: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        'CycleMLP training', parents=[model_args_parser(training=True), loader_args_parser(not demo)],
        allow_abbrev=False, description='Train CycleMLP with the official recipe (DeiT / timm semantics).')
    fraction, nonnegative = bounded(float, 0.0, 1.0), bounded(float, 0.0)
    positive, below_one = bounded(float, 0.0, low_open=True), bounded(float, 0.0, 1.0, high_open=True)

    # Model: drop path, custom shapes and the starting weights.
    group = parser.add_argument_group('model')
    group.add_argument('--drop-path', type=below_one, default=0.1, help='stochastic depth rate (default: 0.1)')
    group.add_argument('--layers', type=bounded(int, 1, MAX_BLOCKS_PER_STAGE), nargs=4, metavar='N',
                       help='a CycleNet of these stage depths instead of --model (default: None)')
    group.add_argument('--embed-dims', type=bounded(int, 4, MAX_CHANNELS), nargs=4, metavar='C',
                       help='stage widths of a --layers model (default: None)')
    group.add_argument('--mlp-ratios', type=bounded(float, 0.0, MAX_MLP_RATIO, low_open=True), nargs=4,
                       metavar='R', help='MLP expansion ratios of a --layers model (default: None)')
    group.add_argument('--finetune', metavar='PATH', help='start from these weights (a file or a model name); '
                       'a head of another class count is replaced (default: None)')

    # Optimizer: AdamW without weight decay on biases and 1-D parameters.
    group = parser.add_argument_group('optimizer')
    group.add_argument('--opt-eps', type=positive, default=1e-8, help='AdamW epsilon (default: 1e-8)')
    group.add_argument('--opt-betas', type=below_one, nargs=2, default=[0.9, 0.999],
                       help='AdamW betas (default: 0.9 0.999)')
    group.add_argument('--weight-decay', type=nonnegative, default=0.05, help='weight decay (default: 0.05)')
    group.add_argument('--clip-grad', type=positive, help='max global gradient norm (default: None)')

    # Schedule: linear warmup, then timm's cosine, one value per epoch.
    group = parser.add_argument_group('schedule')
    group.add_argument('--epochs', type=bounded(int, 1), default=300, help='training epochs (default: 300)')
    group.add_argument('--lr', type=positive, default=5e-4,
                       help=f'lr of a global batch of {LR_REFERENCE_BATCH}, scaled linearly (default: 5e-4)')
    group.add_argument('--warmup-lr', type=nonnegative, default=1e-6, help='first warmup lr (default: 1e-6)')
    group.add_argument('--warmup-epochs', type=bounded(int, 0), default=5, help='warmup epochs (default: 5)')
    group.add_argument('--min-lr', type=nonnegative, default=1e-5, help='last cosine lr (default: 1e-5)')
    group.add_argument('--eval-interval', type=bounded(int, 1), default=1, metavar='N',
                       help='evaluate every N epochs and after the last (default: 1)')

    # Augmentation: the training transform (augment.py) and the loss.
    group = parser.add_argument_group('augmentation')
    group.add_argument('--aa', default='rand-m9-mstd0.5-inc1',
                       help='RandAugment policy, "none" to disable (default: rand-m9-mstd0.5-inc1)')
    group.add_argument('--color-jitter', type=nonnegative, default=0.4,
                       help='colour jitter, used only without RandAugment (default: 0.4)')
    group.add_argument('--scale', type=bounded(float, 0.0, 1.0, low_open=True), nargs=2, default=[0.08, 1.0],
                       help='area range of the random resized crop (default: 0.08 1.0)')
    group.add_argument('--hflip', type=fraction, default=0.5, help='probability of a flip (default: 0.5)')
    group.add_argument('--train-interpolation', default='bicubic', choices=['random', 'bilinear', 'bicubic'],
                       help='resampling of the random resized crop (default: bicubic)')
    group.add_argument('--reprob', type=fraction, default=0.25, help='erasing probability (default: 0.25)')
    group.add_argument('--remode', default='pixel', choices=['const', 'rand', 'pixel'],
                       help='erasing fill (default: pixel)')
    group.add_argument('--recount', type=bounded(int, 1, 100), default=1, help='erasing boxes (default: 1)')
    group.add_argument('--smoothing', type=below_one, default=0.1, help='label smoothing (default: 0.1)')
    group.add_argument('--repeated-aug', action=argparse.BooleanOptionalAction, default=True,
                       help='repeated augmentation x3 across ranks, else plain shuffled shards (default: on)')

    # Mixup / CutMix on the batch (mode 'batch').
    group = parser.add_argument_group('mixup')
    group.add_argument('--mixup', type=nonnegative, default=0.8, help='Mixup alpha, 0: off (default: 0.8)')
    group.add_argument('--cutmix', type=nonnegative, default=1.0, help='CutMix alpha, 0: off (default: 1.0)')
    group.add_argument('--mixup-prob', type=fraction, default=1.0, help='chance to mix a batch (default: 1.0)')
    group.add_argument('--mixup-switch-prob', type=fraction, default=0.5,
                       help='probability of CutMix rather than Mixup when both are on (default: 0.5)')

    # EMA of the weights (timm ModelEma), evaluated alongside the model.
    group = parser.add_argument_group('EMA')
    group.add_argument('--model-ema', action=argparse.BooleanOptionalAction, default=True,
                       help='keep an exponential moving average of the weights (default: on)')
    group.add_argument('--model-ema-decay', type=fraction, default=0.99996, help='per step (default: 0.99996)')

    # Output and checkpoints.
    group = parser.add_argument_group('output and checkpoints')
    group.add_argument('--output-dir', '--output_dir', default='', metavar='DIR',
                       help=f'where {", ".join(RUN_FILES)} go; empty writes nothing (default: "")')
    group.add_argument('--resume', metavar='PATH', help=f'continue from a {CHECKPOINT_FILE}; "auto": '
                       f'OUTPUT/{CHECKPOINT_FILE} when it exists (default: None)')
    group.add_argument('--allow-changes', action='store_true', help='resume even though the input size, '
                       'evaluation transform or class names differ from the checkpoint\'s (default: off)')
    group.add_argument('--overwrite', action='store_true',
                       help='start a new run in an --output-dir that holds one, deleting it (default: off)')
    group.add_argument('--eval', action='store_true', help='evaluate --resume/--finetune only (default: off)')
    group.add_argument('--visualdl', action='store_true', help='also log to OUTPUT/visualdl (default: off)')
    group.add_argument('--flops', action='store_true', help='print the model\'s FLOPs (default: off)')
    preset = ', '.join(f'{key}={value}' for key, value in DEMO_PRESET.items() if key != 'data_path')
    group.add_argument('--demo', action='store_true',
                       help=f'digits in demo_data/ with {preset}; explicit flags win (default: off)')

    # Distributed and mixed precision.
    group = parser.add_argument_group('distributed and mixed precision')
    group.add_argument('--amp-dtype', default='float16', choices=['float16', 'bfloat16'],
                       help='autocast dtype on GPU; float16 uses loss scaling (default: float16)')
    group.add_argument('--no-amp', '--no_amp', action='store_true',
                       help='float32 on GPU too, as always on CPU (default: off)')

    group = parser.add_argument_group('official main.py flags with no effect here')
    for names, default in OFFICIAL_NO_EFFECT.items():
        what = f'only {default}' if names in OFFICIAL_DEFAULT_ONLY else 'any value'
        kind = (dict(action='store_true') if isinstance(default, bool) else
                dict(type=float, nargs='+') if isinstance(default, list) else dict(type=type(default)))
        group.add_argument(*names.split(), default=default, help=f'{what} (default: {default})', **kind)
    if demo:
        parser.set_defaults(**DEMO_PRESET)
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse argv (--demo replaces the defaults) and check what the flags mean together."""
    argv = sys.argv[1:] if argv is None else argv
    parser = get_args_parser(demo='--demo' in argv)    # as argparse reads it: no flag takes it as a value
    args = parser.parse_args(argv)
    for flag in OFFICIAL_DEFAULT_ONLY:
        value = getattr(args, flag.lstrip('-').replace('-', '_'))
        if value != OFFICIAL_NO_EFFECT[flag]:
            parser.error(f'{flag} {value}: only {OFFICIAL_NO_EFFECT[flag]} is implemented here')
    if args.layers and not (args.embed_dims and args.mlp_ratios):
        parser.error('--layers needs --embed-dims and --mlp-ratios')
    if args.scale[0] > args.scale[1]:
        parser.error(f'--scale {args.scale[0]} {args.scale[1]}: the smaller area fraction comes first')
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        parser.error(f'--batch-size {args.batch_size}: Mixup/CutMix pair each image with another; '
                     'use an even batch size or --mixup 0 --cutmix 0')
    try:
        rand_augment(args.aa)
    except ValueError as error:
        parser.error(f'--aa: {error}')
    own_checkpoint = os.path.abspath(os.path.join(args.output_dir, CHECKPOINT_FILE))
    continues = args.resume == 'auto' or (args.resume and os.path.abspath(args.resume) == own_checkpoint)
    found = [name for name in RUN_FILES
             if args.output_dir and os.path.exists(os.path.join(args.output_dir, name))]
    if found and not (args.eval or args.overwrite or continues):
        parser.error(f'--output-dir {args.output_dir} holds a run ({", ".join(found)}): continue it with '
                     '--resume auto, or start over with --overwrite')
    if args.visualdl and importlib.util.find_spec('visualdl') is None:
        parser.error('--visualdl needs the visualdl package (pip install visualdl)')
    return args


def scheduled_lr(epoch: int, base_lr: float, epochs: int, warmup_epochs: int, warmup_lr: float,
                 min_lr: float) -> float:
    """The lr epoch `epoch` (0-based) trains with in the official run: timm's CosineLRScheduler
    (warmup_prefix False: the cosine counts t from 0) at t = epoch - 1, because the official
    main.py steps it with the epoch just trained; epoch 0 trains at t = 0."""
    t = max(epoch - 1, 0)
    if t < warmup_epochs:
        return warmup_lr + t * (base_lr - warmup_lr) / warmup_epochs
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * t / epochs))


def soft_target_cross_entropy(logits: paddle.Tensor, targets: paddle.Tensor) -> paddle.Tensor:
    """timm's SoftTargetCrossEntropy, in float32 so mixed-precision logits stay accurate."""
    log_probs = F.log_softmax(logits.astype('float32'), axis=-1)
    return (-targets.astype('float32') * log_probs).sum(axis=-1).mean()


class ModelEma:
    """timm's ModelEma: ema = decay * ema + (1 - decay) * param after every step, on the device."""
    # Buffers (CycleFC's integer offsets) are not averaged.

    def __init__(self, model: CycleNet, decay: float, to_static: bool = False) -> None:
        self.module = static_if(to_static, CycleNet(**model.config))
        self.module.set_state_dict(model.state_dict())   # never trained: evaluate() sets eval mode
        self.pairs = list(zip(self.module.parameters(), model.parameters()))
        self.rate = paddle.full([1], 1.0 - decay, dtype='float32')   # made once, on the device

    @paddle.no_grad()
    def update(self) -> None:
        for average, param in self.pairs:
            average.lerp_(param, self.rate)


def build_model(args: argparse.Namespace, num_classes: int, log: Callable[[str], None]) -> CycleNet:
    """The named variant or the --layers shape, optionally started from --finetune weights."""
    if args.layers:
        model = CycleNet(args.layers, args.embed_dims, args.mlp_ratios, num_classes, args.drop_path)
    else:
        model = create_model(args.model, num_classes=num_classes, drop_path_rate=args.drop_path)
    if args.flops:
        log(f'{count_flops(model, (args.input_size, args.input_size)) / 1e9:.2f} GFLOPs at {args.input_size}')
    if args.finetune:
        dropped = load_state(model, read_state(args.finetune)[0], source=args.finetune, drop_head=True)
        if dropped:
            log(f'{args.finetune}: dropped its {dropped}-class head for a new {num_classes}-class one')
        log(f'fine-tuning from {args.finetune}')
    return model


def build_optimizer(model: CycleNet, args: argparse.Namespace, lr: float) -> paddle.optimizer.AdamW:
    """AdamW with weight decay on every parameter except the 1-D ones (biases, norms)."""
    # apply_decay_param_fun receives Paddle's generated tensor names, not the attribute paths.
    no_decay = {param.name for param in model.parameters() if len(param.shape) == 1}
    return paddle.optimizer.AdamW(
        learning_rate=lr, beta1=args.opt_betas[0], beta2=args.opt_betas[1], epsilon=args.opt_eps,
        parameters=model.parameters(), weight_decay=args.weight_decay,
        apply_decay_param_fun=lambda tensor_name: tensor_name not in no_decay,
        grad_clip=paddle.nn.ClipGradByGlobalNorm(args.clip_grad) if args.clip_grad else None)


class Run:
    """This rank's data, the model, its EMA, AdamW at the scaled lr and the loss scaler (float16 AMP only)."""

    def __init__(self, args: argparse.Namespace, rank: int, world_size: int, log: Callable[[str], None]):
        self.train_set = build_dataset(True, args, train_transform(args))
        val_set, self.val_loader = validation_loader(args, rank, world_size)  # checked before any epoch
        try:
            self.train_loader = build_loader(self.train_set, is_train=True, batch_size=args.batch_size,
                                             num_workers=args.num_workers, num_replicas=world_size, rank=rank,
                                             seed=args.seed, repeated_aug=args.repeated_aug)
        except ValueError as error:  # fewer images than one batch per rank
            raise DatasetError(f'{args.data_path}: {error}') from None
        self.amp_dtype = args.amp_dtype if paddle.get_device().startswith('gpu') and not args.no_amp else None
        paddle.seed(args.seed)  # the same initial weights on every rank
        model = build_model(args, len(self.train_set.classes), log)
        # Linear scaling rule: lr = base_lr * global batch / 512 (global batch = per-device batch x ranks).
        self.base_lr = args.lr * args.batch_size * world_size / LR_REFERENCE_BATCH
        self.model = static_if(args.to_static, model)
        self.ema = ModelEma(model, args.model_ema_decay, args.to_static) if args.model_ema else None
        self.optimizer = build_optimizer(model, args, self.base_lr)
        self.scaler = paddle.amp.GradScaler(enable=self.amp_dtype == 'float16',
                                            init_loss_scaling=INIT_LOSS_SCALE)
        log(f'{variant_name(model.config) or "CycleNet"} {model.config}: '
            f'{count_parameters(model):,} parameters; {len(self.train_set)} training images, '
            f'{len(val_set)} validation images, {len(self.train_set.classes)} classes; {world_size} '
            f'process{"es" if world_size > 1 else ""}, global batch {args.batch_size * world_size}, '
            f'lr {self.base_lr:.3g}, {"AMP " + self.amp_dtype if self.amp_dtype else "float32"}')


def train_one_epoch(model: paddle.nn.Layer, run: Run, erasing: Optional[RandomErasing], mixup: Optional[Mixup],
                    epoch: int, args: argparse.Namespace, log: Callable[[str], None]) -> Dict[str, float]:
    """One pass over this rank's shard; the mean loss over all ranks and the lr."""
    # Losses are summed on the device and read (and checked finite) only at log lines: no host sync.
    model.train()
    world_size, total_steps = dist.get_world_size(), len(run.train_loader)
    loss_sum = paddle.zeros([], dtype='float32')
    start = time.time()
    for step, (images, labels) in enumerate(iterate(run.train_loader)):
        if erasing is not None:
            images = erasing(images)
        if mixup is not None:
            images, targets = mixup(images, labels)
        else:
            targets = smooth_one_hot(labels, len(run.train_set.classes), args.smoothing)
        with paddle.amp.auto_cast(enable=run.amp_dtype is not None, dtype=run.amp_dtype or 'float16'):
            logits = model(images)
        loss = soft_target_cross_entropy(logits, targets)
        # A stop raised inside Paddle's C++ backward (in a PyLayer of fast_layers) would print a C++ warning.
        with signals_deferred():   # a disabled scaler (no float16 AMP) passes loss and step through
            run.scaler.scale(loss).backward()
            run.scaler.step(run.optimizer)
            run.scaler.update()
        run.optimizer.clear_grad()
        if run.ema is not None:
            run.ema.update()
        loss = loss.detach()
        loss_sum = loss_sum + loss
        if step % args.print_freq == 0 or step == total_steps - 1:
            current = paddle.stack([loss, loss_sum])
            if world_size > 1:  # every rank sees the same values, so all stop together
                dist.all_reduce(current)
            loss_value, running_sum = (current.numpy() / world_size).tolist()
            if not (math.isfinite(loss_value) and math.isfinite(running_sum)):
                raise FloatingPointError(f'loss is {loss_value} at epoch {epoch + 1}, iteration {step + 1}/'
                                         f'{total_steps}; stopping (nothing was saved for this epoch)')
            elapsed = time.time() - start
            eta = elapsed / (step + 1) * (total_steps - step - 1)
            images_per_second = (step + 1) * images.shape[0] * world_size / max(elapsed, 1e-9)
            log(f'Epoch [{epoch + 1}/{args.epochs}] [{step + 1:>{len(str(total_steps))}}/{total_steps}] '
                f'eta {datetime.timedelta(seconds=int(eta))} lr {run.optimizer.get_lr():.6f} '
                f'loss {loss_value:.4f} ({running_sum / (step + 1):.4f}) {images_per_second:.0f} img/s')
    # The last step always logs, so running_sum is the all-rank total and is finite.
    return dict(loss=running_sum / total_steps, lr=run.optimizer.get_lr())


def evaluate_run(run: Run, args: argparse.Namespace, log: Callable[[str], None]) -> Dict[str, float]:
    """test_acc1, test_acc5, test_loss of the model and, with an EMA, of the EMA (keys ending in _ema)."""
    stats = {}
    for model, suffix in [(run.model, '')] + ([(run.ema.module, '_ema')] if run.ema is not None else []):
        results = evaluate(model, run.val_loader, args.print_freq, run.amp_dtype, log,
                           header='Test (EMA):' if suffix else 'Test:')
        stats.update({f'test_{key}{suffix}': value for key, value in results.items() if key != 'images'})
    return stats


def main(args: argparse.Namespace) -> Dict[str, float]:
    """Train (or with --eval only evaluate); returns the last epoch's log entry."""
    # Rank 0 holds --output-dir's lock for the whole run: a second run into it stops at once.
    cpu_setup.configure(args.threads, args.device)
    rank, world_size = init_distributed()
    if rank != 0 or not args.output_dir or args.eval:
        return train(args, rank, world_size, writes_files=False)
    os.makedirs(args.output_dir, exist_ok=True)
    with locked(args.output_dir, '--output-dir'):
        return train(args, rank, world_size, writes_files=True)


def train(args: argparse.Namespace, rank: int, world_size: int, writes_files: bool) -> Dict[str, float]:
    log = print if rank == 0 else (lambda line: None)
    resume = resolve_resume(args, world_size) if args.resume else None
    if args.eval and not (resume or args.finetune):     # none given, or --resume auto found none
        raise WeightsError(f'--eval needs weights: --resume PATH, --finetune PATH, or --resume auto with a '
                           f'{CHECKPOINT_FILE} in --output-dir ({args.output_dir or "none given"})')
    run = Run(args, rank, world_size, log)
    start_epoch, best_acc1 = load_checkpoint(resume, run, args) if resume else (0, 0.0)
    if resume:
        log(f'resumed from {printable(resume)} after epoch {start_epoch}')
    elif args.resume:
        log(f'no {CHECKPOINT_FILE} in {args.output_dir} yet: starting from scratch')
    if args.eval:
        run.ema = run.ema if resume else None    # a fresh EMA is the model again
        return evaluate_run(run, args, log)

    # Only now, with the data, the model and any checkpoint read, is an old run replaced.
    if writes_files:
        prepare_output_dir(args)
    visualdl = (importlib.import_module('visualdl').LogWriter(logdir=os.path.join(args.output_dir, 'visualdl'))
                if writes_files and args.visualdl else None)   # parse_args checked that it is installed
    parallel_model = paddle.DataParallel(run.model) if world_size > 1 else run.model
    num_classes = len(run.train_set.classes)
    entry: Dict[str, float] = {}
    for epoch in range(start_epoch, args.epochs):
        epoch_start = time.time()
        # Everything random in this epoch depends on (seed, epoch, rank) only: exact resumes.
        seed = args.seed + rank * RANK_SEED_STRIDE + epoch * EPOCH_SEED_STRIDE
        paddle.seed(seed)  # drop path, erasing's noise
        set_loader_epoch(run.train_loader, epoch)
        erasing = RandomErasing(args.reprob, args.remode, args.recount, seed=seed) if args.reprob > 0 else None
        mixup = Mixup(num_classes, args.mixup, args.cutmix, args.mixup_prob, args.mixup_switch_prob,
                      args.smoothing, seed=seed) if args.mixup > 0 or args.cutmix > 0 else None
        run.optimizer.set_lr(scheduled_lr(epoch, run.base_lr, args.epochs, args.warmup_epochs,
                                          args.warmup_lr, args.min_lr))
        train_stats = train_one_epoch(parallel_model, run, erasing, mixup, epoch, args, log)
        entry = dict(epoch=epoch + 1, lr=train_stats['lr'], train_loss=train_stats['loss'])
        if run.train_set.skipped:
            entry['skipped_images'] = run.train_set.skipped
            log(f'{run.train_set.skipped} unreadable training image(s) skipped so far')
        improved = False
        if (epoch + 1) % args.eval_interval == 0 or epoch == args.epochs - 1:
            entry.update(evaluate_run(run, args, log))
            improved = entry['test_acc1'] >= best_acc1     # ties: the later epoch
            best_acc1 = max(best_acc1, entry['test_acc1'])
            log(f'best acc1 {best_acc1:.2f}%')
        entry.update(n_parameters=count_parameters(run.model), epoch_time=time.time() - epoch_start)
        if writes_files:
            with signals_deferred():       # the epoch's files, all of them or none
                if improved:
                    write_weights(os.path.join(args.output_dir, BEST_FILE), numpy_state(run.model),
                                  model_meta(run, args))
                save_checkpoint(os.path.join(args.output_dir, CHECKPOINT_FILE), run, epoch + 1,
                                best_acc1, args)
                with open(os.path.join(args.output_dir, LOG_FILE), 'a') as log_file:
                    log_file.write(json_line(entry) + '\n')
                if visualdl is not None:
                    for key, value in entry.items():
                        visualdl.add_scalar(tag=key, value=value, step=epoch + 1)
    return entry


def interrupted_message(args: argparse.Namespace) -> str:
    saved = os.path.join(args.output_dir, CHECKPOINT_FILE) if args.output_dir else ''
    return 'interrupted' + (f'; {printable(saved)} holds the last complete epoch (--resume auto continues)'
                            if saved and os.path.isfile(saved) else '')


if __name__ == '__main__':
    arguments = parse_args()
    cli.run(main, arguments, lambda: interrupted_message(arguments))
