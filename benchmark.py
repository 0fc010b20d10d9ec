"""Speed and memory of CycleMLP with three CycleFC implementations, measured side by side.

    python benchmark.py --model CycleMLP_B1 --batch-size 16 --input-size 224 --threads 2

Implementations (the same network and weights each time):
  index          this repo's model as shipped: index-op CycleFC and fast_layers.py's speed-ups
  index-plain    this repo's CycleFC in the official computation (fast_layers.ENABLED = False)
  deform         CycleFC by paddle.vision.ops.deform_conv2d in the official computation, as
                 every earlier Paddle port computes it
  none           the shifts removed (CycleFC becomes a plain channel FC) in the official
                 computation: the ceiling of index-plain
  index-static   this repo's model under paddle.jit.to_static, as train.py and evaluate.py run
                 it with --to-static (a static graph of Paddle's own layers)

Runs are interleaved (one step of each implementation in turn, repeated), so that drift in a
shared machine's speed hits all alike; the median of the repetitions is reported. Peak memory
of a training step is measured in a fresh process per implementation, on the device the model
runs on: on CPU the growth of the process's peak RSS and the peak of what Paddle allocated on
the host; on GPU the growth of Paddle's peak allocated GPU memory and its peak above the steady
state (never host memory).

Deployed inference (unless --skip-deploy): the model exported by export.py (run as a user runs
it), timed at batch 1 and 16 in eager Paddle, Paddle Inference's predictor as predict.py ships it
(export.PADDLE_INFERENCE_SETTINGS) and with its default Config, and ONNX Runtime as shipped
(export.ONNXRUNTIME_SETTINGS), with export.py's runners, interleaved, with the same thread count.
Each row names its device: ONNX Runtime runs on the CPU even where eager Paddle and Paddle
Inference run on a GPU, and the table says so.

--json prints one JSON object; a ratio that cannot be computed (an implementation not run) is null.
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


class DeformCycleFC(nn.Layer):
    """A CycleFC's parameters and offsets, computed as earlier ports compute it: deform_conv2d
    on NCHW maps with the offsets tiled over the map."""

    def __init__(self, layer: CycleFC):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        batch, height, width, channels = x.shape
        offset = self.layer.offset.expand([batch, 2 * channels, height, width])
        out = paddle.vision.ops.deform_conv2d(x.transpose([0, 3, 1, 2]), offset, self.layer.weight,
                                              self.layer.bias, deformable_groups=channels)
        return out.transpose([0, 2, 3, 1])                               # (B, C, H, W) -> (B, H, W, C)


class PlainFC(nn.Layer):
    """The ceiling: a CycleFC's parameters without its shift, a channel FC."""

    def __init__(self, layer: CycleFC):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        weight = self.layer.weight.reshape([self.layer.out_channels, self.layer.in_channels])
        return paddle.matmul(x, weight, transpose_y=True) + self.layer.bias


WRAPPERS = {'deform': DeformCycleFC, 'none': PlainFC}


def with_cycle_fc(model: nn.Layer, impl: str) -> nn.Layer:
    """model with each CycleFC computed by `impl`'s wrapper (same parameters), in place."""
    if impl in WRAPPERS:
        for mixer in model.sublayers():
            if isinstance(mixer, CycleMLP):
                mixer.sfc_h, mixer.sfc_w = WRAPPERS[impl](mixer.sfc_h), WRAPPERS[impl](mixer.sfc_w)
    return model


def as_impl(impl: str, step: Callable[[], None]) -> Callable[[], None]:
    """step, run with fast_layers on for 'index' and off (the official computation) otherwise;
    the switch is put back afterwards (the deployed eager model runs as shipped)."""
    def run():
        shipped, fast_layers.ENABLED = fast_layers.ENABLED, impl in ('index', 'index-static')
        try:
            step()
        finally:
            fast_layers.ENABLED = shipped
    return run


def synchronize() -> None:
    if paddle.device.is_compiled_with_cuda() and 'gpu' in paddle.get_device():
        paddle.device.cuda.synchronize()


def make_steps(args, impl: str) -> Dict[str, Callable[[], None]]:
    """One inference call and one training step (forward, backward, AdamW) of a fresh model: the
    classifier, or with --dense the feature backbone (its loss: the mean of every map)."""
    paddle.seed(0)
    model = create_backbone(args.model)[0] if args.dense else create_model(args.model)
    model = static_if(impl == 'index-static', with_cycle_fc(model, impl))
    images = paddle.randn([args.batch_size, 3, args.input_size, args.input_size])
    labels = paddle.randint(0, model.num_classes, [args.batch_size])
    optimizer = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=model.parameters())

    def loss_of(outputs):
        return sum(map(paddle.mean, outputs)) if args.dense else F.cross_entropy(outputs, labels)

    def infer():
        model.eval()
        with paddle.no_grad():
            model(images)

    def train():
        model.train()
        loss = loss_of(model(images))
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()

    return {'infer': as_impl(impl, infer), 'train': as_impl(impl, train)}


def make_layer_steps(args, impl: str, size: int, channels: int) -> Dict[str, Callable[[], None]]:
    """Forward, and forward + backward, of one CycleFC (1, 3) at a stage's size."""
    paddle.seed(0)
    layer = CycleFC(channels, channels, (1, 3))
    layer = WRAPPERS[impl](layer) if impl in WRAPPERS else layer
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


def peak_memory_mb(args, impl: str) -> List[float]:
    """Peak extra memory of training steps, in a fresh process so that peaks don't mix: the
    process's (peak RSS growth on CPU) and what Paddle allocated (its peak above the steady
    state after one step)."""
    command = [sys.executable, os.path.abspath(__file__), '--memory-probe', impl, '--model', args.model,
               '--batch-size', str(args.batch_size), '--input-size', str(args.input_size)]
    command += (['--threads', str(args.threads)] if args.threads else []) + (['--dense'] if args.dense else [])
    command += ['--device', args.device] if args.device else []
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return [float(value) for value in result.stdout.strip().splitlines()[-1].split()]


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: Linux carries that over
    from the parent across fork and exec, so a probe started by a big process would see the
    parent's peak."""
    with open('/proc/self/status') as status:
        for line in status:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) / 1024          # kB -> MB
    raise RuntimeError('no VmHWM in /proc/self/status: peak memory is measured on Linux only')


def memory_probe(args) -> None:
    """Child process of peak_memory_mb: print the peak memory growth of two training steps and
    Paddle's allocated peak of the second above the first's steady state, in MB, both on the
    device the model runs on (the host's on CPU, the GPU's on GPU)."""
    train = make_steps(args, args.memory_probe)['train']
    device = paddle.get_device()
    on_gpu = device.startswith('gpu')
    core, device_id = paddle.base.core, int(device.partition(':')[2] or 0)
    if on_gpu:
        current, peak, reset = (core.device_memory_stat_current_value, core.device_memory_stat_peak_value,
                                core.device_memory_stat_reset_peak_value)
    else:
        current, peak, reset = (core.host_memory_stat_current_value, core.host_memory_stat_peak_value,
                                core.host_memory_stat_reset_peak_value)
    stat_device = device_id if on_gpu else 0

    def peak_mb():   # on GPU Paddle's peak allocation since start-up (or the last reset) is the training peak
        return paddle.device.cuda.max_memory_allocated(device_id) / 2**20 if on_gpu else peak_rss_mb()

    before = paddle.device.cuda.memory_allocated(device_id) / 2**20 if on_gpu else peak_rss_mb()
    train()
    first_peak, steady = peak_mb(), current('Allocated', stat_device)
    reset('Allocated', stat_device)
    train()
    allocated = (peak('Allocated', stat_device) - steady) / 2**20
    print(max(first_peak, peak_mb()) - before, allocated)


def deployed_runners(args, directory: str) -> Dict[str, Callable[[np.ndarray], np.ndarray]]:
    """name -> run(batch) for eager Paddle and each runtime, on the model export.py wrote to
    directory from the same weights; export.py's runners, with the eager thread count."""
    paddle.seed(0)
    model = create_model(args.model)
    model.eval()
    threads = cpu_setup.current_threads()
    weights = os.path.join(directory, 'weights.pdparams')
    write_weights(weights, numpy_state(model))
    output = os.path.join(directory, 'exported')
    command = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'export.py'),
               '--weights', weights, '--output', output, '--input-size', str(args.input_size),
               '--threads', str(threads)]
    onnx = subprocess.run(command + ['--onnx'], capture_output=True).returncode == 0
    if not onnx:
        subprocess.run(command, capture_output=True, check=True)

    @paddle.no_grad()
    def eager(batch):
        paddle.base.core.set_num_threads(threads)   # a predictor's run leaves this thread with its own count
        return model(paddle.to_tensor(batch)).numpy()

    eager.settings = dict(device=paddle.get_device(), threads=threads)
    runners = {'eager': eager, 'paddle-inference': export.paddle_runner(output)}
    if eager.settings['device'] == 'cpu':   # on GPU the CPU default Config is not a deployment of it
        runners['paddle-inference-default-config'] = export.paddle_runner(output, default_config=True)
    if onnx:
        runners['onnxruntime'] = export.onnx_runner(output)
    return runners


def deployed_inference(args) -> List[dict]:
    """Images per second of inference at each of DEPLOY_BATCHES, every runtime interleaved."""
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        runners = deployed_runners(args, directory)
        for batch in DEPLOY_BATCHES:
            images = np.random.default_rng(0).standard_normal(
                (batch, 3, args.input_size, args.input_size)).astype(np.float32)
            timings = time_interleaved({name: {'infer': lambda run=run: run(images)}
                                        for name, run in runners.items()}, args.warmup, args.repeats)
            rows += [{'runtime': name, 'batch': batch, 'img_s': batch / times['infer'],
                      'settings': runners[name].settings} for name, times in timings.items()]
    return rows


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
    parser.add_argument('--impls', default=','.join(IMPLS),
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
    if a not in values or b not in values or not values[b]:
        return None
    quotient = values[a] / values[b]
    return quotient if np.isfinite(quotient) else None


def times_eager(value: Optional[float]) -> str:
    return '' if value is None else f' ({value:.2f}x)'


def deployed_ratios(deployed: List[dict]) -> Dict[str, Optional[float]]:
    """Each runtime's speed over eager Paddle's at the same batch size."""
    ratios = {}
    for batch in dict.fromkeys(row['batch'] for row in deployed):
        speeds = {row['runtime']: row['img_s'] for row in deployed if row['batch'] == batch}
        ratios.update({f'batch{batch}_{name}/eager': ratio(speeds, name, 'eager') for name in speeds if name != 'eager'})
    return ratios


def main(args: argparse.Namespace) -> dict:
    impls = [impl for impl in args.impls.split(',') if impl]
    args.batch_size = args.batch_size or (DENSE_BATCH if args.dense else 16)
    args.input_size = args.input_size or (DENSE_SIZE if args.dense else 224)
    settings = cpu_setup.configure(args.threads, args.device)   # every implementation gets the same count
    if args.memory_probe:
        memory_probe(args)
        return {}

    timings = time_interleaved({impl: make_steps(args, impl) for impl in impls}, args.warmup, args.repeats)
    results = []
    for impl in impls:
        results.append({
            'impl': impl,
            'infer_img_s': args.batch_size / timings[impl]['infer'],
            'train_img_s': args.batch_size / timings[impl]['train'],
            **dict(zip(('peak_mem_mb', 'peak_allocated_mb'),
                       [None, None] if args.skip_memory else peak_memory_mb(args, impl))),
        })
    layers = []
    if not args.skip_layer:
        for stage, (size, channels) in {'stage1': (args.input_size // 4, 64), 'stage3': (args.input_size // 16, 320)}.items():
            layer_times = time_interleaved({impl: make_layer_steps(args, impl, size, channels)
                                            for impl in impls if impl != 'index-plain'},
                                           args.warmup + 1, args.repeats * 2)
            for impl, modes in layer_times.items():
                layers.append({'layer': stage, 'shape': [args.batch_size, size, size, channels], 'impl': impl,
                               'forward_ms': modes['infer'] * 1e3, 'forward_backward_ms': modes['train'] * 1e3})
    deployed = [] if args.skip_deploy or args.dense else deployed_inference(args)
    report = {
        'device': paddle.get_device(), 'paddle': paddle.__version__,
        'threads': cpu_setup.current_threads(),
        'mkl_avx2_on_amd': settings.amd_mkl_path, 'freed_memory_kept': settings.freed_memory_kept,
        'model': args.model + ('_feat' if args.dense else ''), 'batch_size': args.batch_size,
        'input_size': args.input_size,
        'results': results, 'layers': layers, 'deployed': deployed,
        'ratios': {f'{key}_{a}/{b}': ratio({r['impl']: r[key] for r in results}, a, b)
                   for key in ('train_img_s', 'infer_img_s') for a, b in
                   (('index', 'deform'), ('index-plain', 'deform'), ('index-plain', 'none'))},
        'deployed_ratios': deployed_ratios(deployed),
    }
    if args.json:
        print(json.dumps(report, allow_nan=False))    # valid JSON: a NaN would be an error here
        return report
    print(f'{report["model"]}, batch {args.batch_size}, {args.input_size}x{args.input_size}, '
          f'device {report["device"]}, Paddle {report["paddle"]}, {report["threads"]} threads, '
          f'MKL AVX2 path on AMD: {"yes" if settings.amd_mkl_path else "no"}, '
          f'median of {args.repeats} interleaved rounds')
    memory_kind = 'GPU' if report['device'].startswith('gpu') else 'host'
    print(f'{"impl":<14} {"infer img/s":>12} {"train img/s":>12} {"peak MB":>9} {"allocated MB":>13}'
          + ('' if args.skip_memory else f'   (memory: {memory_kind})'))
    for r in results:
        memory = ['-' if r[key] is None else f'{r[key]:.0f}' for key in ('peak_mem_mb', 'peak_allocated_mb')]
        print(f'{r["impl"]:<14} {r["infer_img_s"]:>12.2f} {r["train_img_s"]:>12.2f} {memory[0]:>9} {memory[1]:>13}')
    for name, value in report['ratios'].items():
        if value is not None:
            print(f'{name}: {value:.2f}x')
    if layers:
        print(f'\none CycleFC (1, 3) alone\n{"layer":<8} {"impl":<8} {"shape":<20} {"fwd ms":>8} {"fwd+bwd ms":>11}')
        for row in layers:
            print(f'{row["layer"]:<8} {row["impl"]:<8} {str(row["shape"]):<20} '
                  f'{row["forward_ms"]:>8.1f} {row["forward_backward_ms"]:>11.1f}')
    if deployed:
        print(f'\ndeployed inference, img/s (x eager)\n{"runtime":<32} {"device":<7} '
              + ' '.join(f'{f"batch {b}":>15}' for b in DEPLOY_BATCHES) + '  settings')
        for name in dict.fromkeys(row['runtime'] for row in deployed):
            rows = [row for row in deployed if row['runtime'] == name]
            speeds = [f'{row["img_s"]:.2f}' + times_eager(report['deployed_ratios'].get(f'batch{row["batch"]}_{name}/eager'))
                      for row in rows]
            settings = ', '.join(f'{key}={value}' for key, value in rows[0]['settings'].items() if key != 'device')
            print(f'{name:<32} {rows[0]["settings"]["device"]:<7} ' + ' '.join(f'{speed:>15}' for speed in speeds)
                  + f'  {settings}')
        devices = {row['settings']['device'] for row in deployed}
        if len(devices) > 1:
            print(f'note: the rows run on different devices ({", ".join(sorted(devices))}): '
                  'their ratios compare devices, not only runtimes')
    return report


if __name__ == '__main__':
    argument_parser = get_args_parser()
    arguments = argument_parser.parse_args()
    unknown = set(arguments.impls.split(',')) - set(IMPLS) - {''}
    if unknown:
        argument_parser.error(f'--impls: unknown {sorted(unknown)}; choose from {IMPLS}')
    try:
        cli.run(main, arguments)
    except subprocess.CalledProcessError as error:   # a memory probe or export.py failed
        stderr = error.stderr if isinstance(error.stderr, str) else (error.stderr or b'').decode()
        reason = stderr.strip().splitlines()[-1] if stderr.strip() else f'exit status {error.returncode}'
        sys.exit(f'error: {os.path.basename(error.cmd[1])} failed: {reason}')
