"""Convert CycleMLP weights (official PyTorch releases, checkpoints, .pdparams, .safetensors)
into a Paddle-layout .pdparams or .safetensors file.

    python convert_weights.py CycleMLP_B1.pth cyclemlp_b1.pdparams
    converted CycleMLP_B1: 222 tensors (15,155,400 parameters) from CycleMLP_B1.pth (torch layout) to cyclemlp_b1.pdparams

The weights are loaded into the model they describe before anything is written, so a file that
does not fit CycleMLP (missing or extra keys, wrong shapes, foreign CycleFC offsets) is refused.
The output records the model name and architecture, so later commands need only the file.
Reading never runs code from the file (see weights.py), so untrusted downloads are safe to convert.
"""
import argparse
import sys

import cpu_setup  # noqa: F401  (first: sets up the CPU before Paddle loads)
from cyclemlp import MODELS, CycleNet, config_from_state, count_parameters, load_state, variant_name
from weights import WeightsError, read_weights, torch_to_paddle, write_weights


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', metavar='SRC',
                        help='weights to read: torch.save zip (.pth), .pdparams, .pdckpt or '
                             '.safetensors (default: none, required)')
    parser.add_argument('dst', metavar='DST',
                        help='file to write, .pdparams or .safetensors (default: none, required)')
    parser.add_argument('--model', default=None, choices=list(MODELS),
                        help='check the weights against this variant (default: the one the file '
                             'records, else the one its shapes describe)')
    parser.add_argument('--ema', action='store_true',
                        help="convert the checkpoint's 'model_ema' weights instead of 'model' "
                             '(default: False)')
    return parser


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        state, meta, layout = read_weights(args.src, ema=args.ema)
        if layout == 'torch':
            state = torch_to_paddle(state)
        config = config_from_state(state)
        name = args.model or meta.get('model_name') or variant_name(config)
        model = MODELS[name](num_classes=config['num_classes']) if name in MODELS else CycleNet(**config)
        load_state(model, state, source=args.src)
        meta = {**meta, 'model_args': config, **({'model_name': name} if name else {})}
        write_weights(args.dst, state, meta)
    except WeightsError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    print(f'converted {name or "a custom CycleNet"}: {len(state)} tensors '
          f'({count_parameters(model):,} parameters) from {args.src} ({layout} layout) to {args.dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
