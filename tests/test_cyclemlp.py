"""CycleMLP-B1..B5: exact parameter counts and FLOPs, shapes, gradients, names, weight loading."""
import numpy as np
import paddle
import pytest

import cyclemlp
from cyclemlp import CycleNet, count_flops, count_parameters, create_model
from conftest import TINY_CONFIG
from weights import WeightsError, write_weights

# Parameter counts of the official cycle_mlp.py's models; GFLOPs as printed in the paper's Table 1.
OFFICIAL = {
    'CycleMLP_B1': (15_155_400, 2.1, 222),
    'CycleMLP_B2': (26_802_504, 3.9, 390),
    'CycleMLP_B3': (38_385_720, 6.9, 600),
    'CycleMLP_B4': (51_796_552, 10.1, 873),
    'CycleMLP_B5': (75_747_280, 12.3, 726),
}
TINY = TINY_CONFIG


@pytest.mark.parametrize('name', OFFICIAL)
def test_parameter_count_flops_and_state_dict_size(name):
    params, gflops, entries = OFFICIAL[name]
    with paddle.LazyGuard():          # shapes only: no parameter is initialised
        model = create_model(name)
    assert count_parameters(model) == params
    # ... which parameter_count, the bound a weights file is checked against, computes unbuilt.
    assert cyclemlp.parameter_count(**cyclemlp.ARCHITECTURES[name], num_classes=1000) == params
    assert round(count_flops(model) / 1e9, 1) == gflops
    assert len(model.state_dict()) == entries


def test_b1_state_dict_names_and_shapes_follow_the_official_layout():
    state = cyclemlp.CycleMLP_B1().state_dict()
    expected = {
        'patch_embed.proj.weight': [64, 3, 7, 7],
        'network.0.0.attn.mlp_c.weight': [64, 64],
        'network.0.1.attn.sfc_h.weight': [64, 64, 1, 1],
        'network.0.1.attn.sfc_h.offset': [1, 128, 1, 1],
        'network.4.3.attn.sfc_w.bias': [320],
        'network.4.3.attn.reweight.fc1.weight': [320, 80],   # Paddle Linear: [in, out]
        'network.4.3.attn.reweight.fc2.weight': [80, 960],
        'network.6.1.mlp.fc1.weight': [512, 2048],
        'network.5.proj.weight': [512, 320, 3, 3],
        'norm.weight': [512],
        'head.weight': [512, 1000],
    }
    for key, shape in expected.items():
        assert list(state[key].shape) == shape, key
    assert 'network.0.0.attn.mlp_c.bias' not in state
    assert sum(key.endswith('.offset') for key in state) == 2 * 10


@pytest.mark.parametrize('size', [(224, 224), (160, 256), (97, 131), (32, 32)], ids=str)
def test_logits_and_stage_maps_for_any_size(size):
    model = cyclemlp.CycleMLP_B1(num_classes=7)
    model.eval()
    images = paddle.randn([2, 3, *size])
    with paddle.no_grad():
        logits = model(images)
        maps = model.forward_features(images)
    assert logits.shape == [2, 7]
    assert np.isfinite(logits.numpy()).all()
    height, width = size
    for stage, (feature, dim) in enumerate(zip(maps, [64, 128, 320, 512])):
        # stem: (H + 4 - 7) // 4 + 1, then each 3x3 stride-2 pad-1 conv: (H - 1) // 2 + 1
        height = (height - 3) // 4 + 1 if stage == 0 else (height - 1) // 2 + 1
        width = (width - 3) // 4 + 1 if stage == 0 else (width - 1) // 2 + 1
        assert feature.shape == [2, dim, height, width]
    # forward(x) == forward_head(forward_features(x)[-1]), as in timm.
    with paddle.no_grad():
        head = model.forward_head(maps[-1])
    np.testing.assert_array_equal(head.numpy(), logits.numpy())


def test_every_parameter_gets_a_finite_gradient():
    paddle.seed(0)
    model = CycleNet(**TINY, num_classes=5, drop_path_rate=0.1)
    model.train()
    loss = paddle.nn.functional.cross_entropy(model(paddle.randn([4, 3, 64, 48])), paddle.to_tensor([0, 1, 2, 3]))
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        grad = param.grad.numpy()
        assert np.isfinite(grad).all() and np.abs(grad).sum() > 0, name


def test_drop_path_grows_linearly_and_is_off_in_eval():
    model = CycleNet(layers=[2, 3, 10, 3], embed_dims=[8, 16, 24, 32], mlp_ratios=[2, 2, 2, 2],
                     drop_path_rate=0.3)      # B2's depths, narrow
    rates = [block.drop_path_rate for stage in model.network[::2] for block in stage]
    np.testing.assert_allclose(rates, 0.3 * np.arange(18) / 17)
    model.eval()
    images = paddle.randn([1, 3, 64, 64])
    np.testing.assert_array_equal(model(images).numpy(), model(images).numpy())
    model.train()
    assert not np.array_equal(model(images).numpy(), model(images).numpy())


def test_official_initialisation():
    paddle.seed(1)
    model = cyclemlp.CycleMLP_B1()
    fc = model.network[4][0].mlp.fc1
    assert abs(float(fc.weight.std()) - 0.02) < 0.001 and float(fc.bias.abs().max()) == 0
    cycle = model.network[4][0].attn.sfc_h
    assert abs(float(cycle.weight.std()) - 0.02) < 0.002 and float(cycle.bias.abs().max()) == 0
    norm = model.network[2][0].norm1
    assert float(norm.weight.min()) == 1 and float(norm.bias.abs().max()) == 0


def test_a_cyclenet_has_four_stages_of_sane_sizes():
    for layers, dims in (([1, 1], [8, 16]), ([1, 1, 1, 1], [8, 16, 2, 32]), ([1, 0, 1, 1], [8, 16, 24, 32])):
        with pytest.raises(ValueError, match='four values|at least 1 block, 4 channels'):
            CycleNet(layers, dims, [2] * len(layers))


def test_unknown_model_name():
    with pytest.raises(ValueError, match='unknown model'):
        create_model('CycleMLP_B9')


@pytest.fixture
def tiny_file(tmp_path):
    paddle.seed(3)
    model = CycleNet(**TINY, num_classes=6)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    path = str(tmp_path / 'tiny.pdparams')
    write_weights(path, state, {'class_names': list('abcdef')})
    return model, state, path


def test_create_model_from_file_infers_architecture_and_classes(tiny_file):
    model, _, path = tiny_file
    loaded, meta = cyclemlp.load_model(path)
    assert loaded.config == model.config and meta == {'class_names': list('abcdef')}
    assert not hasattr(loaded, 'class_names')         # file metadata stays out of the layer
    model.eval(), loaded.eval()
    images = paddle.randn([2, 3, 64, 64])
    np.testing.assert_array_equal(loaded(images).numpy(), model(images).numpy())


def test_wrong_variant_lists_what_differs(tiny_file):
    _, _, path = tiny_file
    with pytest.raises(WeightsError, match='missing keys') as error:
        create_model('CycleMLP_B1', weights=path, num_classes=6)
    assert 'tiny.pdparams' in str(error.value) and 'shape' in str(error.value)


def test_class_count_mismatch_needs_drop_head(tiny_file, tmp_path):
    model, state, path = tiny_file
    with pytest.raises(WeightsError, match='6-class head'):
        create_model(None, weights=path, num_classes=3)
    tuned = create_model(None, weights=path, num_classes=3, drop_head=True)
    assert tuned.head.weight.shape == [32, 3]
    np.testing.assert_array_equal(tuned.norm.weight.numpy(), state['norm.weight'])


def test_changed_offsets_are_refused(tiny_file, tmp_path):
    _, state, _ = tiny_file
    state = dict(state)
    state['network.4.1.attn.sfc_w.offset'] = -state['network.4.1.attn.sfc_w.offset']
    path = str(tmp_path / 'bad.safetensors')
    write_weights(path, state)
    with pytest.raises(WeightsError, match='network.4.1.attn.sfc_w.offset: offsets differ'):
        create_model(None, weights=path)


def paddle_reference(layer, inputs):
    """The same computation with Paddle's own ops and their own gradients."""
    F = paddle.nn.functional
    if isinstance(layer, cyclemlp.Mlp):
        return F.linear(F.gelu(F.linear(inputs[0], layer.fc1.weight, layer.fc1.bias)),
                        layer.fc2.weight, layer.fc2.bias)
    if isinstance(layer, cyclemlp.LayerNorm):
        return F.layer_norm(inputs[0], inputs[0].shape[-1:], layer.weight, layer.bias, layer._epsilon)
    if isinstance(layer, cyclemlp.Linear):
        return F.linear(inputs[0], layer.weight, layer.bias)
    matrices, scales = inputs                      # ScaleColumns
    return matrices.unsqueeze(0) * scales.unsqueeze(2)


@pytest.mark.parametrize('make', [
    lambda: (cyclemlp.Linear(12, 20), [(2, 5, 7, 12)]),
    lambda: (cyclemlp.LayerNorm(12, epsilon=1e-5), [(3, 4, 6, 12)]),
    lambda: (cyclemlp.Mlp(12, 36), [(2, 5, 3, 12)]),
    lambda: (cyclemlp.ScaleColumns, [(3, 7, 5), (4, 3, 5)]),
], ids=['Linear', 'LayerNorm', 'Mlp', 'ScaleColumns'])
def test_fast_cpu_layers_match_paddles_own_ops_forward_and_gradients(make):
    """Linear, LayerNorm, Mlp and ScaleColumns compute their CPU backward by hand (matmul sums,
    GELU recomputed): forward and every gradient must equal Paddle's autograd of its own ops."""
    paddle.seed(3)
    layer, shapes = make()
    params = [] if layer is cyclemlp.ScaleColumns else layer.parameters()
    for param in params:
        param.set_value(paddle.randn(param.shape))
    arrays = [np.random.default_rng(index).normal(2.0, 3.0, shape).astype('float32')
              for index, shape in enumerate(shapes)]
    upstream = None
    results = []
    for forward in (layer.apply if layer is cyclemlp.ScaleColumns else layer,
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


def official_mixer(mixer: cyclemlp.CycleMLP, x: paddle.Tensor) -> paddle.Tensor:
    """The official CycleMLP.forward as written there (NCHW means, a (3, B, 1, 1, C) softmax),
    with CycleFC.forward, itself checked against deform_conv2d in test_cycle_fc.py."""
    batch, _, _, dim = x.shape
    h, w, c = mixer.sfc_h(x), mixer.sfc_w(x), mixer.mlp_c(x)
    a = (h + w + c).transpose([0, 3, 1, 2]).flatten(2).mean(2)
    a = mixer.reweight(a).reshape([batch, dim, 3]).transpose([2, 0, 1])
    a = paddle.nn.functional.softmax(a, axis=0).unsqueeze([2, 3])
    return mixer.proj(h * a[0] + w * a[1] + c * a[2])


@pytest.mark.parametrize('path', ['forward_fused', 'forward_branches'])
@pytest.mark.parametrize('shape', [(2, 7, 5, 12), (1, 1, 1, 8), (3, 2, 9, 20), (2, 6, 7, 8)], ids=str)  # (2, 6, 7, 8): proj folded in
def test_mixer_paths_equal_the_official_forward_and_gradients(shape, path):
    paddle.seed(sum(shape))
    mixer = cyclemlp.CycleMLP(shape[-1])
    for param in mixer.parameters():   # values of meaningful scale, not the tiny init
        param.set_value(paddle.randn(param.shape) * 0.5)
    x_np = np.random.default_rng(0).normal(size=shape).astype('float32')
    upstream = paddle.randn(list(shape))
    results = []
    for forward in (getattr(mixer, path), lambda t: official_mixer(mixer, t)):
        x = paddle.to_tensor(x_np, stop_gradient=False)
        out = forward(x)
        (out * upstream).sum().backward()
        results.append([out.numpy(), x.grad.numpy()] + [p.grad.numpy() for p in mixer.parameters()])
        mixer.clear_gradients()
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-4)


def test_mixer_picks_the_fused_path_unless_maps_are_small(monkeypatch):
    mixer = cyclemlp.CycleMLP(24)
    calls = []
    monkeypatch.setattr(mixer, 'forward_fused', lambda x: calls.append('fused'))
    monkeypatch.setattr(mixer, 'forward_branches', lambda x: calls.append('branches'))
    mixer(paddle.zeros([1, 2, 4, 24]))     # 3 * 8 pixels >= 24 channels
    mixer(paddle.zeros([1, 1, 7, 24]))     # 3 * 7 < 24
    mixer.fuse = False
    mixer(paddle.zeros([1, 9, 9, 24]))
    assert calls == ['fused', 'branches', 'branches']


def test_variant_name_from_architecture():
    assert cyclemlp.variant_name(dict(layers=[3, 4, 18, 3], embed_dims=[64, 128, 320, 512],
                                      mlp_ratios=[8, 8, 4, 4], num_classes=7)) == 'CycleMLP_B3'
    assert cyclemlp.variant_name(dict(layers=[3, 4, 24, 3], embed_dims=[96, 192, 384, 768],
                                      mlp_ratios=[4, 4, 4, 4])) == 'CycleMLP_B5'
    assert cyclemlp.variant_name(dict(TINY)) is None
