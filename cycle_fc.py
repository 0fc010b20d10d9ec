"""CycleFC, the token-mixing layer of CycleMLP, computed with plain Paddle index ops.

CycleMLP: A MLP-like Architecture for Dense Prediction (Chen et al., ICLR 2022, arXiv:2107.10224).
Official code: https://github.com/ShoufaChen/CycleMLP (`cycle_mlp.py`, class `CycleFC`).

The official layer is a 1x1 deformable convolution whose offsets are fixed integers, one per input
channel: with kernel (1, K) input channel c is read at column w + shift(c), with kernel (K, 1) at
row h + shift(c), where

    shift(c) = (c + K // 2) % K - K // 2        # K = 3: 0, +1, -1, 0, +1, -1, ...

so a channel FC after the shift sees a K-pixel-wide stripe at the cost of a plain channel FC;
positions outside the map read zero. The offsets are integers, so the deformable convolution's
bilinear sampling always lands on a pixel: the layer is a gather of shifted channels and a matmul.
Earlier Paddle ports call `deform_conv2d`, several times slower than the FC it stands for (bilinear
weights and an im2col buffer per pixel) and not cleanly exportable to ONNX. Here the shift is one
gather over a precomputed flat index (in exports, channels grouped by shift: slices) and the FC one
matmul, both channel-last.
"""
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import zlib  # noqa: F401  before Paddle: Paddle 2.6 bundles a zlib that crashes one loaded after it
import paddle
import paddle.nn as nn

# Index tensors are cached per input size; inference on many sizes should not grow without bound.
MAX_CACHED_SIZES = 16


def channel_shifts(channels: int, kernel: int) -> np.ndarray:
    """Integer shift of each input channel along the kernel's long side (official gen_offset)."""
    c = np.arange(channels)
    return (c + kernel // 2) % kernel - kernel // 2


def shift_order(channels: int, kernel: int) -> np.ndarray:
    """The channels grouped by shift: 0, K, 2K, .., then 1, K + 1, .. (fast_layers.grouped_by_shift)."""
    return np.concatenate([np.arange(group, channels, kernel) for group in range(kernel)])


def shifted_slices(x: paddle.Tensor, kernel: int, along_width: bool) -> List[paddle.Tensor]:
    """The shift of channel-last x whose channels are in shift_order, as one slice of the zero-padded
    x per group (no gather, no index, bounds independent of the size); the groups in order."""
    axis, low = (2 if along_width else 1), kernel // 2
    zeros = paddle.zeros_like(x[:, :, :1] if along_width else x[:, :1])
    padded = paddle.concat([zeros] * low + [x] + [zeros] * (kernel - 1 - low), axis=axis)
    parts, first = [], 0
    for group, shift in enumerate(channel_shifts(min(kernel, x.shape[-1]), kernel)):
        count = len(range(group, x.shape[-1], kernel))
        start, stop = low + shift, low + shift - (kernel - 1) or None      # stop counted from the end
        parts.append(padded[:, :, start:stop, first:first + count] if along_width
                     else padded[:, start:stop, :, first:first + count])
        first += count
    return parts


# Paddle 2.x computes the gradient of paddle.gather along axis 1 wrongly (checked with 2.6.2 on
# CPU: every row receives the first row's gradient), so there the slower but correct
# index_select is used; Paddle 3.x's gather is right and 3-5x faster than index_select on CPU.
_GATHER = paddle.index_select if paddle.__version__.startswith('2.') else paddle.gather


def gather_columns(x: paddle.Tensor, index: paddle.Tensor) -> paddle.Tensor:
    """x[:, index] for a 2-D x, with a correct gradient on every supported Paddle."""
    return _GATHER(x, index, axis=1)


class IndexCache:
    """Gather indices built once per input size and device (eager only: traced sizes may be symbolic)."""

    def __init__(self) -> None:
        self._indices: Dict[Tuple, paddle.Tensor] = {}

    def get(self, key: Tuple, build: Callable[[], paddle.Tensor]) -> paddle.Tensor:
        if not paddle.in_dynamic_mode():
            return build()
        key = key + (str(paddle.get_device()),)
        if key not in self._indices:
            if len(self._indices) >= MAX_CACHED_SIZES:
                self._indices.clear()
            self._indices[key] = build()
        return self._indices[key]


def shifted_positions(height, width, channels: int, shifts: np.ndarray, along_width: bool,
                      outside=None) -> paddle.Tensor:
    """int64 (H, W, C): the flat position in a channel-last map that output (h, w, c) reads,
    (h, w + shifts[c]) along the width, else (h + shifts[c], w); reads off the map point at
    `outside` (default H*W*C, where the caller appends a zero). Paddle ops: sizes may be symbolic.

    The shift is added after the strides (position + shift * stride, not (row + shift) * stride):
    Paddle Inference's oneDNN passes (3.3) compute an integer sum times a constant wrongly
    (tests/test_export.py keeps the reproduction)."""
    row_stride = width * channels                                   # elements per image row
    rows = paddle.arange(height, dtype='int64').reshape([-1, 1, 1])                 # (H, 1, 1)
    cols = paddle.arange(width, dtype='int64').reshape([1, -1, 1])                  # (1, W, 1)
    shift = paddle.to_tensor(shifts.astype(np.int64)).reshape([1, 1, -1])           # (1, 1, C)
    position = rows * row_stride + cols * channels + paddle.arange(channels, dtype='int64')
    if along_width:
        cols = cols + shift
        position = position + shift * channels
    else:
        rows = rows + shift
        position = position + shift * row_stride
    inside = paddle.logical_and(paddle.logical_and(rows >= 0, rows < height),
                                paddle.logical_and(cols >= 0, cols < width))
    outside = height * row_stride if outside is None else outside
    # where broadcasts inside (H, W, 1 or C); an explicit expand_as would not export to ONNX with
    # dynamic sizes (paddle2onnx bakes the -1 of the symbolic shape into the Expand).
    return paddle.where(inside, position, paddle.full_like(position, outside))


class CycleFC(nn.Layer):
    """A channel FC after shifting input channel c by `channel_shifts(C, K)[c]` pixels, on
    channel-last (B, H, W, C). The official state, so its checkpoints load unchanged: weight
    [out, in, 1, 1], bias, and the `offset` buffer [1, 2 * in, 1, 1] of (dy, dx) per channel, kept
    only for that (the shift comes from `kernel_size`). The official layer's other arguments are
    left out: CycleMLP uses stride 1, padding 0, dilation 1, groups 1 and a bias.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Sequence[int]):
        super().__init__()
        kernel_size = tuple(kernel_size) if isinstance(kernel_size, (tuple, list)) else kernel_size
        if not (isinstance(kernel_size, tuple) and len(kernel_size) == 2
                and all(type(k) is int and k >= 1 for k in kernel_size) and min(kernel_size) == 1):
            raise ValueError(f'CycleFC: kernel_size must be (1, K) or (K, 1) with an integer K >= 1, '
                             f'got {kernel_size!r}')
        for name, value in (('in_channels', in_channels), ('out_channels', out_channels)):
            if type(value) is not int or value < 1:
                raise ValueError(f'CycleFC: {name} must be a positive integer, got {value!r}')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        # Kernel (1, K) shifts along W (axis 2 of B, H, W, C); kernel (K, 1) shifts along H.
        self.along_width = kernel_size[0] == 1
        self.shifts = channel_shifts(in_channels, max(kernel_size))

        # The official reset_parameters: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), ..).
        bound = 1.0 / np.sqrt(in_channels)
        init = nn.initializer.Uniform(-bound, bound)
        self.weight = self.create_parameter([out_channels, in_channels, 1, 1], default_initializer=init)
        self.bias = self.create_parameter([out_channels], is_bias=True, default_initializer=init)
        offset = np.zeros((in_channels, 2), dtype=np.float32)           # (dy, dx) per input channel
        offset[:, 1 if self.along_width else 0] = self.shifts
        self.register_buffer('offset', paddle.to_tensor(offset.reshape(1, 2 * in_channels, 1, 1)),
                             persistable=True)
        self._index_cache = IndexCache()
        self.grouped = False     # input channels in shift_order (fast_layers.grouped_by_shift sets it)

    def source_index(self, height, width, outside=None) -> paddle.Tensor:
        """Where output (h, w, c) reads from in the flattened input; see `shifted_positions`."""
        return shifted_positions(height, width, self.in_channels, self.shifts, self.along_width, outside)

    def shift(self, x: paddle.Tensor) -> paddle.Tensor:
        """Shift each channel of channel-last x by its offset: (B, H, W, C) -> (B, H, W, C)."""
        if self.grouped:
            return paddle.concat(shifted_slices(x, max(self.kernel_size), self.along_width), axis=-1)
        _, height, width, channels = x.shape
        index = self._index_cache.get((height, width), lambda: self.source_index(height, width).flatten())
        # Speed: a gather along one flat axis is the fastest copy Paddle has on CPU here
        # (index_select and take_along_axis were 3-5x slower). The zero appended to each image
        # is what reads outside the map get.
        flat = x.flatten(start_axis=1)                                          # (B, H*W*C)
        flat = paddle.concat([flat, paddle.zeros_like(flat[:, :1])], axis=1)
        return gather_columns(flat, index).reshape([0, height, width, channels])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        weight = self.weight.reshape([self.out_channels, self.in_channels])    # (C_out, C_in)
        return paddle.matmul(self.shift(x), weight, transpose_y=True) + self.bias

    def extra_repr(self) -> str:
        return f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}'
