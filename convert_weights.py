"""Convert CycleMLP weights (official PyTorch releases, checkpoints, .pdparams, .safetensors)
into a Paddle-layout .pdparams or .safetensors file.

    python convert_weights.py CycleMLP_B1.pth cyclemlp_b1.pdparams
    converted 222 tensors (15,155,400 parameters) from CycleMLP_B1.pth (torch layout) to cyclemlp_b1.pdparams

Reading never runs code from the file (see weights.py), so untrusted downloads are safe to convert.
"""
import argparse
import sys

from weights import WeightsError, read_weights, torch_to_paddle, write_weights


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', metavar='SRC',
                        help='weights to read: torch.save zip (.pth), .pdparams, .pdckpt or '
                             '.safetensors (default: none, required)')
    parser.add_argument('dst', metavar='DST',
                        help='file to write, .pdparams or .safetensors (default: none, required)')
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
        write_weights(args.dst, state, meta)
    except WeightsError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    # CycleFC offsets are fixed buffers, not parameters.
    parameters = sum(value.size for key, value in state.items() if not key.endswith('.offset'))
    print(f'converted {len(state)} tensors ({parameters:,} parameters) from {args.src} '
          f'({layout} layout) to {args.dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
