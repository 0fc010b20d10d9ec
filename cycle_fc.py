"""CycleFC, the token-mixing layer of CycleMLP, computed with plain Paddle index ops.

CycleMLP: A MLP-like Architecture for Dense Prediction (Chen et al., ICLR 2022, arXiv:2107.10224).
Official code: https://github.com/ShoufaChen/CycleMLP (`cycle_mlp.py`, class `CycleFC`).

The official layer is a 1x1 deformable convolution whose offsets are fixed integers, one per input
channel: with kernel (1, K) input channel c is read at column w + shift(c), with kernel (K, 1) at
row h + shift(c), where

    shift(c) = (c + K // 2) % K - K // 2        # K = 3: 0, +1, -1, 0, +1, -1, ...

so neighbouring channels look one pixel left, here and right (or up, here and down) in turn, and
a channel FC after the shift sees a K-pixel-wide stripe at the cost of a plain channel FC.
Positions outside the map read zero. Because the offsets are integers, bilinear sampling in the
deformable convolution always lands exactly on a pixel: the whole layer is a gather of shifted
channels followed by a matrix multiply. Earlier Paddle ports call `deform_conv2d`, which computes
bilinear weights and an im2col buffer for every pixel and is several times slower than the FC it
stands for, and which does not export cleanly to ONNX. Here the shift is one `index_select` over
a precomputed flat index, and the FC is one matmul, both on channel-last tensors.
"""
from typing import Dict, Sequence, Tuple, Union

import numpy as np
import paddle
import paddle.nn as nn

# Index tensors are cached per input size; inference on many sizes should not grow without bound.
MAX_CACHED_SIZES = 16


def channel_shifts(channels: int, kernel: int) -> np.ndarray:
    """Integer shift of each input channel along the kernel's long side (official gen_offset)."""
    c = np.arange(channels)
    return (c + kernel // 2) % kernel - kernel // 2


class CycleFC(nn.Layer):
    """A channel FC applied after shifting input channel c by `channel_shifts(C, K)[c]` pixels.

    Args mirror the official layer so that its checkpoints load unchanged: weight
    [out_channels, in_channels // groups, 1, 1], bias [out_channels], and the `offset` buffer
    [1, 2 * in_channels, 1, 1] holding (dy, dx) per channel. The offset buffer is kept only for
    that compatibility (and to check a loaded checkpoint against it); the shift itself is
    computed from `kernel_size`. `dilation` has no effect: it spaces the taps of the sampling
    kernel, and the sampling kernel is 1x1 (as in the official deformable convolution).

    forward takes and returns channel-last tensors (B, H, W, C), the layout of CycleMLP blocks.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Union[int, Sequence[int]],
                 stride: int = 1, padding: int = 0, dilation: int = 1, groups: int = 1,
                 bias: bool = True):
        super().__init__()
        if isinstance(kernel_size, int):
            kernel_size = (kernel_size, kernel_size)
        kernel_size = tuple(kernel_size)
        if (len(kernel_size) != 2 or not all(isinstance(k, int) and k >= 1 for k in kernel_size)
                or min(kernel_size) != 1):
            raise ValueError(f'CycleFC supports kernel_size (1, K) or (K, 1) with K >= 1, '
                             f'got {kernel_size}')
        if stride not in (1, (1, 1)):
            raise ValueError(f'CycleFC supports only stride 1, got {stride}')
        if padding not in (0, (0, 0)):
            raise ValueError(f'CycleFC supports only padding 0, got {padding}')
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f'CycleFC needs in_channels ({in_channels}) and out_channels '
                             f'({out_channels}) divisible by groups ({groups})')
        if dilation not in (1, (1, 1)) and not (isinstance(dilation, int) and dilation >= 1):
            raise ValueError(f'CycleFC needs an integer dilation >= 1, got {dilation}')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.groups = groups
        # Kernel (1, K) shifts along W (axis 2 of B, H, W, C); kernel (K, 1) shifts along H.
        self.along_width = kernel_size[0] == 1
        self.shifts = channel_shifts(in_channels, max(kernel_size))

        # The official reset_parameters: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), ..).
        bound = 1.0 / np.sqrt(in_channels // groups)
        init = nn.initializer.Uniform(-bound, bound)
        self.weight = self.create_parameter([out_channels, in_channels // groups, 1, 1],
                                            default_initializer=init)
        self.bias = (self.create_parameter([out_channels], is_bias=True, default_initializer=init)
                     if bias else None)
        self.register_buffer('offset', paddle.to_tensor(self.official_offset()), persistable=True)
        self._index_cache: Dict[Tuple, paddle.Tensor] = {}

    def official_offset(self) -> np.ndarray:
        """The official `offset` buffer: (dy, dx) per input channel, shape [1, 2C, 1, 1]."""
        offset = np.zeros((self.in_channels, 2), dtype=np.float32)
        offset[:, 1 if self.along_width else 0] = self.shifts
        return offset.reshape(1, 2 * self.in_channels, 1, 1)

    def shift_index(self, height, width) -> paddle.Tensor:
        """Flat gather index giving the shifted input, cached per (H, W) in eager mode.

        Along W the input is viewed as (B, H, W*C) and the index has W*C entries; along H it is
        viewed as (B, H*W*C) and the index has H*W*C entries. Entry (.., c) points at the pixel
        `shift(c)` away in channel c, or at one extra zero slot appended after the data when
        that pixel lies outside the map (zero padding, no wrap-around). Built from Paddle ops so
        that it also works with symbolic sizes when the model is exported with dynamic H and W.
        """
        key = (height, width, str(paddle.get_device()))
        if paddle.in_dynamic_mode() and key in self._index_cache:
            return self._index_cache[key]
        channels = self.in_channels
        shifts = paddle.to_tensor(self.shifts.astype(np.int64))
        chan = paddle.arange(channels, dtype='int64')
        if self.along_width:
            col = paddle.arange(width, dtype='int64').unsqueeze(1)            # (W, 1)
            src = col + shifts                                                # (W, C)
            inside = paddle.logical_and(src >= 0, src < width)
            flat = src * channels + chan
            zero_slot = width * channels
        else:
            row = paddle.arange(height, dtype='int64').reshape([-1, 1, 1])    # (H, 1, 1)
            col = paddle.arange(width, dtype='int64').reshape([1, -1, 1])     # (1, W, 1)
            src = row + shifts                                                # (H, 1, C)
            inside = paddle.logical_and(src >= 0, src < height)
            flat = (src * width + col) * channels + chan                      # (H, W, C)
            inside = paddle.expand_as(inside, flat)
            zero_slot = height * width * channels
        index = paddle.where(inside, flat, paddle.full_like(flat, zero_slot)).flatten()
        if paddle.in_dynamic_mode():
            if len(self._index_cache) >= MAX_CACHED_SIZES:
                self._index_cache.clear()
            self._index_cache[key] = index
        return index

    def shift(self, x: paddle.Tensor) -> paddle.Tensor:
        """Shift each channel of channel-last x by its offset: (B, H, W, C) -> (B, H, W, C)."""
        _, height, width, channels = x.shape
        index = self.shift_index(height, width)
        # Flatten the axes the shift moves along, append one zero per row as the padding target.
        axis = 2 if self.along_width else 1
        flat = paddle.flatten(x, start_axis=axis)            # (B, H, W*C) or (B, H*W*C)
        zero = paddle.zeros_like(flat[..., :1])
        shifted = paddle.index_select(paddle.concat([flat, zero], axis=axis), index, axis=axis)
        return shifted.reshape([0, height, width, channels])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        shifted = self.shift(x)
        weight = self.weight.reshape([self.out_channels, -1])            # (C_out, C_in / groups)
        if self.groups == 1:
            out = paddle.matmul(shifted, weight, transpose_y=True)
        else:
            g, per_in, per_out = self.groups, self.in_channels // self.groups, self.out_channels // self.groups
            # (B, H, W, C_in) -> (g, B*H*W, C_in/g), one matmul per group, then back to channel-last.
            grouped = shifted.reshape([-1, g, per_in]).transpose([1, 0, 2])
            out = paddle.bmm(grouped, weight.reshape([g, per_out, per_in]).transpose([0, 2, 1]))
            out = out.transpose([1, 0, 2]).reshape(x.shape[:-1] + [self.out_channels])
        if self.bias is not None:
            out = out + self.bias
        return out

    def extra_repr(self) -> str:
        extra = f', groups={self.groups}' if self.groups != 1 else ''
        extra += ', bias=False' if self.bias is None else ''
        return f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}{extra}'
