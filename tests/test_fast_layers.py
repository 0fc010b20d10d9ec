"""fast_layers.py computes what the official computation computes: each CPU backward rule against
Paddle's own ops (forward and every gradient), the fused mixer where it is used, and the switch
that turns all of it off. (The fused mixer against the official formula, forward and gradients,
and the official logits with the switch on and off: tests/test_cyclemlp.py.)"""
import numpy as np
import paddle
import pytest

import cyclemlp
import fast_layers
from conftest import TINY_CONFIG

F = paddle.nn.functional


def paddle_reference(layer, inputs):
    """The same computation with Paddle's own ops and their own gradients."""
    if isinstance(layer, cyclemlp.Mlp):
        return F.linear(F.gelu(F.linear(inputs[0], layer.fc1.weight, layer.fc1.bias)),
                        layer.fc2.weight, layer.fc2.bias)
    if isinstance(layer, fast_layers.LayerNorm):
        return F.layer_norm(inputs[0], inputs[0].shape[-1:], layer.weight, layer.bias, layer._epsilon)
    if isinstance(layer, fast_layers.Linear):
        return F.linear(inputs[0], layer.weight, layer.bias)
    matrices, scales = inputs                      # ScaleColumns
    return matrices.unsqueeze(0) * scales.unsqueeze(2)


@pytest.mark.parametrize('make', [
    lambda: (fast_layers.Linear(12, 20), [(2, 5, 7, 12)]),
    lambda: (fast_layers.LayerNorm(12, epsilon=1e-5), [(3, 4, 6, 12)]),
    lambda: (cyclemlp.Mlp(12, 36, 12), [(2, 5, 3, 12)]),
    lambda: (fast_layers.ScaleColumns, [(3, 7, 5), (4, 3, 5)]),
], ids=['Linear', 'LayerNorm', 'Mlp', 'ScaleColumns'])
def test_cpu_backward_rules_match_paddles_own_ops_forward_and_gradients(make):
    """Linear, LayerNorm, the MLP and ScaleColumns compute their CPU backward by hand (matmul
    sums, GELU recomputed): forward and every gradient must equal Paddle's autograd of its own ops."""
    paddle.seed(3)
    layer, shapes = make()
    params = [] if layer is fast_layers.ScaleColumns else layer.parameters()
    for param in params:
        param.set_value(paddle.randn(param.shape))
    arrays = [np.random.default_rng(index).normal(2.0, 3.0, shape).astype('float32')
              for index, shape in enumerate(shapes)]
    upstream = None
    results = []
    for forward in (layer.apply if layer is fast_layers.ScaleColumns else layer,
                    lambda *inputs: paddle_reference(layer, inputs)):
        inputs = [paddle.to_tensor(array, stop_gradient=False) for array in arrays]
        out = forward(*inputs)
        upstream = paddle.randn(out.shape) if upstream is None else upstream
        (out * upstream).sum().backward()
        results.append([out.numpy()] + [t.grad.numpy() for t in inputs + list(params)])
        for tensor in inputs + list(params):
            tensor.clear_gradient()
    assert len(results[0]) == len(results[1]) >= 2
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_fused_mixer_is_used_unless_maps_are_small(monkeypatch):
    mixer = cyclemlp.CycleMLP(24)
    calls = []
    monkeypatch.setattr(fast_layers, 'fused_mixer', lambda layer, x: calls.append(x.shape) or x)
    mixer(paddle.zeros([1, 2, 4, 24]))     # 3 * 8 pixels >= 24 channels: fused
    mixer(paddle.zeros([1, 1, 7, 24]))     # 3 * 7 < 24: the official forward
    assert calls == [[1, 2, 4, 24]]
    mixer.to(dtype='float64')               # off the float32 CPU path (as on GPU or under AMP)
    mixer(paddle.zeros([1, 2, 4, 24], dtype='float64'))
    assert calls == [[1, 2, 4, 24]]


def test_the_switch_leaves_the_official_computation(monkeypatch):
    """With ENABLED False nothing of fast_layers runs: a training step of the whole model goes
    through Paddle's own layers only."""
    def refuse(*args, **kwargs):
        raise AssertionError('fast_layers ran with ENABLED False')

    for name in ('LinearFunction', 'LayerNormFunction', 'MlpFunction', 'ScaleColumns'):
        monkeypatch.setattr(getattr(fast_layers, name), 'apply', refuse)
    monkeypatch.setattr(fast_layers, 'fused_mixer', refuse)
    monkeypatch.setattr(fast_layers, 'ENABLED', False)
    model = cyclemlp.CycleNet(**TINY_CONFIG, num_classes=3)
    loss = model(paddle.randn([2, 3, 64, 64])).sum()
    loss.backward()
    assert model.head.weight.grad is not None
    monkeypatch.setattr(fast_layers, 'ENABLED', True)
    with pytest.raises(AssertionError, match='ENABLED False'):     # ... and on, they do
        model(paddle.randn([2, 3, 64, 64]))


@pytest.mark.parametrize('fast', [True, False], ids=['fast', 'official'])
def test_grouped_by_shift_is_the_same_model_with_channels_reordered(fast, monkeypatch):
    """What export.py traces: every stage's channels in shift order, every weight permuted to
    match, the shifts slices; the logits must be the model's (fused mixer and official
    computation alike), at the exported size and another, and the model itself untouched."""
    monkeypatch.setattr(fast_layers, 'ENABLED', fast)
    paddle.seed(5)
    model = cyclemlp.CycleNet(**TINY_CONFIG, num_classes=3)
    for param in model.parameters():            # no symmetric init: a misplaced channel shows
        param.set_value(paddle.randn(param.shape) * 0.5)
    model.eval()
    state = {key: value.numpy().copy() for key, value in model.state_dict().items()}
    grouped = fast_layers.grouped_by_shift(model)
    assert all(layer.grouped for layer in grouped.sublayers() if hasattr(layer, 'grouped'))
    for height, width in ((64, 64), (48, 80)):
        images = paddle.randn([2, 3, height, width])
        with paddle.no_grad():
            expected, got = model(images).numpy(), grouped(images).numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert all(np.array_equal(value.numpy(), state[key]) for key, value in model.state_dict().items())
    assert not any(getattr(layer, 'grouped', False) for layer in model.sublayers())


def test_the_fast_path_is_float32_on_the_cpu_in_eager_mode_only():
    x = paddle.zeros([2, 4])
    assert fast_layers.on_fast_cpu_path(x)
    assert not fast_layers.on_fast_cpu_path(x.astype('float64'))
    assert not fast_layers.on_fast_cpu_path(x.astype('float16'))
    fast_layers.ENABLED = False
    try:
        assert not fast_layers.on_fast_cpu_path(x)
    finally:
        fast_layers.ENABLED = True
