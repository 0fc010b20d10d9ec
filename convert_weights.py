"""Convert CycleMLP weights (official PyTorch releases, checkpoints, .pdparams, .safetensors)
into a Paddle-layout .pdparams or .safetensors file.

    python convert_weights.py CycleMLP_B1.pth cyclemlp_b1.pdparams
    converted CycleMLP_B1: 222 tensors (15,155,400 parameters) from CycleMLP_B1.pth to cyclemlp_b1.pdparams

The weights are loaded into the model they describe first, so a file that does not fit CycleMLP
is refused; reading never runs code from the file (weights.py). The output records the model name.
"""
import argparse
import os

import cli  # first: imports Paddle without its import-time notices
import cpu_setup
from cyclemlp import ARCHITECTURES
from safe_io import printable
from weights import WeightsError, write_weights
from zoo import count_parameters, load_model, numpy_state, variant_name


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False)
    parser.add_argument('src', metavar='SRC',
                        help='weights to read: torch.save zip (.pth), .pdparams, .pdckpt or '
                             '.safetensors, or a model name (CycleMLP_B1 ..) for its official '
                             'weights, downloaded once (default: none, required)')
    parser.add_argument('dst', metavar='DST',
                        help='file to write, .pdparams or .safetensors (default: none, required)')
    parser.add_argument('--model', default=None, choices=list(ARCHITECTURES),
                        help='check the weights against this variant (default: the one the file '
                             'records, else the one its shapes describe)')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace DST if it exists (default: off: an existing DST is refused)')
    parser.add_argument('--ema', action='store_true',
                        help="convert the checkpoint's 'model_ema' weights instead of 'model' "
                             '(default: False)')
    return parser


def main(args: argparse.Namespace) -> None:
    cpu_setup.configure()
    if os.path.lexists(args.dst) and not args.overwrite:
        raise WeightsError(f'{args.dst}: exists; choose another destination or pass --overwrite')
    model, meta = load_model(args.src, args.model, ema=args.ema)
    state = numpy_state(model)
    name = variant_name(model.config)
    write_weights(args.dst, state, {**meta, **({'model_name': name} if name else {})})
    print(f'converted {name or "a custom CycleNet"}: {len(state)} tensors '
          f'({count_parameters(model):,} parameters) from {printable(args.src)} to {printable(args.dst)}')


if __name__ == '__main__':
    cli.run(main, get_args_parser().parse_args())
