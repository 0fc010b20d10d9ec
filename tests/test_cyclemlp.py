"""cyclemlp.py, the paper's architecture: the official logits from a checkpoint the official code
wrote (with fast_layers.py on and off), the official state-dict layout, shapes at any size,
gradients, drop path, the official init, and arguments checked with their names."""
from pathlib import Path

import math

import numpy as np
import paddle
import pytest

import cyclemlp
import fast_layers
from conftest import TINY_CONFIG
from cyclemlp import CycleNet
from weights import read_weights, torch_to_paddle

FIXTURES = Path(__file__).resolve().parent / 'fixtures'
TINY = TINY_CONFIG


@pytest.fixture(params=[True, False], ids=['fast-layers-on', 'fast-layers-off'])
def fast(request, monkeypatch):
    """Each test that takes this runs twice: with fast_layers.py's speed-ups (as shipped) and
    with the official computation."""
    monkeypatch.setattr(fast_layers, 'ENABLED', request.param)
    return request.param


def test_official_logits_from_a_checkpoint_the_official_code_wrote(fast):
    """tests/fixtures/official_tiny.pth and its logits were written by the official cycle_mlp.py
    (tests/fixtures/make_official_fixture.py): the state dict loads key for key (Linear weights
    transposed) and gives the official logits and stage maps."""
    official = np.load(FIXTURES / 'official_tiny_io.npz')
    images = paddle.to_tensor(official['input'].astype(np.float32))
    for ema, logits_key in ((False, 'logits'), (True, 'logits_ema')):
        state, _, layout = read_weights(FIXTURES / 'official_tiny.pth', ema=ema)
        assert layout == 'torch'
        model = CycleNet(**TINY, num_classes=10)
        missing, unexpected = model.set_state_dict({k: paddle.to_tensor(v) for k, v in torch_to_paddle(state).items()})
        assert not missing and not unexpected
        model.eval()
        with paddle.no_grad():
            stages = model.forward_stages(images)
            logits = model(images).numpy()
        np.testing.assert_allclose(logits, official[logits_key], atol=1e-4, rtol=0)
        if not ema:
            for index, stage in enumerate(stages):
                # The residual stream reaches hundreds here: compare relative to its scale.
                desired = official[f'stage{index}']
                np.testing.assert_allclose(stage.numpy(), desired, rtol=0, atol=1e-5 * np.abs(desired).max())


def test_b1_state_dict_names_and_shapes_follow_the_official_layout():
    state = cyclemlp.CycleNet(**cyclemlp.ARCHITECTURES['CycleMLP_B1']).state_dict()
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
    assert len(state) == 222


@pytest.mark.parametrize('size', [(224, 224), (160, 256), (97, 131), (32, 32)], ids=str)
def test_logits_and_stage_maps_for_any_size(size):
    model = cyclemlp.CycleNet(**cyclemlp.ARCHITECTURES['CycleMLP_B1'], num_classes=7)
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


def test_every_parameter_gets_a_finite_gradient(fast):
    paddle.seed(0)
    model = CycleNet(**TINY, num_classes=5, drop_path_rate=0.1)
    model.train()
    loss = paddle.nn.functional.cross_entropy(model(paddle.randn([4, 3, 64, 48])), paddle.to_tensor([0, 1, 2, 3]))
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        grad = param.grad.numpy()
        assert np.isfinite(grad).all() and np.abs(grad).sum() > 0, name


def official_mixer(mixer: cyclemlp.CycleMLP, x: paddle.Tensor) -> paddle.Tensor:
    """The official CycleMLP.forward as written there (NCHW means, a (3, B, 1, 1, C) softmax),
    with CycleFC.forward, itself checked against deform_conv2d in test_cycle_fc.py, and
    Paddle's own Linear (F.linear)."""
    F = paddle.nn.functional
    batch, _, _, dim = x.shape
    h, w, c = mixer.sfc_h(x), mixer.sfc_w(x), F.linear(x, mixer.mlp_c.weight)
    a = (h + w + c).transpose([0, 3, 1, 2]).flatten(2).mean(2)
    reweight = mixer.reweight
    a = F.linear(F.gelu(F.linear(a, reweight.fc1.weight, reweight.fc1.bias)), reweight.fc2.weight, reweight.fc2.bias)
    a = F.softmax(a.reshape([batch, dim, 3]).transpose([2, 0, 1]), axis=0).unsqueeze([2, 3])
    return F.linear(h * a[0] + w * a[1] + c * a[2], mixer.proj.weight, mixer.proj.bias)


# (2, 6, 7, 8): proj folded into the fused mixer; (1, 1, 1, 8) and (2, 1, 2, 24): the official path.
@pytest.mark.parametrize('shape', [(2, 7, 5, 12), (1, 1, 1, 8), (3, 2, 9, 20), (2, 6, 7, 8), (2, 1, 2, 24)], ids=str)
def test_token_mixer_equals_the_official_forward_and_gradients(shape, fast):
    paddle.seed(sum(shape))
    mixer = cyclemlp.CycleMLP(shape[-1])
    for param in mixer.parameters():   # values of meaningful scale, not the tiny init
        param.set_value(paddle.randn(param.shape) * 0.5)
    x_np = np.random.default_rng(0).normal(size=shape).astype('float32')
    upstream = paddle.randn(list(shape))
    results = []
    for forward in (mixer, lambda t: official_mixer(mixer, t)):
        x = paddle.to_tensor(x_np, stop_gradient=False)
        out = forward(x)
        (out * upstream).sum().backward()
        results.append([out.numpy(), x.grad.numpy()] + [p.grad.numpy() for p in mixer.parameters()])
        mixer.clear_gradients()
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-4)


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


def official_init(name: str, shape: list):
    """The official model's init of a parameter, from its name and shape alone (the official
    cycle_mlp.py's cls_init_weights, PyTorch's defaults elsewhere): ('normal', std) for Linear
    and CycleFC weights, ('uniform', bound) for the convolutions' weights and biases
    (kaiming_uniform(a=sqrt(5)): 1/sqrt(fan_in)), ('constant', value) otherwise."""
    convolution = name.startswith('patch_embed.') or (name.startswith('network.') and '.proj.' in name
                                                     and name.split('.')[1] in ('1', '3', '5'))
    if convolution:
        fan_in = CONV_FAN_IN[name.rsplit('.', 1)[0]]
        return 'uniform', 1 / math.sqrt(fan_in)
    if name.endswith('.weight') and len(shape) in (2, 4):   # Linear, CycleFC (1x1)
        return 'normal', 0.02
    if 'norm' in name.split('.')[-2]:                       # LayerNorm
        return 'constant', 1.0 if name.endswith('.weight') else 0.0
    return 'constant', 0.0                                   # Linear and CycleFC biases


# fan_in of B1's convolutions: in_channels * kernel height * kernel width.
CONV_FAN_IN = {'patch_embed.proj': 3 * 7 * 7, 'network.1.proj': 64 * 3 * 3,
               'network.3.proj': 128 * 3 * 3, 'network.5.proj': 320 * 3 * 3}


def test_every_parameter_starts_as_in_the_official_code():
    paddle.seed(1)
    model = cyclemlp.CycleNet(**cyclemlp.ARCHITECTURES['CycleMLP_B1'])
    kinds = set()
    for name, param in model.named_parameters():
        kind, value = official_init(name, param.shape)
        values = param.numpy().astype(np.float64)
        kinds.add(kind)
        if kind == 'constant':
            assert np.all(values == value), name
        elif kind == 'normal':
            assert abs(values.mean()) < 0.1 * value and abs(values.std() / value - 1) < 0.05, name
        else:   # uniform in +-bound: std bound/sqrt(3), the whole interval used
            assert np.abs(values).max() <= value, name
            assert np.abs(values).max() > 0.9 * value and abs(values.std() / (value / math.sqrt(3)) - 1) < 0.2, name
    assert kinds == {'constant', 'normal', 'uniform'}
    # The downsample of the issue: std 0.024 as in PyTorch, not Paddle's default 0.059.
    assert abs(float(model.network[1].proj.weight.std()) - 0.024) < 0.001


@pytest.mark.parametrize('change, message', [
    (dict(layers=[1, 1]), 'layers must be four integers'),
    (dict(layers=[1, 0, 1, 1]), r'layers must be four integers in \[1, 1000\]'),
    (dict(layers=[1, 1, 1.5, 1]), 'layers must be four integers'),
    (dict(layers='1111'), 'layers must be four integers'),
    (dict(embed_dims=[8, 16, 2, 32]), r'embed_dims must be four integers in \[4, 8192\]'),
    (dict(embed_dims=[8, 16, None, 32]), 'embed_dims must be four integers'),
    (dict(mlp_ratios=[2, 2, float('nan'), 2]), 'mlp_ratios must be four numbers'),
    (dict(mlp_ratios=[2, 2, -1, 2]), 'mlp_ratios must be four numbers'),
    (dict(mlp_ratios=[2, 2, 0.01, 2]), r'mlp_ratios \[2, 2, 0.01, 2\] leave an MLP .* without a hidden unit'),
    (dict(num_classes='10'), r"num_classes must be an integer in \[1, 100000\], got '10'"),
    (dict(num_classes=10.5), 'num_classes must be an integer'),
    (dict(num_classes=None), 'num_classes must be an integer'),
    (dict(num_classes=True), 'num_classes must be an integer'),
    (dict(num_classes=0), 'num_classes must be an integer'),
    (dict(num_classes=10**12), 'num_classes must be an integer'),
    (dict(drop_path_rate=2.0), r'drop_path_rate must be a number in \[0, 1\), got 2.0'),
    (dict(drop_path_rate=-1), 'drop_path_rate must be a number'),
    (dict(drop_path_rate=1.0), 'drop_path_rate must be a number'),
    (dict(drop_path_rate=float('nan')), 'drop_path_rate must be a number'),
    (dict(drop_path_rate='0.1'), 'drop_path_rate must be a number'),
], ids=lambda value: str(value)[:40])
def test_arguments_are_checked_with_their_names(change, message):
    with pytest.raises(ValueError, match='CycleNet: ' + message):
        CycleNet(**{**TINY, 'num_classes': 3, **change})


def test_numpy_integers_are_integers():
    model = CycleNet([np.int64(1), 1, np.int64(2), 1], [np.int32(8), 16, 24, 32], [2, 2, 2, 2], num_classes=np.int64(3))
    assert model.config == dict(TINY, num_classes=3) and type(model.config['layers'][0]) is int
