"""zoo.py: the five variants' exact parameter counts and FLOPs, names, and models built from
weight files (the architecture read off the file, checked before anything is built)."""
import os
import re
from pathlib import Path

import numpy as np
import paddle
import pytest

import zoo
from conftest import TINY_CONFIG
from cyclemlp import ARCHITECTURES, CycleNet
from weights import WeightsError, write_weights

FIXTURES = Path(__file__).resolve().parent / 'fixtures'
# Parameter counts of the official cycle_mlp.py's models; GFLOPs as printed in the paper's Table 1.
OFFICIAL = {
    'CycleMLP_B1': (15_155_400, 2.1),
    'CycleMLP_B2': (26_802_504, 3.9),
    'CycleMLP_B3': (38_385_720, 6.9),
    'CycleMLP_B4': (51_796_552, 10.1),
    'CycleMLP_B5': (75_747_280, 12.3),
}


@pytest.mark.parametrize('name', OFFICIAL)
def test_parameter_count_and_flops_of_each_variant(name):
    params, gflops = OFFICIAL[name]
    with paddle.LazyGuard():          # shapes only: no parameter is initialised
        model = zoo.create_model(name)
    assert zoo.count_parameters(model) == params
    # ... which parameter_count, the bound a weights file is checked against, computes unbuilt.
    assert zoo.parameter_count(**ARCHITECTURES[name], num_classes=1000) == params
    assert round(zoo.count_flops(model) / 1e9, 1) == gflops
    assert zoo.variant_name(model.config) == name


def test_variant_name_from_architecture():
    assert zoo.variant_name(dict(layers=[3, 4, 18, 3], embed_dims=[64, 128, 320, 512],
                                 mlp_ratios=[8, 8, 4, 4], num_classes=7)) == 'CycleMLP_B3'
    assert zoo.variant_name(dict(TINY_CONFIG)) is None


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'CycleMLP_B9'"):
        zoo.create_model('CycleMLP_B9')
    with pytest.raises(ValueError, match='needs a model name'):
        zoo.create_model()


@pytest.fixture
def tiny_file(tmp_path):
    paddle.seed(3)
    model = CycleNet(**TINY_CONFIG, num_classes=6)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    path = str(tmp_path / 'tiny.pdparams')
    write_weights(path, state, {'class_names': list('abcdef')})
    return model, state, path


def test_load_model_reads_the_architecture_and_classes_off_the_file(tiny_file):
    model, _, path = tiny_file
    loaded, meta = zoo.load_model(path)
    assert loaded.config == model.config and meta == {'class_names': list('abcdef')}
    model.eval(), loaded.eval()
    images = paddle.randn([2, 3, 64, 64])
    np.testing.assert_array_equal(loaded(images).numpy(), model(images).numpy())


def test_official_checkpoint_loads_by_its_shapes():
    official = np.load(FIXTURES / 'official_tiny_io.npz')
    for ema, key in ((False, 'logits'), (True, 'logits_ema')):
        model = zoo.create_model(weights=str(FIXTURES / 'official_tiny.pth'), ema=ema)
        model.eval()
        with paddle.no_grad():
            logits = model(paddle.to_tensor(official['input'].astype(np.float32))).numpy()
        np.testing.assert_allclose(logits, official[key], atol=1e-4, rtol=0)


def test_a_file_naming_a_big_variant_is_refused_before_the_model_is_built(tiny_file, tmp_path, monkeypatch):
    """A small file whose metadata says CycleMLP_B5 must not cost a B5 (300 MB of parameters):
    only a model without memory (paddle.LazyGuard) is built to check it against."""
    _, state, _ = tiny_file
    path = str(tmp_path / 'liar.safetensors')
    write_weights(path, state, {'model_name': 'CycleMLP_B5'})
    allocated = []

    def recording(*args, **kwargs):
        model = CycleNet(*args, **kwargs)
        allocated.append(model.head.weight._is_initialized())
        return model

    monkeypatch.setattr(zoo, 'CycleNet', recording)
    with pytest.raises(WeightsError, match='liar.safetensors does not fit CycleNet'):
        zoo.load_model(path)
    assert allocated == [False]
    write_weights(path, state, {'model_name': 'CycleMLP_B9'})
    with pytest.raises(WeightsError, match="records model_name 'CycleMLP_B9'"):
        zoo.load_model(path)


def test_class_count_mismatch_needs_drop_head(tiny_file):
    model, state, path = tiny_file
    with pytest.raises(WeightsError, match='6-class head'):
        zoo.create_model(weights=path, num_classes=3)
    tuned = zoo.create_model(weights=path, num_classes=3, drop_head=True)
    assert tuned.head.weight.shape == [32, 3]
    np.testing.assert_array_equal(tuned.norm.weight.numpy(), state['norm.weight'])


def test_arguments_are_checked_before_the_file_is_read(tmp_path):
    with pytest.raises(ValueError, match='num_classes must be an integer'):
        zoo.create_model('CycleMLP_B1', num_classes='10')
    with pytest.raises(ValueError, match='unknown model'):
        zoo.load_model(os.devnull, 'B1')


def _changed(key, change):
    return lambda state: {**state, key: change(state[key].copy())}


def _first(value):
    def change(array):
        array.flat[0] = value
        return array
    return change


NOT_FITTING = {  # a tiny model's state, changed -> what the one error says
    'blocks not numbered 0..n-1': (lambda state: {**state, 'network.0.9999999.norm1.weight': np.ones(8, np.float32)},
                                   'the blocks of network.0 are not numbered 0..n-1'),
    'a scalar norm': (_changed('network.2.0.norm1.weight', lambda value: np.array(1.0, np.float32)),
                      'network.2.0.norm1.weight has shape [], expected a non-empty vector'),
    'an empty head': (_changed('head.bias', lambda value: np.zeros(0, np.float32)),
                      'head.bias has shape [0], expected a non-empty vector'),
    'more parameters than the file': (_changed('network.0.0.mlp.fc1.bias', lambda value: np.zeros(512, np.float32)),
                                      'more parameters than the file holds'),
    'no CycleNet': (_changed('network.2.0.norm1.weight', lambda value: np.ones(2, np.float32)),
                    'embed_dims must be four integers in [4, 8192]'),
    'changed offsets': (_changed('network.4.1.attn.sfc_w.offset', lambda value: -value),
                        'network.4.1.attn.sfc_w.offset: offsets differ from the CycleFC pattern'),
    'NaN': (_changed('head.bias', _first(np.nan)), 'head.bias: holds NaN or infinite values'),
    'inf': (_changed('network.2.0.attn.proj.weight', _first(np.inf)),
            'network.2.0.attn.proj.weight: holds NaN or infinite values'),
    'a missing tensor': (lambda state: {key: value for key, value in state.items() if key != 'norm.bias'},
                         "missing keys (1): 'norm.bias'"),
    'another variant': ('CycleMLP_B1', 'does not fit CycleNet [2, 2, 4, 2] [64, 128, 320, 512]: missing keys'),
    'another class count': (3, '6-class head but the model has 3 classes'),
}


@pytest.mark.parametrize('kind', NOT_FITTING)
def test_a_file_that_does_not_fit_is_refused_before_a_model_is_built(tiny_file, tmp_path, kind):
    """A file's structure (keys, shapes, offsets, finite values, the architecture its shapes
    describe) is checked before a model is built from it; every mismatch is one error naming it."""
    _, state, path = tiny_file
    change, message = NOT_FITTING[kind]
    arguments = {}
    if callable(change):
        path = tmp_path / 'odd.pdparams'
        write_weights(path, change(state))
    else:
        arguments = {'name': change, 'num_classes': 6} if isinstance(change, str) else {'num_classes': change}
    with pytest.raises(WeightsError, match=re.escape(f'{path}') + '.*' + re.escape(message)):
        zoo.load_model(str(path), **arguments)
