"""CycleMLP-B1..B5 in Paddle, state-dict compatible with the official PyTorch release.

CycleMLP: A MLP-like Architecture for Dense Prediction. Shoufa Chen, Enze Xie, Chongjian Ge,
Runjian Chen, Ding Liang, Ping Luo. ICLR 2022, arXiv:2107.10224.
Official code: https://github.com/ShoufaChen/CycleMLP (`cycle_mlp.py`).

Everything between the stem and the head is channel-last (B, H, W, C): the channel FCs are
matmuls over the last axis and CycleFC shifts without transposes; only the four convolutions
that change resolution transpose around themselves. Parameter names match the official state
dict key for key (`network.{stage}.{block}.attn.sfc_h.weight`, ...), so official checkpoints
load one to one after transposing the Linear weights (PyTorch stores them [out, in], Paddle
[in, out]).
"""
from typing import Dict, List, Optional, Sequence, Tuple

import cpu_setup  # noqa: F401  (first: sets up the CPU before Paddle loads)
import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from cycle_fc import CycleFC, cached_index, gather_columns
from weights import WeightsError, read_weights, torch_to_paddle

# timm's trunc_normal_(std=.02) cuts at +-2 in absolute value, i.e. at 100 standard deviations:
# in float32 that is a plain normal, which is what we draw.
TRUNC_NORMAL = nn.initializer.Normal(mean=0.0, std=0.02)
ZEROS = nn.initializer.Constant(0.0)
ONES = nn.initializer.Constant(1.0)


def drop_path(x: paddle.Tensor, rate: float, training: bool) -> paddle.Tensor:
    """Stochastic depth: drop whole residual branches per sample, rescale the kept ones."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = (paddle.rand([x.shape[0]] + [1] * (x.ndim - 1)) < keep).astype(x.dtype)
    return x * mask / keep


# Paddle's CPU kernels reduce a (rows, C) gradient to the (C,) gradient of a bias or of a
# LayerNorm weight on one thread: 100 ms for 50k x 256, where a matmul with a row of ones takes
# 1 ms. Linear and LayerNorm below keep Paddle's forward and compute their backward with
# matmuls for float32 on CPU in eager mode; elsewhere (GPU, mixed precision, export) they are
# Paddle's own layers.

@paddle.jit.not_to_static   # a plain Python test, also while the model is being exported
def on_fast_cpu_path(x: paddle.Tensor) -> bool:
    return paddle.in_dynamic_mode() and x.place.is_cpu_place() and x.dtype == paddle.float32


def sum_rows(rows: paddle.Tensor) -> paddle.Tensor:
    """(N, C) -> (C,): the column sums, as a matmul."""
    return paddle.matmul(paddle.ones([1, rows.shape[0]], rows.dtype), rows).reshape([-1])


class LinearFunction(PyLayer):
    """x @ weight + bias on the last axis, its bias added inside the matmul (addmm)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        out = paddle.addmm(bias.unsqueeze(0), x.reshape([-1, x.shape[-1]]), weight)
        return out.reshape(x.shape[:-1] + [weight.shape[1]])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensor()
        grad_rows = grad.reshape([-1, grad.shape[-1]])
        grad_weight = paddle.matmul(x.reshape([-1, x.shape[-1]]), grad_rows, transpose_x=True)
        return paddle.matmul(grad, weight, transpose_y=True), grad_weight, sum_rows(grad_rows)


class LayerNormFunction(PyLayer):
    """Paddle's layer_norm forward; the backward with the row statistics recomputed by matmuls."""

    @staticmethod
    def forward(ctx, x, weight, bias, epsilon):
        ctx.save_for_backward(x, weight)
        ctx.epsilon = epsilon
        return F.layer_norm(x, x.shape[-1:], weight, bias, epsilon)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensor()
        dim = x.shape[-1]
        rows, grad_rows = x.reshape([-1, dim]), grad.reshape([-1, dim])
        average = paddle.full([dim, 1], 1.0 / dim, x.dtype)           # row means as matmuls
        centered = rows - paddle.matmul(rows, average)
        inv_std = paddle.rsqrt(paddle.matmul(centered * centered, average) + ctx.epsilon)
        normed = centered * inv_std
        grad_normed = grad_rows * weight
        grad_x = (grad_normed - paddle.matmul(grad_normed, average)
                  - normed * paddle.matmul(grad_normed * normed, average)) * inv_std
        return grad_x.reshape(x.shape), sum_rows(grad_rows * normed), sum_rows(grad_rows)


class ScaleColumns(PyLayer):
    """(K, R, C) matrices and (B, K, C) scales -> (B, K, R, C): matrix k with its columns
    scaled by scales[b, k], i.e. M_k @ diag(s_bk). Paddle's CPU multiply broadcasting both
    operands is 20x slower than on equal shapes and its gradient sums are slower still; here
    the operands are expanded inside, the sums are matmuls, and nothing (B, K, R, C) is kept
    for the backward."""

    @staticmethod
    def forward(ctx, matrices, scales):
        ctx.save_for_backward(matrices, scales)
        shape = [scales.shape[0]] + matrices.shape
        return matrices.unsqueeze(0).expand(shape) * scales.unsqueeze(2).expand(shape)

    @staticmethod
    def backward(ctx, grad):
        matrices, scales = ctx.saved_tensor()
        batch, (_, rows, cols) = scales.shape[0], matrices.shape
        grad_matrices = (grad * scales.unsqueeze(2).expand(grad.shape)).reshape([batch, -1])
        grad_matrices = paddle.matmul(paddle.ones([1, batch], grad.dtype), grad_matrices)
        grad_scales = (grad * matrices.unsqueeze(0).expand(grad.shape)).reshape([-1, rows, cols])
        grad_scales = paddle.matmul(paddle.ones([1, rows], grad.dtype), grad_scales)  # column sums
        return grad_matrices.reshape(matrices.shape), grad_scales.reshape(scales.shape)


class Linear(nn.Linear):
    def forward(self, x):
        if self.bias is None or not on_fast_cpu_path(x):
            return super().forward(x)
        return LinearFunction.apply(x, self.weight, self.bias)


class LayerNorm(nn.LayerNorm):
    def forward(self, x):
        if not on_fast_cpu_path(x):
            return super().forward(x)
        return LayerNormFunction.apply(x, self.weight, self.bias, self._epsilon)


class MlpFunction(PyLayer):
    """fc2(gelu(fc1(x))) keeping x and fc1's output for the backward, not the GELU output:
    the backward recomputes GELU, which saves the largest map of each block (4C channels)."""

    @staticmethod
    def forward(ctx, x, weight1, bias1, weight2, bias2):
        hidden = paddle.addmm(bias1.unsqueeze(0), x.reshape([-1, x.shape[-1]]), weight1)
        ctx.save_for_backward(x, hidden, weight1, weight2)
        out = paddle.addmm(bias2.unsqueeze(0), F.gelu(hidden), weight2)
        return out.reshape(x.shape[:-1] + [weight2.shape[1]])

    @staticmethod
    def backward(ctx, grad):
        x, hidden, weight1, weight2 = ctx.saved_tensor()
        grad_rows = grad.reshape([-1, grad.shape[-1]])
        with paddle.enable_grad():
            hidden = hidden.detach()
            hidden.stop_gradient = False
            activated = F.gelu(hidden)
        grad_weight2 = paddle.matmul(activated, grad_rows, transpose_x=True)
        grad_hidden = paddle.grad(activated, hidden, paddle.matmul(grad_rows, weight2, transpose_y=True))[0]
        rows = x.reshape([-1, x.shape[-1]])
        grad_x = paddle.matmul(grad_hidden, weight1, transpose_y=True).reshape(x.shape)
        return (grad_x, paddle.matmul(rows, grad_hidden, transpose_x=True), sum_rows(grad_hidden),
                grad_weight2, sum_rows(grad_rows))


class Mlp(nn.Layer):
    """Linear -> GELU (exact, erf) -> Linear, on the last axis."""

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None):
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.fc2 = Linear(hidden_features, out_features or in_features)

    def forward(self, x):
        if not on_fast_cpu_path(x):
            return self.fc2(F.gelu(self.fc1(x)))
        return MlpFunction.apply(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)


class CycleMLP(nn.Layer):
    """The token mixer: two CycleFC branches and a channel FC, re-weighted per channel.

    `sfc_h` has kernel (1, 3) and so shifts along W, `sfc_w` has kernel (3, 1) and shifts along
    H: the names are the other way round from what the layers do, but they are the official
    state-dict names, so they stay.

    `forward_branches` is the official forward. Unless maps are small (3*H*W < C: the last
    stage) `forward_fused` computes the same thing faster. Every branch is linear and the
    re-weighting `a` only scales output channels per image, so the mixer is one gather and two
    batched matmuls with weights built per image:

        X = [shift_W(x) | shift_H(x) | 1]                        (B, H*W, 2C + 1), one gather
        mean(h + w + c) = mean(X) @ [Wh; Ww; bh + bw] + mean(x) @ Wc   (mean and FC commute)
        h*a0 + w*a1 + c*a2 = X @ [Wh*a0; Ww*a1; bh*a0 + bw*a1] + x @ (Wc*a2)

    That replaces two gathers, three matmuls and the bias and re-weighting passes over
    (B, H, W, C) with one gather and matmuls of the same FLOPs; building the per-image
    weights costs 3C x C per image, less than those passes while 3*H*W >= C. Where H*W >= 3C
    (the first two stages) `proj` is folded in as well, X @ (M @ Wp) + bp, saving its C x C per
    pixel for 3C x C x C per image. The column of ones carries the biases into the matmul,
    because a broadcast add over a whole map costs more than the extra column on Paddle's CPU
    kernels. Both paths agree to float rounding (tested, forward and gradients).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.mlp_c = nn.Linear(dim, dim, bias_attr=False)
        self.sfc_h = CycleFC(dim, dim, (1, 3))
        self.sfc_w = CycleFC(dim, dim, (3, 1))
        self.reweight = Mlp(dim, dim // 4, dim * 3)
        self.proj = Linear(dim, dim)
        self.fuse = True
        self.index_cache = {}

    def forward(self, x):
        _, height, width, dim = x.shape
        if self.fuse and 3 * height * width >= dim:
            return self.forward_fused(x)
        return self.forward_branches(x)

    def reweighting(self, mean: paddle.Tensor) -> paddle.Tensor:
        """Branch weights (B, 3, C) from the pixel mean (B, C) of h + w + c."""
        batch, dim = mean.shape
        # The official code reshapes the 3C re-weighting logits to (B, C, 3): branch k of
        # channel c is output 3c + k. Softmax over the three branches.
        return F.softmax(self.reweight(mean).reshape([batch, dim, 3]), axis=2).transpose([0, 2, 1])

    def forward_branches(self, x):
        """The official forward, on channel-last x (B, H, W, C)."""
        h, w, c = self.sfc_h(x), self.sfc_w(x), self.mlp_c(x)
        a = self.reweighting((h + w + c).mean(axis=[1, 2])).unsqueeze([2, 3])   # (B, 3, 1, 1, C)
        return self.proj(h * a[:, 0] + w * a[:, 1] + c * a[:, 2])

    def branch_index(self, height, width) -> paddle.Tensor:
        """Gather index for X = [sfc_h input | sfc_w input | 1] from x + [0, 1] appended."""
        zero = height * (width * self.sfc_h.in_channels)  # not (h * w) * c: see shifted_positions
        shifted = [self.sfc_h.source_index(height, width, zero), self.sfc_w.source_index(height, width, zero)]
        one = paddle.full_like(shifted[0][:, :, :1], 1) + zero
        return paddle.concat(shifted + [one], axis=-1).flatten()               # (H*W*(2C + 1),)

    def forward_fused(self, x):
        """The official forward as one gather and two batched matmuls (see the class doc)."""
        batch, height, width, dim = x.shape
        pixels = height * width
        index = cached_index(self, (height, width), lambda: self.branch_index(height, width))
        zero_one = paddle.concat([paddle.zeros([batch, 1], x.dtype), paddle.ones([batch, 1], x.dtype)], axis=1)
        shifted = gather_columns(paddle.concat([x.flatten(start_axis=1), zero_one], axis=1), index)
        shifted = shifted.reshape([0, pixels, 2 * dim + 1])                   # X: (B, H*W, 2C + 1)
        plain = x.reshape([0, pixels, dim])                                      # x: (B, H*W, C)
        # FC weights as (in, out): CycleFC stores (out, in, 1, 1), Paddle Linear (in, out).
        fc_h, fc_w = self.sfc_h.weight.reshape([dim, dim]).t(), self.sfc_w.weight.reshape([dim, dim]).t()
        biases = paddle.stack([self.sfc_h.bias, self.sfc_w.bias, paddle.zeros_like(self.sfc_h.bias)])
        # The mean over pixels as a matmul with a row of 1/(H*W): several times faster than
        # Paddle's CPU mean over a middle axis, and the same number.
        pixel_mean = paddle.full([1, pixels], 1.0 / pixels, dtype=x.dtype)
        means = paddle.concat([paddle.matmul(pixel_mean, shifted), paddle.matmul(pixel_mean, plain)], axis=2)
        a = self.reweighting(paddle.matmul(means.squeeze(1), paddle.concat(
            [fc_h, fc_w, biases.sum(axis=0, keepdim=True), self.mlp_c.weight])))   # (B, 3, C)
        weights = paddle.stack([fc_h, fc_w, self.mlp_c.weight])
        scaled = (ScaleColumns.apply(weights, a) if on_fast_cpu_path(x)
                  else weights.unsqueeze(0) * a.unsqueeze(2)).reshape([batch, 3 * dim, dim])
        bias_row = (biases * a).sum(axis=1, keepdim=True)                      # (B, 1, C)
        fold_proj = pixels >= 3 * dim
        if fold_proj:
            scaled = paddle.matmul(scaled, self.proj.weight)
            bias_row = paddle.matmul(bias_row, self.proj.weight) + self.proj.bias
        # split, not slicing: Paddle's CPU slice gradient is several times slower.
        shifted_weights, plain_weights = paddle.split(scaled, [2 * dim, dim], axis=1)
        out = (paddle.bmm(shifted, paddle.concat([shifted_weights, bias_row], axis=1))
               + paddle.bmm(plain, plain_weights)).reshape([0, height, width, dim])
        return out if fold_proj else self.proj(out)


class CycleBlock(nn.Layer):
    def __init__(self, dim: int, mlp_ratio: float, drop_path_rate: float = 0.0):
        super().__init__()
        self.norm1 = LayerNorm(dim, epsilon=1e-5)
        self.attn = CycleMLP(dim)
        self.norm2 = LayerNorm(dim, epsilon=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
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
        return self.proj(images).transpose([0, 2, 3, 1])                   # (B, C, H, W) -> (B, H, W, C)


class Downsample(nn.Layer):
    """Between stages: a 3x3 stride-2 convolution, channel-last in and out.

    The convolution itself runs channel-first: on CPU Paddle's NCHW kernels with the two
    transposes were 15% faster than its NHWC kernels (forward and backward, B1's sizes), and
    paddle2onnx converts only NCHW convolutions.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Conv2D(in_dim, out_dim, 3, stride=2, padding=1)

    def forward(self, x):
        x = self.proj(x.transpose([0, 3, 1, 2]))                              # (B, H, W, C) -> (B, C, H, W)
        return x.transpose([0, 2, 3, 1])                                     # (B, C, H, W) -> (B, H, W, C)


class CycleNet(nn.Layer):
    """CycleMLP backbone and classifier.

    `network` alternates stages and downsampling layers (indices 0, 2, 4, 6 are stages), as in
    the official model, so that parameter names match its checkpoints.
    """

    def __init__(self, layers: Sequence[int], embed_dims: Sequence[int], mlp_ratios: Sequence[float],
                 num_classes: int = 1000, drop_path_rate: float = 0.0):
        super().__init__()
        if not (len(layers) == len(embed_dims) == len(mlp_ratios) == 4):
            raise ValueError(f'layers {layers}, embed_dims {embed_dims} and mlp_ratios {mlp_ratios} '
                             f'must each have four values, one per stage')
        if min(layers) < 1 or min(embed_dims) < 4 or min(int(d * r) for d, r in zip(embed_dims, mlp_ratios)) < 1 \
                or num_classes < 1:
            raise ValueError(f'a CycleNet needs stages of at least 1 block, 4 channels (the '
                             f're-weighting MLP has C/4) and 1 hidden unit, and at least 1 class; '
                             f'got layers {layers}, embed_dims {embed_dims}, mlp_ratios {mlp_ratios}, '
                             f'num_classes {num_classes}')
        self.config = dict(layers=list(layers), embed_dims=list(embed_dims),
                           mlp_ratios=list(mlp_ratios), num_classes=num_classes)
        self.num_classes = num_classes
        self.name = variant_name(self.config)          # 'CycleMLP_B1' .. 'CycleMLP_B5', or None
        self.patch_embed = PatchEmbed(embed_dims[0])
        total_blocks, block_index = sum(layers), 0
        network = []
        for stage, (depth, dim, ratio) in enumerate(zip(layers, embed_dims, mlp_ratios)):
            blocks = []
            for _ in range(depth):
                # Stochastic depth grows linearly from 0 at the first block to the full rate.
                rate = drop_path_rate * block_index / max(total_blocks - 1, 1)
                blocks.append(CycleBlock(dim, ratio, rate))
                block_index += 1
            network.append(nn.Sequential(*blocks))
            if stage < len(layers) - 1:
                network.append(Downsample(dim, embed_dims[stage + 1]))
        self.network = nn.LayerList(network)
        self.norm = LayerNorm(embed_dims[-1], epsilon=1e-5)
        self.head = Linear(embed_dims[-1], num_classes)
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
        """The four stage maps (B, C_i, H_i, W_i) at strides 4, 8, 16 and 32, for dense prediction."""
        return [x.transpose([0, 3, 1, 2]) for x in self.forward_stages(images)]  # (B,H,W,C) -> (B,C,H,W)

    def forward_head(self, x: paddle.Tensor) -> paddle.Tensor:
        """Logits from the last stage map (B, C, H, W), as forward_features returns it."""
        return self.head(self.norm(x.transpose([0, 2, 3, 1])).mean(axis=[1, 2]))  # (B,C,H,W) -> (B,H,W,C)

    def forward(self, images: paddle.Tensor) -> paddle.Tensor:
        # forward_head(forward_features(images)[-1]), transposing only the last map.
        return self.forward_head(self.forward_stages(images)[-1].transpose([0, 3, 1, 2]))


def init_weights(layer: nn.Layer) -> None:
    """The official init: Linear and CycleFC weights N(0, .02), biases 0, LayerNorm 1 and 0."""
    if isinstance(layer, (nn.Linear, CycleFC)):
        TRUNC_NORMAL(layer.weight)
        if layer.bias is not None:
            ZEROS(layer.bias)
    elif isinstance(layer, nn.LayerNorm):
        ONES(layer.weight)
        ZEROS(layer.bias)


# The five variants of the paper's Table 1 (the official factories' arguments).
ARCHITECTURES = {
    'CycleMLP_B1': dict(layers=[2, 2, 4, 2], embed_dims=[64, 128, 320, 512], mlp_ratios=[4, 4, 4, 4]),
    'CycleMLP_B2': dict(layers=[2, 3, 10, 3], embed_dims=[64, 128, 320, 512], mlp_ratios=[4, 4, 4, 4]),
    'CycleMLP_B3': dict(layers=[3, 4, 18, 3], embed_dims=[64, 128, 320, 512], mlp_ratios=[8, 8, 4, 4]),
    'CycleMLP_B4': dict(layers=[3, 8, 27, 3], embed_dims=[64, 128, 320, 512], mlp_ratios=[8, 8, 4, 4]),
    'CycleMLP_B5': dict(layers=[3, 4, 24, 3], embed_dims=[96, 192, 384, 768], mlp_ratios=[4, 4, 4, 4]),
}


def CycleMLP_B1(**kwargs) -> CycleNet:
    return CycleNet(**ARCHITECTURES['CycleMLP_B1'], **kwargs)


def CycleMLP_B2(**kwargs) -> CycleNet:
    return CycleNet(**ARCHITECTURES['CycleMLP_B2'], **kwargs)


def CycleMLP_B3(**kwargs) -> CycleNet:
    return CycleNet(**ARCHITECTURES['CycleMLP_B3'], **kwargs)


def CycleMLP_B4(**kwargs) -> CycleNet:
    return CycleNet(**ARCHITECTURES['CycleMLP_B4'], **kwargs)


def CycleMLP_B5(**kwargs) -> CycleNet:
    return CycleNet(**ARCHITECTURES['CycleMLP_B5'], **kwargs)


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
    """Read layers, embed_dims, mlp_ratios and num_classes off a CycleNet state dict, or raise
    WeightsError. A file decides the size of the model built from it, so its structure is
    checked first: the blocks of each stage numbered 0..n-1, the tensors read 1-D and not
    empty, and the model no larger than the file (it must hold every parameter)."""
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
    if parameter_count(**config) > sum(value.size for value in state.values()):
        raise WeightsError(f'{source}: its shapes describe a CycleNet {layers} {embed_dims} with '
                           'more parameters than the file holds')
    return config


def variant_name(config: dict) -> Optional[str]:
    """The CycleMLP_Bx whose architecture config describes (any class count), or None."""
    architecture = {key: list(config[key]) for key in ('layers', 'embed_dims', 'mlp_ratios')}
    return next((name for name, known in ARCHITECTURES.items() if known == architecture), None)


def read_state(path: str, ema: bool = False) -> Tuple[Dict[str, np.ndarray], dict]:
    """(Paddle-layout state dict, meta) of any weights file weights.read_weights reads."""
    state, meta, layout = read_weights(path, ema=ema)
    return (torch_to_paddle(state) if layout == 'torch' else state), meta


def numpy_state(model: nn.Layer) -> Dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in model.state_dict().items()}


def load_state(model: CycleNet, state: Dict[str, np.ndarray], source: str = 'weights',
               drop_head: bool = False) -> Optional[int]:
    """Load a Paddle-layout state dict into model, or raise WeightsError listing every mismatch.

    With drop_head, a classifier of another class count is left at its fresh initialisation
    (fine-tuning on a new label set) and that count is returned; otherwise a different class
    count is an error.
    """
    expected = model.state_dict()
    file_classes = state['head.bias'].shape[0] if 'head.bias' in state else None
    if file_classes is not None and file_classes != model.num_classes:
        if not drop_head:
            raise WeightsError(f'{source}: the file has a {file_classes}-class head but the model '
                               f'has {model.num_classes} classes; build the model with '
                               f'num_classes={file_classes}, or drop the head to fine-tune')
        state = {k: v for k, v in state.items() if not k.startswith('head.')}
        expected = {k: v for k, v in expected.items() if not k.startswith('head.')}
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f'missing keys ({len(missing)}): {", ".join(missing[:10])}'
                        + (' ...' if len(missing) > 10 else ''))
    if unexpected:
        problems.append(f'unexpected keys ({len(unexpected)}): {", ".join(unexpected[:10])}'
                        + (' ...' if len(unexpected) > 10 else ''))
    for key in sorted(set(expected) & set(state)):
        want, got = list(expected[key].shape), list(state[key].shape)
        if want != got:
            problems.append(f'{key}: shape {got} in the file, {want} in the model')
            if len(problems) > 12:
                break
        elif key.endswith('.offset') and not np.array_equal(state[key], expected[key].numpy()):
            problems.append(f'{key}: offsets differ from the CycleFC pattern this layer computes')
    if problems:
        raise WeightsError(f'{source} does not fit {type(model).__name__}'
                           f'{model.config["layers"]} {model.config["embed_dims"]}: ' + '; '.join(problems))
    for key, value in state.items():
        expected[key].set_value(paddle.to_tensor(value, dtype=expected[key].dtype))
    return file_classes if file_classes != model.num_classes else None


def create_model(name: Optional[str] = None, weights: Optional[str] = None, ema: bool = False,
                 drop_head: bool = False, **kwargs) -> CycleNet:
    """Build a model by name (a key of ARCHITECTURES), optionally with weights from any
    supported file (see load_model, which also returns what the file records)."""
    if weights is not None:
        return load_model(weights, name, ema, drop_head, **kwargs)[0]
    if name not in ARCHITECTURES:
        raise ValueError(f'unknown model {name!r}; choose one of {", ".join(ARCHITECTURES)}')
    return CycleNet(**ARCHITECTURES[name], **kwargs)


def load_model(weights: str, name: Optional[str] = None, ema: bool = False, drop_head: bool = False,
               **kwargs) -> Tuple[CycleNet, dict]:
    """(model, meta) from a weights file: an official PyTorch release or training checkpoint
    (.pth), a .pdparams (this repo's or the earlier PaddleClas-layout reproduction's), a
    .safetensors file or this repo's training checkpoint (.pdckpt); ema picks the EMA weights
    of a training checkpoint. When name is None the architecture is the one the file records
    or, for foreign files, the one its tensor shapes describe. num_classes defaults to the
    file's class count. meta is what the file records besides weights (class_names,
    data_config; {} for files from elsewhere), for the commands to use.
    """
    if name is not None and name not in ARCHITECTURES:
        raise ValueError(f'unknown model {name!r}; choose one of {", ".join(ARCHITECTURES)}')
    state, meta = read_state(weights, ema)
    config = config_from_state(state, weights)
    name = name or meta.get('model_name') or variant_name(config)
    kwargs.setdefault('num_classes', config['num_classes'])
    architecture = ARCHITECTURES.get(name) or {key: config[key] for key in ('layers', 'embed_dims', 'mlp_ratios')}
    try:
        model = CycleNet(**architecture, **kwargs)
    except ValueError as error:     # shapes no CycleNet has
        raise WeightsError(f'{weights}: {error}') from None
    load_state(model, state, source=weights, drop_head=drop_head)
    return model, meta


def count_parameters(model: nn.Layer) -> int:
    """Number of trainable values (the offset buffers are not parameters)."""
    return sum(int(np.prod(p.shape)) for p in model.parameters())


def count_flops(model: CycleNet, input_size: Sequence[int] = (224, 224)) -> int:
    """The paper's FLOPs of one image: fvcore's count, as the official main.py runs it.

    That is multiply-accumulates of convolutions, Linear layers and CycleFC (counted as the 1x1
    convolution it is, via the official fvcore handle for deform_conv2d), plus fvcore's default
    5 per element for each affine LayerNorm. Activations, the softmax and the shift itself are
    not counted. (Without the LayerNorm term B3..B5 come out 0.1 G below the paper's table.)
    Counted from the layer shapes, since the fused mixer does not call its layers one by one.
    """
    def size(param):
        return int(np.prod(param.shape))

    def conv(layer, height, width):
        stride, pad, kernel = layer._stride[0], layer._padding, layer.weight.shape[2]
        pad = pad[0] if isinstance(pad, (list, tuple)) else pad
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
