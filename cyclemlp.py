"""CycleMLP-B1..B5 in Paddle, the architecture of the paper and of the official code.

CycleMLP: A MLP-like Architecture for Dense Prediction. Shoufa Chen, Enze Xie, Chongjian Ge,
Runjian Chen, Ding Liang, Ping Luo. ICLR 2022, arXiv:2107.10224.
Official code: https://github.com/ShoufaChen/CycleMLP (`cycle_mlp.py`).

The paper's Figure 2, bottom up: CycleFC (cycle_fc.py) mixes tokens along one axis at the cost of
a channel FC; the CycleMLP token mixer (Sec. 3.2) sums two CycleFC branches (1x3 and 3x1) and a
channel FC, re-weighted per channel; a CycleBlock is that mixer and an MLP, each after a
LayerNorm with a residual; CycleNet stacks four stages of blocks with a stem and a downsampling
convolution before each later stage, then a LayerNorm, mean pooling and a linear classifier.

Everything between the stem and the head is channel-last (B, H, W, C), as in the official code:
the channel FCs are matmuls over the last axis. Parameter names match the official state dict
key for key (`network.{stage}.{block}.attn.sfc_h.weight`, ...), so official checkpoints load one
to one after transposing the Linear weights (PyTorch stores them [out, in], Paddle [in, out]).

The computation below is the official one. fast_layers.py computes the same numbers faster,
and takes over in three marked places; `fast_layers.ENABLED = False` switches it off. Loading
weights and building models by name is zoo.py's.
"""
import math
import numbers
from typing import List, Sequence

import zlib  # noqa: F401  before Paddle: Paddle 2.6 bundles a zlib that crashes one loaded after it
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

import fast_layers
from cycle_fc import CycleFC
from fast_layers import LayerNorm, Linear   # Paddle's layers, with a faster CPU backward
from weights import MAX_CLASSES

# timm's trunc_normal_(std=.02) cuts at +-2 in absolute value, i.e. at 100 standard deviations:
# in float32 that is a plain normal, which is what we draw.
TRUNC_NORMAL = nn.initializer.Normal(mean=0.0, std=0.02)
ZEROS = nn.initializer.Constant(0.0)
ONES = nn.initializer.Constant(1.0)
LAYER_NORM_EPSILON = 1e-5


def drop_path(x: paddle.Tensor, rate: float, training: bool) -> paddle.Tensor:
    """Stochastic depth: drop whole residual branches per sample, rescale the kept ones."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = (paddle.rand([x.shape[0]] + [1] * (x.ndim - 1)) < keep).astype(x.dtype)
    return x * mask / keep


class Mlp(nn.Layer):
    """Linear -> GELU (exact, erf) -> Linear, on the last axis."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.fc2 = Linear(hidden_features, out_features)

    def forward(self, x):
        if fast_layers.on_fast_cpu_path(x):                   # same numbers, less memory
            return fast_layers.mlp(self.fc1, self.fc2, x)
        return self.fc2(F.gelu(self.fc1(x)))


class CycleMLP(nn.Layer):
    """The token mixer (Sec. 3.2): two CycleFC branches and a channel FC, re-weighted per channel.

    `sfc_h` has kernel (1, 3) and so shifts along W, `sfc_w` has kernel (3, 1) and shifts along
    H: the names are the other way round from what the layers do, but they are the official
    state-dict names, so they stay.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.mlp_c = Linear(dim, dim, bias_attr=False)
        self.sfc_h = CycleFC(dim, dim, (1, 3))
        self.sfc_w = CycleFC(dim, dim, (3, 1))
        self.reweight = Mlp(dim, dim // 4, dim * 3)
        self.proj = Linear(dim, dim)

    def forward(self, x):                                      # x: (B, H, W, C)
        if fast_layers.fuses_mixer(x):                         # same numbers, one gather
            return fast_layers.fused_mixer(self, x)
        batch, _, _, dim = x.shape
        h, w, c = self.sfc_h(x), self.sfc_w(x), self.mlp_c(x)
        a = (h + w + c).mean(axis=[1, 2])                          # (B, H, W, C) -> (B, C)
        # 3C re-weighting logits read as (B, C, 3), softmax over the three branches.
        a = F.softmax(self.reweight(a).reshape([batch, dim, 3]).transpose([2, 0, 1]), axis=0)
        a = a.unsqueeze([2, 3])                                    # (3, B, C) -> (3, B, 1, 1, C)
        return self.proj(h * a[0] + w * a[1] + c * a[2])


class CycleBlock(nn.Layer):
    def __init__(self, dim: int, mlp_ratio: float, drop_path_rate: float = 0.0):
        super().__init__()
        self.norm1 = LayerNorm(dim, epsilon=LAYER_NORM_EPSILON)
        self.attn = CycleMLP(dim)
        self.norm2 = LayerNorm(dim, epsilon=LAYER_NORM_EPSILON)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim)
        self.drop_path_rate = drop_path_rate

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class PatchEmbed(nn.Layer):
    """The stem: a 7x7 stride-4 convolution, writing channel-last maps."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2D(3, embed_dim, 7, stride=4, padding=2)

    def forward(self, images):
        return self.proj(images).transpose([0, 2, 3, 1])               # (B, C, H, W) -> (B, H, W, C)


class Downsample(nn.Layer):
    """Between stages: a 3x3 stride-2 convolution, channel-last in and out."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Conv2D(in_dim, out_dim, 3, stride=2, padding=1)

    def forward(self, x):
        x = self.proj(x.transpose([0, 3, 1, 2]))                              # (B, H, W, C) -> (B, C, H, W)
        return x.transpose([0, 2, 3, 1])                                     # (B, C, H, W) -> (B, H, W, C)


class CycleNet(nn.Layer):
    """CycleMLP backbone and classifier, or with fork_feat the feature backbone for dense
    prediction (the official CycleMLP_Bx_feat).

    `network` alternates stages and downsampling layers (indices 0, 2, 4, 6 are stages), as in
    the official model, so that parameter names match its checkpoints. With fork_feat there is no
    classifier: forward returns each stage's map after a LayerNorm of its own (norm0, norm2,
    norm4, norm6, named after the stage's index), (B, C_i, H_i, W_i) at strides 4, 8, 16 and 32.
    fork_last3 is the official FORK_LAST3=1 (RetinaNet starts at the second stage): the first
    norm is an identity.
    """

    def __init__(self, layers: Sequence[int], embed_dims: Sequence[int], mlp_ratios: Sequence[float],
                 num_classes: int = 1000, drop_path_rate: float = 0.0, fork_feat: bool = False,
                 fork_last3: bool = False):
        super().__init__()
        check_arguments(layers, embed_dims, mlp_ratios, num_classes, drop_path_rate, fork_feat, fork_last3)
        layers, embed_dims = [int(n) for n in layers], [int(n) for n in embed_dims]
        mlp_ratios = [int(r) if float(r).is_integer() else float(r) for r in mlp_ratios]
        self.num_classes = int(num_classes)
        self.fork_feat = fork_feat
        self.config = dict(layers=layers, embed_dims=embed_dims, mlp_ratios=mlp_ratios,
                           num_classes=self.num_classes)
        if fork_feat:
            self.config.update(fork_feat=True, fork_last3=fork_last3)
        self.patch_embed = PatchEmbed(embed_dims[0])
        # Stochastic depth grows linearly from 0 at the first block to the full rate at the last.
        total_blocks = sum(layers)
        rates = iter([drop_path_rate * index / max(total_blocks - 1, 1) for index in range(total_blocks)])
        network = []
        for stage, (depth, dim, ratio) in enumerate(zip(layers, embed_dims, mlp_ratios)):
            network.append(nn.Sequential(*[CycleBlock(dim, ratio, next(rates)) for _ in range(depth)]))
            if stage < len(layers) - 1:
                network.append(Downsample(dim, embed_dims[stage + 1]))
        self.network = nn.LayerList(network)
        if fork_feat:
            self.feat_channels = embed_dims          # the maps' widths (PaddleSeg's attribute name)
            for stage, dim in enumerate(embed_dims):
                self.add_sublayer(f'norm{2 * stage}', nn.Identity() if fork_last3 and stage == 0
                                  else LayerNorm(dim, epsilon=LAYER_NORM_EPSILON))
        else:
            self.norm = LayerNorm(embed_dims[-1], epsilon=LAYER_NORM_EPSILON)
            self.head = Linear(embed_dims[-1], self.num_classes)
        self.apply(init_weights)

    def forward_stages(self, images: paddle.Tensor) -> List[paddle.Tensor]:
        """Channel-last output (B, H_i, W_i, C_i) of each stage, before any norm."""
        x = self.patch_embed(images)
        stages = []
        for index, layer in enumerate(self.network):
            x = layer(x)
            if index % 2 == 0:
                stages.append(x)
        return stages

    def forward_features(self, images: paddle.Tensor) -> List[paddle.Tensor]:
        """The four stage maps (B, C_i, H_i, W_i) at strides 4, 8, 16 and 32, before any norm."""
        return [x.transpose([0, 3, 1, 2]) for x in self.forward_stages(images)]  # (B,H,W,C) -> (B,C,H,W)

    def forward_head(self, x: paddle.Tensor) -> paddle.Tensor:
        """Logits from the last stage map (B, C, H, W), as forward_features returns it."""
        return self.head(self.norm(x.transpose([0, 2, 3, 1])).mean(axis=[1, 2]))  # (B,C,H,W) -> (B,H,W,C)

    def forward(self, images: paddle.Tensor):
        stages = self.forward_stages(images)
        if self.fork_feat:                   # the normed stage maps, (B, H, W, C) -> (B, C, H, W)
            return [getattr(self, f'norm{2 * stage}')(x).transpose([0, 3, 1, 2]) for stage, x in enumerate(stages)]
        # forward_head(forward_features(images)[-1]), transposing only the last map.
        return self.forward_head(stages[-1].transpose([0, 3, 1, 2]))


def init_weights(layer: nn.Layer) -> None:
    """The official init: Linear and CycleFC weights N(0, .02) (timm's trunc_normal_ cuts at
    +-2, 100 std away), biases 0, LayerNorm 1 and 0. The official code leaves its Conv2d layers
    (stem and downsamples) at PyTorch's default, kaiming_uniform(a=sqrt(5)): weight and bias
    uniform in +-1/sqrt(fan_in), fan_in = in_channels * kernel area; Paddle's default differs."""
    if isinstance(layer, (nn.Linear, CycleFC)):
        TRUNC_NORMAL(layer.weight)
        if layer.bias is not None:
            ZEROS(layer.bias)
    elif isinstance(layer, nn.LayerNorm):
        ONES(layer.weight)
        ZEROS(layer.bias)
    elif isinstance(layer, nn.Conv2D):
        bound = 1.0 / math.sqrt(math.prod(layer.weight.shape[1:]))
        nn.initializer.Uniform(-bound, bound)(layer.weight)
        nn.initializer.Uniform(-bound, bound)(layer.bias)


# The five variants of the paper's Table 1, the one way to build them (zoo.create_model by name).
ARCHITECTURES = {
    'CycleMLP_B1': dict(layers=[2, 2, 4, 2], embed_dims=[64, 128, 320, 512], mlp_ratios=[4, 4, 4, 4]),
    'CycleMLP_B2': dict(layers=[2, 3, 10, 3], embed_dims=[64, 128, 320, 512], mlp_ratios=[4, 4, 4, 4]),
    'CycleMLP_B3': dict(layers=[3, 4, 18, 3], embed_dims=[64, 128, 320, 512], mlp_ratios=[8, 8, 4, 4]),
    'CycleMLP_B4': dict(layers=[3, 8, 27, 3], embed_dims=[64, 128, 320, 512], mlp_ratios=[8, 8, 4, 4]),
    'CycleMLP_B5': dict(layers=[3, 4, 24, 3], embed_dims=[96, 192, 384, 768], mlp_ratios=[4, 4, 4, 4]),
}


# Bounds of what CycleNet builds: beyond them a model is a mistake, not a CycleMLP.
MAX_BLOCKS_PER_STAGE = 1000
MAX_CHANNELS = 8192
MAX_MLP_RATIO = 64


def check_arguments(layers, embed_dims, mlp_ratios, num_classes, drop_path_rate, fork_feat=False,
                    fork_last3=False) -> None:
    """Raise ValueError naming the argument unless each has the type and range a CycleNet needs."""
    def integer(value) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    def number(value) -> bool:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

    rules = (('layers', layers, integer, 1, MAX_BLOCKS_PER_STAGE, 'integers'),
             ('embed_dims', embed_dims, integer, 4, MAX_CHANNELS, 'integers'),  # the re-weighting MLP has C/4
             ('mlp_ratios', mlp_ratios, number, 0, MAX_MLP_RATIO, 'numbers'))
    for name, values, kind, low, high, what in rules:
        if not (isinstance(values, (list, tuple)) and len(values) == 4 and all(
                kind(v) and low <= v <= high for v in values)):
            raise ValueError(f'CycleNet: {name} must be four {what} in [{low}, {high}], one per '
                             f'stage; got {values!r}'[:300])
    if min(int(dim * ratio) for dim, ratio in zip(embed_dims, mlp_ratios)) < 1:
        raise ValueError(f'CycleNet: mlp_ratios {list(mlp_ratios)} leave an MLP of embed_dims '
                         f'{list(embed_dims)} without a hidden unit')
    if not (integer(num_classes) and 1 <= num_classes <= MAX_CLASSES):
        raise ValueError(f'CycleNet: num_classes must be an integer in [1, {MAX_CLASSES}], '
                         f'got {num_classes!r}'[:300])
    if not (number(drop_path_rate) and 0 <= drop_path_rate < 1):
        raise ValueError(f'CycleNet: drop_path_rate must be a number in [0, 1), got {drop_path_rate!r}'[:300])
    for name, value in (('fork_feat', fork_feat), ('fork_last3', fork_last3)):
        if not isinstance(value, bool):
            raise ValueError(f'CycleNet: {name} must be True or False, got {value!r}'[:300])
    if fork_last3 and not fork_feat:
        raise ValueError('CycleNet: fork_last3 applies to the feature backbone (fork_feat=True)')
