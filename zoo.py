"""CycleMLP models by name and with weights: create_model, load_model, and the paper's counts.

    model = create_model('CycleMLP_B1', num_classes=1000, drop_path_rate=0.1)   # fresh weights
    model = create_model('CycleMLP_B1', pretrained=True)   # the official ImageNet-1k weights
    model, meta = load_model('CycleMLP_B1.pth')     # any weights file; meta: what it records

A variant name where weights are accepted means its official file (download.py); an existing path
always means the file. A file decides the model built from it, so it is checked first: the
architecture read off its shapes (bounded by the parameters it holds), then its keys and shapes
on a model built without memory (paddle.LazyGuard).
"""
import os
import zlib  # noqa: F401  before Paddle: Paddle 2.6 bundles a zlib that crashes one loaded after it
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import paddle
import paddle.nn as nn

import download
from cyclemlp import ARCHITECTURES, CycleNet, check_arguments
from weights import WeightsError, describe, read_weights, torch_to_paddle

ARCHITECTURE_KEYS = ('layers', 'embed_dims', 'mlp_ratios')
MAX_LISTED = 10   # keys of each kind named in an error


def variant_name(config: dict) -> Optional[str]:
    """The CycleMLP_Bx whose architecture config describes (any class count), or None."""
    architecture = {key: list(config[key]) for key in ARCHITECTURE_KEYS}
    return next((name for name, known in ARCHITECTURES.items() if known == architecture), None)


def parameter_count(layers: Sequence[int], embed_dims: Sequence[int], mlp_ratios: Sequence[float],
                    num_classes: int) -> int:
    """count_parameters of the CycleNet these arguments build, without building it."""
    count = 3 * 7 * 7 * embed_dims[0] + embed_dims[0]                       # stem
    for stage, (depth, dim, ratio) in enumerate(zip(layers, embed_dims, mlp_ratios)):
        hidden, squeezed = int(dim * ratio), dim // 4
        per_block = (4 * dim + 4 * dim * dim + 3 * dim                        # norms, 4 FCs, 3 biases
                     + dim * squeezed + squeezed + squeezed * 3 * dim + 3 * dim  # reweight
                     + 2 * dim * hidden + hidden + dim)                      # mlp
        count += depth * per_block
        if stage < len(layers) - 1:
            count += 9 * dim * embed_dims[stage + 1] + embed_dims[stage + 1]  # downsampling conv
    return count + 2 * embed_dims[-1] + embed_dims[-1] * num_classes + num_classes


def config_from_state(state: Dict[str, np.ndarray], source: str = 'weights') -> dict:
    """layers, embed_dims, mlp_ratios and num_classes read off a CycleNet state dict, or
    WeightsError; the model they describe is no larger than the file (it holds every parameter)."""
    def length(key: str) -> int:
        if key not in state:
            raise WeightsError(f'{source}: not a CycleMLP state dict (no {key})')
        if state[key].ndim != 1 or state[key].size == 0:
            raise WeightsError(f'{source}: {key} has shape {list(state[key].shape)}, expected a '
                               'non-empty vector')
        return state[key].shape[0]

    layers, embed_dims, mlp_ratios = [], [], []
    for stage in range(0, 7, 2):
        blocks = {key.split('.')[2] for key in state if key.startswith(f'network.{stage}.')}
        if not blocks or blocks != {str(index) for index in range(len(blocks))}:
            raise WeightsError(f'{source}: the blocks of network.{stage} are not numbered 0..n-1')
        dim, hidden = length(f'network.{stage}.0.norm1.weight'), length(f'network.{stage}.0.mlp.fc1.bias')
        layers.append(len(blocks))
        embed_dims.append(dim)
        mlp_ratios.append(hidden // dim if hidden % dim == 0 else hidden / dim)
    config = dict(layers=layers, embed_dims=embed_dims, mlp_ratios=mlp_ratios,
                  num_classes=length('head.bias'))
    try:
        check_arguments(**config, drop_path_rate=0.0)
    except ValueError as error:       # shapes no CycleNet has
        raise WeightsError(f'{source}: {error}') from None
    if parameter_count(**config) > sum(value.size for value in state.values()):
        raise WeightsError(f'{source}: its shapes describe a CycleNet {layers} {embed_dims} with '
                           'more parameters than the file holds')
    return config


def weights_file(weights: str) -> str:
    """An existing path, else the official weights of the variant `weights` names."""
    weights = str(weights)
    if os.path.exists(weights) or weights not in download.RELEASES:
        if not os.path.lexists(weights):
            raise WeightsError(f'{weights}: no such file (and not a model name: '
                               f'{", ".join(download.RELEASES)})')
        return weights
    return download.official_weights(weights, lambda path: check_official(path, weights))


def check_official(path: str, name: str) -> None:
    """WeightsError unless path holds variant name's 1000-class weights, key for key and shape for shape."""
    state, _ = read_state(path)
    with paddle.LazyGuard():
        fitting_state(CycleNet(**ARCHITECTURES[name]), state, path)


def read_state(path: str, ema: bool = False) -> Tuple[Dict[str, np.ndarray], dict]:
    """(Paddle-layout state dict, meta) of a weights file or variant name (weights_file)."""
    state, meta, layout = read_weights(weights_file(path), ema=ema)
    return (torch_to_paddle(state) if layout == 'torch' else state), meta


def numpy_state(model: nn.Layer) -> Dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in model.state_dict().items()}


def fitting_state(model: CycleNet, state: Dict[str, np.ndarray], source: str = 'weights',
                  drop_head: bool = False, fresh: Sequence[str] = ()) -> Dict[str, np.ndarray]:
    """The entries of state to load into model, or WeightsError listing every mismatch; drop_head leaves out a
    classifier of another class count, keys in `fresh` may be missing. Works on a paddle.LazyGuard model."""
    expected = model.state_dict()
    file_classes = state['head.bias'].shape[0] if 'head.bias' in state else None
    if file_classes is not None and file_classes != model.num_classes:
        if not drop_head:
            raise WeightsError(f'{source}: the file has a {file_classes}-class head but the model '
                               f'has {model.num_classes} classes; build the model with '
                               f'num_classes={file_classes}, or drop the head to fine-tune')
        state = {key: value for key, value in state.items() if not key.startswith('head.')}
        expected = {key: value for key, value in expected.items() if not key.startswith('head.')}
    problems = []
    for kind, keys in (('missing', sorted(set(expected) - set(state) - set(fresh))),
                       ('unexpected', sorted(set(state) - set(expected)))):
        if keys:
            problems.append(f'{kind} keys ({len(keys)}): {", ".join(map(describe, keys[:MAX_LISTED]))}'
                            + (' ...' if len(keys) > MAX_LISTED else ''))
    for key in sorted(set(expected) & set(state)):
        want, got = list(expected[key].shape), list(state[key].shape)
        if want != got:
            problems.append(f'{key}: shape {got} in the file, {want} in the model')
        elif key.endswith('.offset') and not np.array_equal(state[key], expected[key].numpy()):
            problems.append(f'{key}: offsets differ from the CycleFC pattern this layer computes')
        elif not np.isfinite(state[key]).all():     # weights, not a metric: NaN logits follow
            problems.append(f'{key}: holds NaN or infinite values')
        if len(problems) > 2 + MAX_LISTED:
            problems.append('...')
            break
    if problems:
        raise WeightsError(f'{source} does not fit CycleNet {model.config["layers"]} '
                           f'{model.config["embed_dims"]}: ' + '; '.join(problems))
    return state


def assign(model: nn.Layer, state: Dict[str, np.ndarray]) -> None:
    parameters = model.state_dict()
    for key, value in state.items():
        parameters[key].set_value(paddle.to_tensor(value, dtype=parameters[key].dtype))


def load_state(model: CycleNet, state: Dict[str, np.ndarray], source: str = 'weights',
               drop_head: bool = False, fresh: Sequence[str] = ()) -> Optional[int]:
    """Load a state dict into model (fitting_state); the class count of a head left out, or None."""
    loaded = fitting_state(model, state, source, drop_head, fresh)
    assign(model, loaded)
    return state['head.bias'].shape[0] if 'head.bias' in state and 'head.bias' not in loaded else None


def check_name(name: Optional[str]) -> None:
    if name is not None and name not in ARCHITECTURES:
        raise ValueError(f'unknown model {describe(name)}; choose one of {", ".join(ARCHITECTURES)}')


def create_model(name: Optional[str] = None, pretrained: bool = False, weights: Optional[str] = None,
                 ema: bool = False, drop_head: bool = False, **kwargs) -> CycleNet:
    """A model by name: fresh, with the official ImageNet weights (pretrained), or a file's (load_model)."""
    check_name(name)
    if pretrained and weights is not None:
        raise ValueError('create_model: pretrained means the official weights; give weights or pretrained')
    weights = name if pretrained else weights
    if weights is not None:
        return load_model(weights, name, ema, drop_head, **kwargs)[0]
    if name is None:
        raise ValueError(f'create_model needs a model name, one of {", ".join(ARCHITECTURES)}, or weights')
    return CycleNet(**ARCHITECTURES[name], **kwargs)


def load_model(weights: str, name: Optional[str] = None, ema: bool = False, drop_head: bool = False,
               **kwargs) -> Tuple[CycleNet, dict]:
    """(model, meta) from any weights file or a variant name (weights_file). The architecture is
    name's, else the one the file records, else the one its shapes describe; num_classes the file's."""
    check_name(name)
    state, meta = read_state(weights, ema)
    config = config_from_state(state, weights)
    name = name or meta.get('model_name') or variant_name(config)
    if name is not None and name not in ARCHITECTURES:
        raise WeightsError(f'{weights}: records model_name {describe(name)}, which is not one of '
                           f'{", ".join(ARCHITECTURES)}')
    kwargs.setdefault('num_classes', config['num_classes'])
    architecture = ARCHITECTURES[name] if name else {key: config[key] for key in ARCHITECTURE_KEYS}
    with paddle.LazyGuard():          # shapes only: a file must fit before memory is spent on it
        loaded = fitting_state(CycleNet(**architecture, **kwargs), state, weights, drop_head)
    model = CycleNet(**architecture, **kwargs)
    assign(model, loaded)
    return model, meta


def create_backbone(name: str, weights: Optional[str] = None, fork_last3: bool = False,
                    drop_path_rate: float = 0.0) -> Tuple[CycleNet, str]:
    """(model, what was loaded): variant name's feature backbone (the official CycleMLP_Bx_feat), fresh or not."""
    check_name(name)
    model = CycleNet(**ARCHITECTURES[name], drop_path_rate=drop_path_rate, fork_feat=True, fork_last3=fork_last3)
    return model, 'fresh' if weights is None else load_backbone(model, weights)


def load_backbone(model: CycleNet, weights: str) -> str:
    """Load weights into a feature backbone; what was loaded and left out, in words. A dense checkpoint
    (mmseg/mmdet, keys under 'backbone.') must hold this backbone whole, output norms included; ImageNet
    weights (a file or a variant name) lose their classifier, and the four output norms start fresh."""
    state, _ = read_state(weights)
    notes = []
    dense = any(key.startswith('backbone.') for key in state)
    if dense:
        others = sorted({key.split('.')[0] for key in state if not key.startswith('backbone.')})
        state = {key[len('backbone.'):]: value for key, value in state.items() if key.startswith('backbone.')}
        notes.append('its backbone' + (f' (left out: {", ".join(map(describe, others))})' if others else ''))
    classifier = sorted(key for key in state if key.split('.')[0] in ('head', 'norm'))
    if classifier:
        state = {key: value for key, value in state.items() if key not in classifier}
        notes.append(f'dropped {", ".join(classifier)} (the classifier)')
    output_norms = [key for key in model.state_dict() if key.split('.')[0] in ('norm0', 'norm2', 'norm4', 'norm6')]
    fresh = [] if dense else [key for key in output_norms if key not in state]
    load_state(model, state, weights, fresh=fresh)
    if fresh:
        notes.append(f'{", ".join(sorted({key.split(".")[0] for key in fresh}))} start fresh')
    return f'{weights}: ' + '; '.join(notes or ['every tensor'])


def count_parameters(model: nn.Layer) -> int:
    """Number of trainable values (the offset buffers are not parameters)."""
    return sum(int(np.prod(p.shape)) for p in model.parameters())


def count_flops(model: CycleNet, input_size: Sequence[int] = (224, 224)) -> int:
    """The paper's FLOPs of one image, as fvcore counts them in the official main.py: multiply-accumulates
    of convolutions, Linear layers and CycleFC (a 1x1 convolution to fvcore), plus 5 per element of
    each affine LayerNorm (without them B3..B5 come out 0.1 G below the paper's table)."""
    def size(param):
        return int(np.prod(param.shape))

    def conv(layer, height, width):
        stride, pad, kernel = layer._stride[0], layer._padding, layer.weight.shape[2]   # padding: an int
        height, width = [(n + 2 * pad - kernel) // stride + 1 for n in (height, width)]
        return height, width, height * width * size(layer.weight)

    height, width, flops = conv(model.patch_embed.proj, *input_size)
    for index, layer in enumerate(model.network):
        if index % 2:
            height, width, macs = conv(layer.proj, height, width)
            flops += macs
            continue
        pixels = height * width
        for block in layer:
            dim = block.norm1.weight.shape[0]
            mixer = block.attn
            per_pixel = sum(size(fc.weight) for fc in
                            (mixer.mlp_c, mixer.sfc_h, mixer.sfc_w, mixer.proj, block.mlp.fc1, block.mlp.fc2))
            flops += pixels * (per_pixel + 2 * 5 * dim)                  # + norm1 and norm2
            flops += size(mixer.reweight.fc1.weight) + size(mixer.reweight.fc2.weight)
    return flops + 5 * height * width * model.norm.weight.shape[0] + size(model.head.weight)
