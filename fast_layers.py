"""Faster computation of CycleMLP's layers: the same numbers, by other Paddle ops.

cyclemlp.py uses its Linear and LayerNorm (Paddle's, same parameters), `mlp` and `fused_mixer`;
all tested against the official computation, forward and gradients. `ENABLED = False` switches
it off: the model then computes as the official code does.

* The token mixer as one gather and two batched matmuls (`fused_mixer`, float32 on the CPU in
  eager mode). Every branch is linear and the re-weighting only scales output channels per image:

      X = [shift_W(x) | shift_H(x) | 1]                        (B, H*W, 2C + 1), one gather
      mean(h + w + c) = mean(X) @ [Wh; Ww; bh + bw] + mean(x) @ Wc   (mean and FC commute)
      h*a0 + w*a1 + c*a2 = X @ [Wh*a0; Ww*a1; bh*a0 + bw*a1] + x @ (Wc*a2)

  which replaces two gathers, three matmuls and the bias and re-weighting passes over the maps by
  matmuls of the same FLOPs, plus 3C x C per image for the per-image weights: less than those
  passes while 3*H*W >= C (every stage but the last). Where H*W >= 3C (the first two stages)
  `proj` folds in too, X @ (M @ Wp) + bp. The column of ones carries the biases into the matmul
  (cheaper than a broadcast add over a map on Paddle's CPU kernels).

* Backward rules for float32 on the CPU in eager mode, where Paddle's own kernels are slow:
  Paddle reduces a (rows, C) gradient to a bias's or LayerNorm weight's on one thread (100 ms for
  50k x 256; a matmul with a row of ones takes 1 ms); Linear adds its bias inside the matmul.

* Exports: export.py traces `grouped_by_shift(model)` inside `fused_mixer_traced()` (docs/deployment.md).
"""
import contextlib
import copy
from typing import Iterator, Optional

import numpy as np
import zlib  # noqa: F401  before Paddle: Paddle 2.6 bundles a zlib that crashes one loaded after it
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from cycle_fc import IndexCache, gather_columns, shift_order, shifted_slices

ENABLED = True
_TRACING_FUSED_MIXER = False     # set by fused_mixer_traced(), for export.py only


@paddle.jit.not_to_static   # a plain Python test, also while the model is being exported
def on_fast_cpu_path(x: paddle.Tensor) -> bool:
    """Whether the CPU backward rules below apply to x: float32 on the CPU, eager mode."""
    return ENABLED and paddle.in_dynamic_mode() and x.place.is_cpu_place() and x.dtype == paddle.float32


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


class MlpFunction(PyLayer):
    """fc2(gelu(fc1(x))); the backward recomputes GELU rather than keep the block's largest map."""

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


class ScaleColumns(PyLayer):
    """(K, R, C) matrices, (B, K, C) scales -> (B, K, R, C): M_k @ diag(s_bk), from expanded operands
    (Paddle's CPU multiply broadcasting both is 20x slower), nothing (B, K, R, C) kept for backward."""

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
    """paddle.nn.Linear, with LinearFunction's backward on the fast CPU path."""

    def forward(self, x):
        if self.bias is None or not on_fast_cpu_path(x):
            return nn.Linear.forward(self, x)   # not super(): Paddle 2.6's to_static cannot convert it
        return LinearFunction.apply(x, self.weight, self.bias)


class LayerNorm(nn.LayerNorm):
    """paddle.nn.LayerNorm (last axis), with LayerNormFunction's backward on the fast CPU path."""

    def forward(self, x):
        if not on_fast_cpu_path(x):
            return nn.LayerNorm.forward(self, x)
        return LayerNormFunction.apply(x, self.weight, self.bias, self._epsilon)


def mlp(fc1: nn.Linear, fc2: nn.Linear, x: paddle.Tensor) -> paddle.Tensor:
    """fc2(gelu(fc1(x))) by MlpFunction (call it where on_fast_cpu_path(x) holds)."""
    return MlpFunction.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)


@contextlib.contextmanager
def fused_mixer_traced() -> Iterator[None]:
    """Inside this block, paddle.jit.save traces the token mixers of a fixed-size float32 input as
    `fused_mixer` (export.py's parity checks compare it with the eager model in every runtime)."""
    global _TRACING_FUSED_MIXER
    previous, _TRACING_FUSED_MIXER = _TRACING_FUSED_MIXER, True
    try:
        yield
    finally:
        _TRACING_FUSED_MIXER = previous


@paddle.jit.not_to_static
def traces_fused_mixer(x) -> bool:
    """Whether x is traced inside fused_mixer_traced(), float32, of a known (not symbolic) size."""
    _, height, width, _ = x.shape
    return (ENABLED and _TRACING_FUSED_MIXER and not paddle.in_dynamic_mode() and x.dtype == paddle.float32
            and isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0)


def fuses_mixer(x: paddle.Tensor) -> bool:
    """Whether `fused_mixer` is the faster way for channel-last x (measured on the fast CPU path
    only; on GPU and under AMP the official computation runs)."""
    _, height, width, dim = x.shape
    if traces_fused_mixer(x):
        # Exported, only where proj folds in (the first two stages at 224): measured in Paddle
        # Inference and ONNX Runtime, the per-image batched matmuls of the later stages are
        # slower than the official computation's one large matmul per FC (docs/deployment.md).
        return height * width >= 3 * dim
    return on_fast_cpu_path(x) and 3 * height * width >= dim


# Gather indices of the fused mixer, per (channels, height, width): every mixer of a width
# shares one.
_mixer_indices = IndexCache()


def _mixer_index(mixer: nn.Layer, height, width) -> paddle.Tensor:
    """Gather index of X = [sfc_h input | sfc_w input | 1] from x with [0, 1] appended."""
    zero = height * (width * mixer.sfc_h.in_channels)   # not (h * w) * c: see cycle_fc.shifted_positions
    shifted = [mixer.sfc_h.source_index(height, width, zero), mixer.sfc_w.source_index(height, width, zero)]
    one = paddle.full_like(shifted[0][:, :, :1], 1) + zero
    return paddle.concat(shifted + [one], axis=-1).flatten()               # (H*W*(2C + 1),)


def fused_mixer(mixer: nn.Layer, x: paddle.Tensor) -> paddle.Tensor:
    """cyclemlp.CycleMLP's forward on channel-last x (B, H, W, C) (see the module doc)."""
    _, height, width, dim = x.shape        # the batch is -1 while traced for an export: never used
    pixels = height * width
    if mixer.sfc_h.grouped:             # channels in shift order (grouped_by_shift): slices
        kernels = max(mixer.sfc_h.kernel_size), max(mixer.sfc_w.kernel_size)
        shifted = paddle.concat(shifted_slices(x, kernels[0], True) + shifted_slices(x, kernels[1], False)
                                + [paddle.ones_like(x[:, :, :, :1])], axis=-1)
    else:
        index = _mixer_indices.get((dim, height, width), lambda: _mixer_index(mixer, height, width))
        flat = x.flatten(start_axis=1)                                            # (B, H*W*C)
        zero = paddle.zeros_like(flat[:, :1])
        shifted = gather_columns(paddle.concat([flat, zero, zero + 1], axis=1), index)
    shifted = shifted.reshape([0, pixels, 2 * dim + 1])                   # X: (B, H*W, 2C + 1)
    plain = x.reshape([0, pixels, dim])                                      # x: (B, H*W, C)
    # FC weights as (in, out): CycleFC stores (out, in, 1, 1), Paddle Linear (in, out).
    fc_h, fc_w = mixer.sfc_h.weight.reshape([dim, dim]).t(), mixer.sfc_w.weight.reshape([dim, dim]).t()
    biases = paddle.stack([mixer.sfc_h.bias, mixer.sfc_w.bias, paddle.zeros_like(mixer.sfc_h.bias)])
    # The mean over pixels as a matmul with a row of 1/(H*W): several times faster than
    # Paddle's CPU mean over a middle axis, and the same number.
    pixel_mean = paddle.full([1, pixels], 1.0 / pixels, dtype=x.dtype)
    means = paddle.concat([paddle.matmul(pixel_mean, shifted), paddle.matmul(pixel_mean, plain)], axis=2)
    pooled = paddle.matmul(means.squeeze(1), paddle.concat(
        [fc_h, fc_w, biases.sum(axis=0, keepdim=True), mixer.mlp_c.weight]))   # mean(h + w + c): (B, C)
    # The official re-weighting: 3C logits read as (B, C, 3), softmax over the three branches.
    a = F.softmax(mixer.reweight(pooled).reshape([-1, dim, 3]), axis=2).transpose([0, 2, 1])  # (B, 3, C)
    weights = paddle.stack([fc_h, fc_w, mixer.mlp_c.weight])
    if on_fast_cpu_path(x):
        scaled = ScaleColumns.apply(weights, a)
    else:   # traced for export: both operands expanded, as in ScaleColumns (the batch may be symbolic);
        # Paddle Inference's oneDNN multiply broadcasting both took 50x longer (108 ms against 2)
        shape = [paddle.shape(a)[0]] + list(weights.shape)
        scaled = weights.unsqueeze(0).expand(shape) * a.unsqueeze(2).expand(shape)
    scaled = scaled.reshape([-1, 3 * dim, dim])
    bias_row = (biases * a).sum(axis=1, keepdim=True)                      # (B, 1, C)
    fold_proj = pixels >= 3 * dim
    if fold_proj:
        scaled = paddle.matmul(scaled, mixer.proj.weight)
        bias_row = paddle.matmul(bias_row, mixer.proj.weight) + mixer.proj.bias
    # split, not slicing: Paddle's CPU slice gradient is several times slower.
    shifted_weights, plain_weights = paddle.split(scaled, [2 * dim, dim], axis=1)
    out = (paddle.bmm(shifted, paddle.concat([shifted_weights, bias_row], axis=1))
           + paddle.bmm(plain, plain_weights)).reshape([0, height, width, dim])
    return out if fold_proj else mixer.proj(out)


def _take(tensor: paddle.Tensor, order: Optional[np.ndarray], axis: int) -> None:
    if order is not None:
        tensor.set_value(np.take(tensor.numpy(), order, axis=axis))


def _permute(layer: nn.Layer, inputs: Optional[np.ndarray], outputs: Optional[np.ndarray]) -> None:
    """Reorder a layer's inputs and outputs (Linear weight [in, out], others [out, in, ..] or [out])."""
    out_axis = 1 if isinstance(layer, nn.Linear) else 0
    _take(layer.weight, inputs, 1 - out_axis)
    _take(layer.weight, outputs, out_axis)
    if layer.bias is not None:
        _take(layer.bias, outputs, 0)


def grouped_by_shift(model: nn.Layer) -> nn.Layer:
    """A copy of the classifier `model`, the same logits, with each stage's channels stored in
    shift_order (every weight permuted to match), so that each CycleFC shift is slices of a padded
    map, not a gather: for exports, where the gather cost 12-18% of the time (docs/deployment.md)."""
    model = copy.deepcopy(model)
    previous = None
    for convolution, stage in zip([model.patch_embed] + list(model.network[1::2]), model.network[::2]):
        shifts = stage[0].attn.sfc_h
        order = shift_order(shifts.in_channels, max(shifts.kernel_size))
        _permute(convolution.proj, previous, order)
        for block in stage:
            mixer = block.attn
            for layer in (block.norm1, block.norm2):
                _permute(layer, None, order)
            for layer in (mixer.sfc_h, mixer.sfc_w, mixer.mlp_c, mixer.proj):
                _permute(layer, order, order)
            mixer.sfc_h.grouped = mixer.sfc_w.grouped = True
            # the re-weighting logits are read as (C, 3): channel c's three are 3c, 3c + 1, 3c + 2
            _permute(mixer.reweight.fc1, order, None)
            _permute(mixer.reweight.fc2, None, (3 * order[:, None] + np.arange(3)).ravel())
            _permute(block.mlp.fc1, order, None)
            _permute(block.mlp.fc2, None, order)
        previous = order
    _permute(model.norm, None, previous)
    _permute(model.head, previous, None)
    return model
