"""The feature backbone for dense prediction (CycleNet(fork_feat=True), zoo.create_backbone):
the official feature model's outputs from checkpoints the official code wrote (mmseg/mmdet
layout), its state-dict names, ImageNet weights as the start of dense training, any input size."""
import re
from pathlib import Path

import numpy as np
import paddle
import pytest

import fast_layers
import zoo
from conftest import TINY_CONFIG
from cyclemlp import CycleNet
from torch_files import write_release
from weights import WeightsError, read_weights, write_weights

FIXTURES = Path(__file__).resolve().parent / 'fixtures'


@pytest.mark.parametrize('fast', [True, False], ids=['fast-layers-on', 'fast-layers-off'])
@pytest.mark.parametrize('last3', [False, True], ids=['fork_feat', 'FORK_LAST3'])
def test_official_feature_maps_from_checkpoints_the_official_code_wrote(monkeypatch, fast, last3):
    """tests/fixtures/official_dense_tiny*.pth were written by torch.save from the official
    CycleNet(fork_feat=True) (tests/fixtures/make_official_dense_fixture.py), wrapped as mmseg
    and mmdet save them; the maps equal the official ones."""
    monkeypatch.setattr(fast_layers, 'ENABLED', fast)
    official = np.load(FIXTURES / 'official_dense_tiny_io.npz')
    model = CycleNet(**TINY_CONFIG, fork_feat=True, fork_last3=last3)
    loaded = zoo.load_backbone(model, str(FIXTURES / f'official_dense_tiny{"_last3" if last3 else ""}.pth'))
    assert loaded.endswith(": its backbone (left out: 'decode_head', 'neck')")
    model.eval()
    with paddle.no_grad():
        maps = model(paddle.to_tensor(official['input'].astype(np.float32)))
    assert len(maps) == 4
    for index, got in enumerate(maps):
        want = official[f'{"last3_" if last3 else ""}out{index}']
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-4 * max(1.0, np.abs(want).max()))


def test_state_dict_names_are_the_official_feature_models():
    with paddle.LazyGuard():
        names = set(CycleNet(**TINY_CONFIG, fork_feat=True).state_dict())
        last3 = set(CycleNet(**TINY_CONFIG, fork_feat=True, fork_last3=True).state_dict())
        classifier = set(CycleNet(**TINY_CONFIG).state_dict())
    output_norms = {f'norm{index}.{part}' for index in (0, 2, 4, 6) for part in ('weight', 'bias')}
    assert names == (classifier - {'norm.weight', 'norm.bias', 'head.weight', 'head.bias'}) | output_norms
    assert last3 == names - {'norm0.weight', 'norm0.bias'}


@pytest.mark.parametrize('size', [(512, 512), (97, 160)], ids=str)
def test_maps_for_any_input_size(size):
    model, _ = zoo.create_backbone('CycleMLP_B1')
    model.eval()
    with paddle.no_grad():
        maps = model(paddle.randn([1, 3, *size]))
    height, width = size
    for stage, (feature, channels) in enumerate(zip(maps, [64, 128, 320, 512])):
        height = (height - 3) // 4 + 1 if stage == 0 else (height - 1) // 2 + 1
        width = (width - 3) // 4 + 1 if stage == 0 else (width - 1) // 2 + 1
        assert feature.shape == [1, channels, height, width]
        assert abs(float(feature.mean(axis=1).mean())) < 1e-4        # each map has been normed


def test_imagenet_weights_start_dense_training(tmp_path):
    """The usual start: the classifier's weights (norm and head) dropped, the four output norms
    fresh, every other tensor the ImageNet model's, and the report says so."""
    paddle.seed(0)
    classifier = zoo.create_model('CycleMLP_B2')
    path = str(tmp_path / 'imagenet.pdparams')
    write_weights(path, zoo.numpy_state(classifier))
    model, loaded = zoo.create_backbone('CycleMLP_B2', path, drop_path_rate=0.1)
    assert loaded == (f'{path}: dropped head.bias, head.weight, norm.bias, norm.weight (the classifier); '
                      'norm0, norm2, norm4, norm6 start fresh')
    imagenet = classifier.state_dict()
    for key, value in model.state_dict().items():
        if key.startswith('norm'):
            assert float(value.abs().sum()) == (0 if key.endswith('bias') else value.shape[0]), key
        else:
            np.testing.assert_array_equal(value.numpy(), imagenet[key].numpy(), err_msg=key)
    with pytest.raises(WeightsError, match='does not fit CycleNet'):
        zoo.create_backbone('CycleMLP_B1', path)


def test_backbone_arguments_are_checked():
    with pytest.raises(ValueError, match='unknown model'):
        zoo.create_backbone('CycleMLP_B7')
    with pytest.raises(ValueError, match='fork_last3 applies to the feature backbone'):
        CycleNet(**TINY_CONFIG, fork_last3=True)
    with pytest.raises(ValueError, match='fork_feat must be True or False'):
        CycleNet(**TINY_CONFIG, fork_feat='yes')


def mmcv_meta() -> bytes:
    """A 'meta' as mmcv's save_best writes it (numpy scalars, a set), pickled as torch.save does
    (protocol 2), without its PROTO and STOP opcodes."""
    import pickle
    meta = {'epoch': 12, 'best_score': np.float64(0.451), 'best_iter': np.int64(40000),
            'classes': {'wall', 'floor'}, 'env_info': 'sys.platform: linux'}
    return pickle.dumps(meta, protocol=2)[2:-1]


def official_dense(variant: str, drop=(), meta=b''):
    """The official dense fixture's state dict (mmseg layout), some keys dropped, rewritten."""
    state, _, _ = read_weights(FIXTURES / f'official_dense_tiny{variant}.pth')
    return {key: value for key, value in state.items() if not key.startswith(drop)}, meta


@pytest.mark.parametrize('variant, last3, drop, meta, outcome', [
    ('', False, (), b'', 'loads'),
    ('', False, (), 'mmcv', 'loads'),                      # meta of plain values is read, then unused
    ('_last3', True, (), 'mmcv', 'loads'),
    ('_last3', False, (), b'', "missing keys (2): 'norm0.bias', 'norm0.weight'"),   # RetinaNet's file
    ('', True, (), b'', "unexpected keys (2): 'norm0.bias', 'norm0.weight'"),
    ('', False, ('backbone.norm6.',), b'', "missing keys (2): 'norm6.bias', 'norm6.weight'"),
], ids=['dense', 'mmcv meta', 'last3 with meta', 'other variant', 'other variant, last3', 'norms missing'])
def test_a_dense_checkpoint_must_hold_its_variants_output_norms(tmp_path, variant, last3, drop, meta, outcome):
    """What a file must contain is decided by its kind: a dense checkpoint is the backbone
    trained, output norms included; only ImageNet weights start them fresh."""
    state, _ = official_dense(variant, drop)
    path = tmp_path / 'dense.pth'
    write_release(path, state, key='state_dict', meta=mmcv_meta() if meta == 'mmcv' else meta)
    model = CycleNet(**TINY_CONFIG, fork_feat=True, fork_last3=last3)
    if outcome == 'loads':
        assert zoo.load_backbone(model, str(path)).endswith("its backbone (left out: 'decode_head', 'neck')")
    else:
        with pytest.raises(WeightsError, match=re.escape(outcome)):
            zoo.load_backbone(model, str(path))
