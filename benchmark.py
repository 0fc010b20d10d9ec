"""Speed and memory of CycleMLP with three CycleFC formulations, and of its deployed runtimes.

    python benchmark.py --model CycleMLP_B1 --batch-size 16 --input-size 224 --threads 2

--impls (the same network and weights each time): index, the model as shipped (fast_layers.py
on); index-plain, the official computation (fast_layers.ENABLED = False); deform, CycleFC by
deform_conv2d as earlier Paddle ports compute it; none, the shifts removed (a channel FC: the
ceiling of index-plain); index-static, the model under paddle.jit.to_static.
Steps are interleaved (one of each in turn, repeated; medians), so that a shared machine's drift
hits all alike. Peak memory of a training step: a fresh process per implementation, on the model's
device. Deployed (unless --skip-deploy): export.py's model at batch 1 and 16 in Paddle Inference
and ONNX Runtime as predict.py runs them, beside eager. --json: one JSON object, null where a
ratio cannot be computed.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import cli  # first: imports Paddle without its import-time notices
import cpu_setup
import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

import export
import fast_layers
from cli import bounded, device_name, static_if
from cycle_fc import CycleFC
from cyclemlp import ARCHITECTURES, CycleMLP
from weights import INPUT_SIZE_RANGE, write_weights
from zoo import create_backbone, create_model, numpy_state

IMPLS = ['index', 'index-plain', 'deform', 'none', 'index-static']
DENSE_SIZE, DENSE_BATCH = 512, 2
DEPLOY_BATCHES = (1, 16)


class OtherCycleFC(nn.Layer):
    """A CycleFC computed as earlier ports do ('deform': deform_conv2d, offsets tiled), or unshifted ('none')."""

    def __init__(self, layer: CycleFC, impl: str):
        super().__init__()
        self.layer, self.impl = layer, impl

    def forward(self, x):
        layer = self.layer
        if self.impl == 'none':
            weight = layer.weight.reshape([layer.out_channels, layer.in_channels])
            return paddle.matmul(x, weight, transpose_y=True) + layer.bias
        batch, height, width, channels = x.shape
        offset = layer.offset.expand([batch, 2 * channels, height, width])
        out = paddle.vision.ops.deform_conv2d(x.transpose([0, 3, 1, 2]), offset, layer.weight, layer.bias,
                                              deformable_groups=channels)
        return out.transpose([0, 2, 3, 1])                               # (B, C, H, W) -> (B, H, W, C)


def as_impl(impl: str, step: Callable[[], None]) -> Callable[[], None]:
    """step, with fast_layers on for 'index' and 'index-static', off (the official computation) otherwise."""
    def run():
        shipped, fast_layers.ENABLED = fast_layers.ENABLED, impl in ('index', 'index-static')
        try:
            step()
        finally:
            fast_layers.ENABLED = shipped
    return run


def make_steps(args, impl: str) -> Dict[str, Callable[[], None]]:
    """One inference call and one training step (forward, backward, AdamW) of a fresh model: the
    classifier, or with --dense the feature backbone (its loss: the mean of every map)."""
    paddle.seed(0)
    model = create_backbone(args.model)[0] if args.dense else create_model(args.model)
    if impl in ('deform', 'none'):
        for mixer in model.sublayers():
            if isinstance(mixer, CycleMLP):
                mixer.sfc_h, mixer.sfc_w = OtherCycleFC(mixer.sfc_h, impl), OtherCycleFC(mixer.sfc_w, impl)
    model = static_if(impl == 'index-static', model)
    images = paddle.randn([args.batch_size, 3, args.input_size, args.input_size])
    labels = paddle.randint(0, model.num_classes, [args.batch_size])
    optimizer = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=model.parameters())

    def infer():
        model.eval()
        with paddle.no_grad():
            model(images)

    def train():
        model.train()
        outputs = model(images)
        (sum(map(paddle.mean, outputs)) if args.dense else F.cross_entropy(outputs, labels)).backward()
        optimizer.step()
        optimizer.clear_grad()

    return {'infer': as_impl(impl, infer), 'train': as_impl(impl, train)}


def make_layer_steps(args, impl: str, size: int, channels: int) -> Dict[str, Callable[[], None]]:
    """Forward, and forward + backward, of one CycleFC (1, 3) at a stage's size."""
    paddle.seed(0)
    layer = CycleFC(channels, channels, (1, 3))
    layer = OtherCycleFC(layer, impl) if impl in ('deform', 'none') else layer
    x = paddle.randn([args.batch_size, size, size, channels])
    x.stop_gradient = False

    def infer():
        with paddle.no_grad():
            layer(x)

    def train():
        layer(x).sum().backward()
        layer.clear_gradients()

    return {'infer': infer, 'train': train}


def time_interleaved(steps: Dict[str, Dict[str, Callable]], warmup: int, repeats: int) -> Dict[str, Dict[str, float]]:
    """Median seconds per call of every (impl, mode), alternating implementations each round."""
    synchronize = paddle.device.cuda.synchronize if 'gpu' in paddle.get_device() else lambda: None
    times = {impl: {mode: [] for mode in fns} for impl, fns in steps.items()}
    for round_index in range(warmup + repeats):
        for impl, fns in steps.items():
            for mode, fn in fns.items():
                synchronize()
                start = time.perf_counter()
                fn()
                synchronize()
                if round_index >= warmup:
                    times[impl][mode].append(time.perf_counter() - start)
    return {impl: {mode: float(np.median(t)) for mode, t in modes.items()} for impl, modes in times.items()}


def run_child(command: List[str]) -> str:
    """The stdout of a child process; ChildProcessError with the last line of its stderr if it fails."""
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        reason = (result.stderr.strip().splitlines() or [f'exit status {result.returncode}'])[-1]
        raise ChildProcessError(f'{os.path.basename(command[1])} failed: {reason}')
    return result.stdout


def peak_memory_mb(args, impl: str) -> List[float]:
    """memory_probe's two numbers, in a fresh process so that peaks don't mix."""
    command = [sys.executable, os.path.abspath(__file__), '--memory-probe', impl, '--model', args.model,
               '--batch-size', str(args.batch_size), '--input-size', str(args.input_size),
               '--threads', str(cpu_setup.current_threads())]
    command += (['--dense'] if args.dense else []) + (['--device', args.device] if args.device else [])
    return [float(value) for value in run_child(command).split()[-2:]]


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; Linux carries ru_maxrss over from the parent)."""
    with open('/proc/self/status') as status:   # Linux only, as is --memory-probe's number
        return next(int(line.split()[1]) for line in status if line.startswith('VmHWM:')) / 1024   # kB -> MB


def memory_probe(args) -> None:
    """Child of peak_memory_mb: print, in MB, on the model's device, the peak growth over two training
    steps and Paddle's allocated peak of the second above the first's steady state."""
    train = make_steps(args, args.memory_probe)['train']
    device = paddle.get_device()
    if device.startswith('gpu'):
        kind, index = 'device', int(device.partition(':')[2] or 0)
        peak_mb = lambda: paddle.device.cuda.max_memory_allocated(index) / 2**20     # noqa: E731
        before = paddle.device.cuda.memory_allocated(index) / 2**20
    else:
        kind, index, peak_mb = 'host', 0, peak_rss_mb
        before = peak_rss_mb()
    current, peak, reset = (getattr(paddle.base.core, f'{kind}_memory_stat_{name}')
                            for name in ('current_value', 'peak_value', 'reset_peak_value'))
    train()
    first_peak, steady = peak_mb(), current('Allocated', index)
    reset('Allocated', index)
    train()
    print(max(first_peak, peak_mb()) - before, (peak('Allocated', index) - steady) / 2**20)


def deployed_inference(args) -> List[dict]:
    """Images per second of eager Paddle and of each runtime on export.py's model of the same weights."""
    paddle.seed(0)
    model = create_model(args.model)
    model.eval()
    threads = cpu_setup.current_threads()

    @paddle.no_grad()
    def eager(batch):
        paddle.base.core.set_num_threads(threads)   # a predictor's run leaves this thread with its own count
        return model(paddle.to_tensor(batch)).numpy()

    eager.settings = dict(device=paddle.get_device(), threads=threads)
    with tempfile.TemporaryDirectory() as directory:
        weights, output = os.path.join(directory, 'weights.pdparams'), os.path.join(directory, 'exported')
        write_weights(weights, numpy_state(model))
        command = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'export.py'),
                   '--weights', weights, '--output', output, '--input-size', str(args.input_size),
                   '--threads', str(threads)]
        onnx = subprocess.run(command + ['--onnx'], capture_output=True).returncode == 0
        if not onnx:
            run_child(command)
        # As predict.py runs them; the default Config (the same settings) is export.py's check only.
        runners = {'eager': eager, 'paddle-inference': export.paddle_runner(output)}
        if onnx:
            runners['onnxruntime'] = export.onnx_runner(output)
    rows = []
    for batch in DEPLOY_BATCHES:
        images = np.random.default_rng(0).standard_normal((batch, 3, args.input_size, args.input_size))
        timings = time_interleaved({name: {'infer': lambda run=run: run(images.astype(np.float32))}
                                    for name, run in runners.items()}, args.warmup, args.repeats)
        rows += [{'runtime': name, 'batch': batch, 'img_s': batch / times['infer'],
                  'settings': runners[name].settings} for name, times in timings.items()]
    return rows


def impl_list(text: str) -> List[str]:
    impls = [impl for impl in text.split(',') if impl]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        raise argparse.ArgumentTypeError(f'unknown {unknown}; choose from {IMPLS}')
    return impls


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('CycleMLP benchmark', description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='CycleMLP_B1', choices=list(ARCHITECTURES),
                        help='model to measure (default: CycleMLP_B1)')
    parser.add_argument('--dense', action='store_true',
                        help='time the feature backbone for dense prediction (zoo.create_backbone) at '
                             f'{DENSE_SIZE}x{DENSE_SIZE}, batch {DENSE_BATCH}, instead of the classifier; no '
                             'deployment table (default: off)')
    parser.add_argument('--batch-size', default=None, type=bounded(int, 1),
                        help=f'images per step (default: 16, with --dense {DENSE_BATCH})')
    parser.add_argument('--input-size', default=None, type=bounded(int, *INPUT_SIZE_RANGE),
                        help=f'image height and width (default: 224, with --dense {DENSE_SIZE}, the ADE20K crop)')
    parser.add_argument('--device', default=None, type=device_name,
                        help='cpu, gpu or gpu:N (default: Paddle\'s default device)')
    parser.add_argument('--threads', default=None, type=bounded(int, 1, cpu_setup.MAX_THREADS),
                        help='CPU threads (default: as every command: OMP_NUM_THREADS if set, else '
                             f'every core this process may use, {cpu_setup.available_cores()} here)')
    parser.add_argument('--impls', default=IMPLS, type=impl_list,
                        help=f'comma-separated implementations (default: {",".join(IMPLS)})')
    parser.add_argument('--warmup', default=1, type=bounded(int, 0), help='untimed rounds first (default: 1)')
    parser.add_argument('--repeats', default=3, type=bounded(int, 1), help='timed rounds (default: 3)')
    parser.add_argument('--skip-layer', action='store_true',
                        help='skip the single-layer measurements (default: False)')
    parser.add_argument('--skip-deploy', action='store_true',
                        help='skip the deployed-inference table (default: False)')
    parser.add_argument('--skip-memory', action='store_true',
                        help='skip the peak-memory processes (default: False)')
    parser.add_argument('--json', action='store_true', help='print one JSON object (default: False)')
    parser.add_argument('--memory-probe', default=None, choices=IMPLS, help=argparse.SUPPRESS)
    return parser


def ratio(values: Dict[str, float], a: str, b: str) -> Optional[float]:
    """values[a] / values[b], or None (JSON null) where either is missing or it is not finite."""
    quotient = values[a] / values[b] if a in values and values.get(b) else np.nan
    return quotient if np.isfinite(quotient) else None


def main(args: argparse.Namespace) -> dict:
    args.batch_size = args.batch_size or (DENSE_BATCH if args.dense else 16)
    args.input_size = args.input_size or (DENSE_SIZE if args.dense else 224)
    settings = cpu_setup.configure(args.threads, args.device)   # every implementation gets the same count
    if args.memory_probe:
        return memory_probe(args)
    timings = time_interleaved({impl: make_steps(args, impl) for impl in args.impls}, args.warmup, args.repeats)
    results = [{'impl': impl, 'infer_img_s': args.batch_size / timings[impl]['infer'],
                'train_img_s': args.batch_size / timings[impl]['train'],
                **dict(zip(('peak_mem_mb', 'peak_allocated_mb'),
                           [None, None] if args.skip_memory else peak_memory_mb(args, impl)))} for impl in args.impls]
    layers = []
    for stage, (size, channels) in {} if args.skip_layer else {'stage1': (args.input_size // 4, 64),
                                                                'stage3': (args.input_size // 16, 320)}.items():
        layer_times = time_interleaved({impl: make_layer_steps(args, impl, size, channels) for impl in args.impls
                                        if impl != 'index-plain'}, args.warmup + 1, args.repeats * 2)
        layers += [{'layer': stage, 'shape': [args.batch_size, size, size, channels], 'impl': impl,
                    'forward_ms': modes['infer'] * 1e3, 'forward_backward_ms': modes['train'] * 1e3}
                   for impl, modes in layer_times.items()]
    deployed = [] if args.skip_deploy or args.dense else deployed_inference(args)
    speeds = {(row['runtime'], row['batch']): row['img_s'] for row in deployed}
    report = {
        'device': paddle.get_device(), 'paddle': paddle.__version__, 'threads': cpu_setup.current_threads(),
        'mkl_avx2_on_amd': settings.amd_mkl_path, 'freed_memory_kept': settings.freed_memory_kept,
        'model': args.model + ('_feat' if args.dense else ''), 'batch_size': args.batch_size,
        'input_size': args.input_size, 'results': results, 'layers': layers, 'deployed': deployed,
        'ratios': {f'{key}_{a}/{b}': ratio({r['impl']: r[key] for r in results}, a, b)
                   for key in ('train_img_s', 'infer_img_s') for a, b in
                   (('index', 'deform'), ('index-plain', 'deform'), ('index-plain', 'none'))},
        'deployed_ratios': {f'batch{batch}_{name}/eager': ratio(speeds, (name, batch), ('eager', batch))
                            for name, batch in speeds if name != 'eager'},
    }
    if args.json:
        print(json.dumps(report, allow_nan=False))    # valid JSON: a NaN would be an error here
        return report
    print(f'{report["model"]}, batch {args.batch_size}, {args.input_size}x{args.input_size}, device '
          f'{report["device"]}, Paddle {report["paddle"]}, {report["threads"]} threads, MKL AVX2 path on AMD: '
          f'{"yes" if settings.amd_mkl_path else "no"}, median of {args.repeats} interleaved rounds')
    print(f'{"impl":<14} {"infer img/s":>12} {"train img/s":>12} {"peak MB":>9} {"allocated MB":>13}'
          + ('' if args.skip_memory else f'   (memory: {"GPU" if "gpu" in report["device"] else "host"})'))
    for r in results:
        memory = ['-' if r[key] is None else f'{r[key]:.0f}' for key in ('peak_mem_mb', 'peak_allocated_mb')]
        print(f'{r["impl"]:<14} {r["infer_img_s"]:>12.2f} {r["train_img_s"]:>12.2f} {memory[0]:>9} {memory[1]:>13}')
    print(''.join(f'{name}: {value:.2f}x\n' for name, value in report['ratios'].items() if value is not None), end='')
    if layers:
        print(f'\none CycleFC (1, 3) alone\n{"layer":<8} {"impl":<8} {"shape":<20} {"fwd ms":>8} {"fwd+bwd ms":>11}')
        for row in layers:
            print(f'{row["layer"]:<8} {row["impl"]:<8} {str(row["shape"]):<20} '
                  f'{row["forward_ms"]:>8.1f} {row["forward_backward_ms"]:>11.1f}')
    if deployed:
        print(f'\ndeployed inference\n{"runtime":<17} {"batch":>5} {"img/s":>9} {"x eager":>8}  settings')
        for row in deployed:
            times_eager = report['deployed_ratios'].get(f'batch{row["batch"]}_{row["runtime"]}/eager')
            print(f'{row["runtime"]:<17} {row["batch"]:>5} {row["img_s"]:>9.2f} '
                  f'{"" if times_eager is None else f"{times_eager:.2f}x":>8}  '
                  + ', '.join(f'{key}={value}' for key, value in row['settings'].items()))
        devices = {row['settings']['device'] for row in deployed}
        if len(devices) > 1:
            print(f'note: the rows run on different devices ({", ".join(sorted(devices))}): '
                  'their ratios compare devices, not only runtimes')
    return report


if __name__ == '__main__':
    cli.run(main, get_args_parser().parse_args())
