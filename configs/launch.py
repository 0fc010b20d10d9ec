"""Run a toolkit's own script (PaddleSeg's or PaddleDetection's tools/train.py, tools/val.py,
tools/eval.py, ...) with this repo's backbones registered, as the configs beside this file need:

    python configs/launch.py PaddleSeg/tools/train.py --config configs/paddleseg/<config>.yml --do_eval
    python -m paddle.distributed.launch --gpus 0,1,2,3,4,5,6,7 \\
        configs/launch.py PaddleDetection/tools/train.py -c configs/paddledet/<config>.yml --eval

The toolkit's checkout (the folder above tools/) goes first on the import path, as its scripts
put it; then the adapter of each toolkit that can be imported is (paddleseg_backbone,
paddledet_backbone), and the script runs as __main__ with the arguments after it.
"""
import importlib
import importlib.util
import os
import runpy
import sys
import zlib  # noqa: F401  before Paddle: Paddle 2.6 bundles a zlib that crashes one loaded after it

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USAGE = 'usage: python configs/launch.py TOOLKIT/tools/SCRIPT.py [its arguments ...]'


def main() -> None:
    if len(sys.argv) < 2 or not os.path.isfile(sys.argv[1]):
        print(USAGE if len(sys.argv) < 2 else f'{USAGE}\nno such script: {sys.argv[1]}', file=sys.stderr)
        sys.exit(2)
    script = os.path.abspath(sys.argv[1])
    sys.path[:0] = [os.path.dirname(script), os.path.dirname(os.path.dirname(script)), REPO_ROOT]
    # Paddle 2.6.2's wheel and the newest pycocotools and lap wheels (PaddleDetection imports
    # them) clash over zlib: imported after Paddle they crash the process, so they come first.
    for module in ('pycocotools.coco', 'lap'):
        if importlib.util.find_spec(module.split('.')[0]) is not None:
            importlib.import_module(module)
    for package, adapter in (('paddleseg', 'paddleseg_backbone'), ('ppdet', 'paddledet_backbone')):
        if importlib.util.find_spec(package) is not None:
            importlib.import_module(adapter)
    sys.argv = [script] + sys.argv[2:]
    runpy.run_path(script, run_name='__main__')


if __name__ == '__main__':
    main()
