"""CycleFC against two independent formulations: Paddle's deform_conv2d and a numpy shift loop."""
import numpy as np
import paddle
import pytest

from cycle_fc import CycleFC, channel_shifts, shift_order, shifted_slices

SHAPES = [  # (B, H, W, C): H or W of 1 and 2, channel counts not divisible by K, several batches
    (1, 1, 2, 7),
    (3, 2, 1, 5),
    (2, 5, 7, 10),
    (1, 2, 2, 4),
    (4, 6, 3, 11),
]
KERNELS = [(1, k) for k in (1, 3, 5, 7)] + [(k, 1) for k in (1, 3, 5, 7)] + [(1, 2), (4, 1)]


def deform_reference(layer: CycleFC, x: paddle.Tensor) -> paddle.Tensor:
    """The official definition: a 1x1 deformable conv with the layer's fixed offsets, NCHW."""
    batch, height, width, channels = x.shape
    offset = layer.offset.expand([batch, 2 * channels, height, width])
    out = paddle.vision.ops.deform_conv2d(x.transpose([0, 3, 1, 2]), offset, layer.weight, layer.bias,
                                          deformable_groups=channels)
    return out.transpose([0, 2, 3, 1])


def numpy_reference(x: np.ndarray, weight: np.ndarray, bias, kernel) -> np.ndarray:
    """Shift every channel by hand with explicit bounds checks, then a channel FC."""
    batch, height, width, channels = x.shape
    shifts = [(c + max(kernel) // 2) % max(kernel) - max(kernel) // 2 for c in range(channels)]
    shifted = np.zeros_like(x)
    for c, s in enumerate(shifts):
        for h in range(height):
            for w in range(width):
                hh, ww = (h, w + s) if kernel[0] == 1 else (h + s, w)
                if 0 <= hh < height and 0 <= ww < width:
                    shifted[:, h, w, c] = x[:, hh, ww, c]
    return shifted @ weight.reshape(weight.shape[0], -1).T + bias


def forward_and_grads(layer, fn, x_np, upstream):
    x = paddle.to_tensor(x_np, stop_gradient=False)
    out = fn(x)
    (out * paddle.to_tensor(upstream)).sum().backward()
    grads = [x.grad.numpy(), layer.weight.grad.numpy(), layer.bias.grad.numpy()]
    layer.clear_gradients()
    return out.numpy(), grads


@pytest.mark.parametrize('kernel', KERNELS, ids=str)
@pytest.mark.parametrize('shape', SHAPES, ids=str)
def test_matches_deform_conv2d_forward_and_backward(kernel, shape):
    rng = np.random.default_rng(sum(shape) * 10 + sum(kernel))
    layer = CycleFC(shape[-1], shape[-1], kernel)
    layer.bias.set_value(rng.normal(size=shape[-1]).astype('float32'))
    x = rng.normal(size=shape).astype('float32')
    upstream = rng.normal(size=shape).astype('float32')
    ours, our_grads = forward_and_grads(layer, layer, x, upstream)
    ref, ref_grads = forward_and_grads(layer, lambda t: deform_reference(layer, t), x, upstream)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)
    for name, got, want in zip(('input', 'weight', 'bias'), our_grads, ref_grads):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f'{name} gradient')


@pytest.mark.parametrize('in_ch,out_ch,kernel', [(7, 3, (1, 3)), (5, 12, (3, 1)), (8, 6, (1, 5))])
def test_other_output_channel_counts_match_numpy(in_ch, out_ch, kernel):
    rng = np.random.default_rng(in_ch * out_ch)
    layer = CycleFC(in_ch, out_ch, kernel)
    layer.bias.set_value(rng.normal(size=out_ch).astype('float32'))
    x = rng.normal(size=(2, 4, 5, in_ch)).astype('float32')
    want = numpy_reference(x, layer.weight.numpy(), layer.bias.numpy(), kernel)
    np.testing.assert_allclose(layer(paddle.to_tensor(x)).numpy(), want, atol=1e-5, rtol=1e-5)


def test_offsets_follow_the_official_pattern():
    # The official gen_offset: sfc_h (1, 3) starts 0,0, 0,1, 0,-1; sfc_w (3, 1) starts 0,0, 1,0, -1,0.
    assert CycleFC(6, 6, (1, 3)).offset.numpy().ravel().tolist() == [0, 0, 0, 1, 0, -1] * 2
    assert CycleFC(6, 6, (3, 1)).offset.numpy().ravel().tolist() == [0, 0, 1, 0, -1, 0] * 2
    assert channel_shifts(8, 5).tolist() == [0, 1, 2, -2, -1, 0, 1, 2]
    assert channel_shifts(4, 2).tolist() == [0, -1, 0, -1]


def test_shift_moves_channels_with_zero_padding():
    # Channel 1 of a (1, 3) layer reads one column to the right; the last column reads zero.
    layer = CycleFC(3, 3, (1, 3))
    x = paddle.arange(1, 13, dtype='float32').reshape([1, 1, 4, 3])
    shifted = layer.shift(x).numpy()[0, 0]
    assert shifted[:, 0].tolist() == [1, 4, 7, 10]      # shift 0
    assert shifted[:, 1].tolist() == [5, 8, 11, 0]      # shift +1, no wrap-around
    assert shifted[:, 2].tolist() == [0, 3, 6, 9]       # shift -1


@pytest.mark.parametrize('kernel', KERNELS, ids=str)
@pytest.mark.parametrize('shape', SHAPES, ids=str)
def test_shifted_slices_shift_channels_stored_in_shift_order(kernel, shape):
    """The exports' gather-free shift (channels grouped by shift, each group one slice) moves
    every channel as the gather does; and a CycleFC told its input is grouped reads it so."""
    layer = CycleFC(shape[-1], shape[-1], kernel)
    x = np.random.default_rng(sum(shape)).normal(size=shape).astype('float32')
    order = shift_order(shape[-1], max(kernel))
    assert sorted(order) == list(range(shape[-1]))
    grouped = paddle.to_tensor(x[..., order])
    got = paddle.concat(shifted_slices(grouped, max(kernel), layer.along_width), axis=-1).numpy()
    np.testing.assert_array_equal(got, layer.shift(paddle.to_tensor(x)).numpy()[..., order])
    layer.grouped = True
    np.testing.assert_array_equal(layer.shift(grouped).numpy(), got)


def test_index_is_built_once_per_size(monkeypatch):
    layer = CycleFC(4, 4, (3, 1))
    built = []
    original = layer.source_index
    monkeypatch.setattr(layer, 'source_index', lambda *size: built.append(size) or original(*size))
    first = layer(paddle.randn([2, 5, 6, 4]))
    layer(paddle.randn([3, 5, 6, 4]))          # another batch size: the same index
    assert built == [(5, 6)]
    layer(paddle.randn([1, 6, 5, 4]))
    assert built == [(5, 6), (6, 5)] and first.shape == [2, 5, 6, 4]


@pytest.mark.parametrize('kwargs,message', [
    (dict(kernel_size=(3, 3)), 'kernel_size'),
    (dict(kernel_size=(1, 0)), 'kernel_size'),
    (dict(kernel_size=3), 'kernel_size'),
    (dict(kernel_size=(1, 3, 1)), 'kernel_size'),
    (dict(kernel_size=(1, 2.0)), 'kernel_size'),
    (dict(kernel_size=(1, 3), in_channels=0), 'in_channels must be a positive integer'),
    (dict(kernel_size=(1, 3), out_channels='6'), 'out_channels must be a positive integer'),
])
def test_unsupported_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CycleFC(**{'in_channels': 6, 'out_channels': 6, **kwargs})


def test_gather_columns_gradient_reaches_every_row():
    # Paddle 2.6's paddle.gather(axis=1) gave every row the first row's gradient; guard the fix.
    from cycle_fc import gather_columns
    x = paddle.to_tensor(np.arange(12, dtype='float32').reshape(3, 4), stop_gradient=False)
    out = gather_columns(x, paddle.to_tensor(np.array([3, 0, 0], dtype='int64')))
    (out * paddle.arange(9, dtype='float32').reshape([3, 3])).sum().backward()
    np.testing.assert_array_equal(out.numpy(), [[3, 0, 0], [7, 4, 4], [11, 8, 8]])
    np.testing.assert_array_equal(x.grad.numpy(), [[3, 0, 0, 0], [9, 0, 0, 3], [15, 0, 0, 6]])
