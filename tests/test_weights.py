"""Tests for weights.py and convert_weights.py. They do not need torch.

The torch fixtures in tests/fixtures/ were written by real torch.save from the official CycleMLP
code (see tests/fixtures/make_official_fixture.py); Paddle files are written here by real
paddle.save; hostile files are built here at run time and never committed.
"""
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import paddle
import pytest

import convert_weights
import safe_io
import torch_files
import weights
from conftest import TINY_CONFIG
from torch_files import pickle_global, pickle_str, tensor_pickle
from weights import WeightsError, read_checkpoint, read_weights, torch_to_paddle, write_weights

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / 'fixtures'
OFFICIAL = FIXTURES / 'official_tiny.pth'
OFFICIAL_LEGACY_ROOT = FIXTURES / 'official_tiny_legacy_root.pth'
OFFICIAL_IO = FIXTURES / 'official_tiny_io.npz'
TINY = dict(TINY_CONFIG, num_classes=10)    # the official fixture's model


def expected_official_shapes() -> dict:
    """The state-dict layout of the official cycle_mlp.py, written out for the tiny model."""
    shapes = {'patch_embed.proj.weight': (8, 3, 7, 7), 'patch_embed.proj.bias': (8,)}
    dims, ratio = TINY['embed_dims'], 2
    for stage, (depth, dim) in enumerate(zip(TINY['layers'], dims)):
        for block in range(depth):
            prefix = f'network.{2 * stage}.{block}.'
            for name, shape in [
                    ('norm1.weight', (dim,)), ('norm1.bias', (dim,)),
                    ('attn.mlp_c.weight', (dim, dim)),
                    ('attn.sfc_h.weight', (dim, dim, 1, 1)), ('attn.sfc_h.bias', (dim,)),
                    ('attn.sfc_h.offset', (1, 2 * dim, 1, 1)),
                    ('attn.sfc_w.weight', (dim, dim, 1, 1)), ('attn.sfc_w.bias', (dim,)),
                    ('attn.sfc_w.offset', (1, 2 * dim, 1, 1)),
                    ('attn.reweight.fc1.weight', (dim // 4, dim)),
                    ('attn.reweight.fc1.bias', (dim // 4,)),
                    ('attn.reweight.fc2.weight', (3 * dim, dim // 4)),
                    ('attn.reweight.fc2.bias', (3 * dim,)),
                    ('attn.proj.weight', (dim, dim)), ('attn.proj.bias', (dim,)),
                    ('norm2.weight', (dim,)), ('norm2.bias', (dim,)),
                    ('mlp.fc1.weight', (ratio * dim, dim)), ('mlp.fc1.bias', (ratio * dim,)),
                    ('mlp.fc2.weight', (dim, ratio * dim)), ('mlp.fc2.bias', (dim,))]:
                shapes[prefix + name] = shape
        if stage < 3:
            shapes[f'network.{2 * stage + 1}.proj.weight'] = (dims[stage + 1], dim, 3, 3)
            shapes[f'network.{2 * stage + 1}.proj.bias'] = (dims[stage + 1],)
    shapes.update({'norm.weight': (32,), 'norm.bias': (32,),
                   'head.weight': (10, 32), 'head.bias': (10,)})
    return shapes


def cycle_offsets(channels: int, axis: int) -> np.ndarray:
    """(dy, dx) pairs per channel with shift(c) = (c + 1) % 3 - 1 on the given axis (0: dy, 1: dx)."""
    pairs = np.zeros((channels, 2), np.float32)
    pairs[:, axis] = (np.arange(channels) + 1) % 3 - 1
    return pairs.reshape(1, 2 * channels, 1, 1)


# --- reading the official PyTorch files --------------------------------------------------------

def test_official_checkpoint_has_the_reference_layout():
    state, meta, layout = read_weights(OFFICIAL)
    assert layout == 'torch' and meta == {}
    assert {key: value.shape for key, value in state.items()} == expected_official_shapes()
    assert all(value.dtype == np.float32 for value in state.values())
    for key, value in state.items():
        if key.endswith('sfc_h.offset'):  # kernel (1, 3): shifts along W
            np.testing.assert_array_equal(value, cycle_offsets(value.shape[1] // 2, axis=1))
        elif key.endswith('sfc_w.offset'):  # kernel (3, 1): shifts along H
            np.testing.assert_array_equal(value, cycle_offsets(value.shape[1] // 2, axis=0))


def test_official_checkpoint_reads_the_same_under_either_zip_root():
    assert zipfile.ZipFile(OFFICIAL).namelist()[0] == 'archive/data.pkl'
    assert zipfile.ZipFile(OFFICIAL_LEGACY_ROOT).namelist()[0] == 'official_tiny_legacy_root/data.pkl'
    state, _, _ = read_weights(OFFICIAL)
    legacy_state, _, legacy_layout = read_weights(OFFICIAL_LEGACY_ROOT)
    assert legacy_layout == 'torch' and list(legacy_state) == list(state)
    for key in state:
        np.testing.assert_array_equal(legacy_state[key], state[key])
    with pytest.raises(WeightsError, match="official_tiny_legacy_root.pth: no 'model_ema'"):
        read_weights(OFFICIAL_LEGACY_ROOT, ema=True)


def test_ema_picks_the_other_weights():
    state, _, _ = read_weights(OFFICIAL)
    ema_state, _, _ = read_weights(OFFICIAL, ema=True)
    assert list(ema_state) == list(state)
    differing = {key for key in state if not np.array_equal(state[key], ema_state[key])}
    assert differing == {key for key in state if not key.endswith('.offset')}


def test_torch_storage_dtypes_and_strided_views():
    state, _, _ = read_weights(FIXTURES / 'torch_dtypes.pth')
    expected = np.load(FIXTURES / 'torch_dtypes.npz')
    assert set(state) == set(expected.files)
    for key in expected.files:
        want = expected[key]
        if key == 'bfloat16':
            assert state[key].dtype == np.float32  # widened; exact since bf16 is a truncated f32
            want = want.astype(np.float32)
        assert state[key].dtype == want.dtype, key
        np.testing.assert_array_equal(state[key], want, err_msg=key)
    np.testing.assert_array_equal(state['transposed'], state['float32'].T)
    np.testing.assert_array_equal(state['offset_view'], state['float32'][1:, 1::2])


# --- hand-built torch archives: big-endian data, lying geometry, hostile globals ------------------

def torch_tensor_pickle(offset: int, size, stride, numel: int) -> bytes:
    """Protocol-2 opcodes as torch.save writes them for {'w': tensor} on one FloatStorage."""
    return b'\x80\x02}(' + pickle_str('w') + tensor_pickle('0', offset, size, stride, numel) + b'u.'


def write_torch_zip(path: Path, data_pkl: bytes, storage: bytes = b'', byteorder: bytes = b'little'):
    torch_files.write_torch_zip(path, data_pkl, {'0': storage}, byteorder)


def test_big_endian_archive(tmp_path):
    values = np.arange(6, dtype=np.float32) - 2.5
    path = tmp_path / 'big.pth'
    write_torch_zip(path, torch_tensor_pickle(1, (2, 2), (1, 2), 6), values.astype('>f4').tobytes(),
                    byteorder=b'big')
    state, _, _ = read_weights(path)
    np.testing.assert_array_equal(state['w'], values[1:].reshape(-1)[[0, 2, 1, 3]].reshape(2, 2))
    assert state['w'].dtype == np.float32 and state['w'].dtype.isnative


class _RunsCommand:
    """Pickles as a call of `function(*args)`: what a hostile weight file would contain."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def hostile_payloads(marker: Path) -> dict:
    import subprocess as subprocess_module  # the global the payload names, not one we call
    touch = f'touch {marker}'
    return {
        'os.system': _RunsCommand(os.system, touch),
        'builtins.eval': _RunsCommand(eval, f'open({str(marker)!r}, "w")'),
        'subprocess.Popen': _RunsCommand(subprocess_module.Popen, ['touch', str(marker)]),
        'builtins.exec': _RunsCommand(exec, f'open({str(marker)!r}, "w")'),
    }


@pytest.mark.parametrize('payload', ['os.system', 'builtins.eval', 'subprocess.Popen', 'builtins.exec'])
@pytest.mark.parametrize('protocol', [2, 4])
def test_hostile_pickles_are_refused_before_running(tmp_path, payload, protocol):
    marker = tmp_path / 'marker'
    hostile = hostile_payloads(marker)[payload]
    # In a paddle pickle, alone and hidden beside real weights in a checkpoint; in a torch zip.
    pdparams = tmp_path / 'hostile.pdparams'
    pdparams.write_bytes(pickle.dumps(hostile, protocol=protocol))
    pdckpt = tmp_path / 'hostile.pdckpt'
    pdckpt.write_bytes(pickle.dumps({'model': {'w': np.ones(2, np.float32)}, 'optimizer': hostile},
                                    protocol=protocol))
    torch_zip = tmp_path / 'hostile.pth'
    write_torch_zip(torch_zip, pickle.dumps({'model': hostile}, protocol=protocol))
    for path in (pdparams, pdckpt, torch_zip):
        with pytest.raises(WeightsError) as error:
            read_weights(path)
        message = str(error.value)
        assert message.startswith(str(path)) and 'refusing to load global' in message
        # Protocol 2 spells builtins and subprocess by their Python 2 names, __builtin__ and commands.
        assert re.search(r"'(posix|os|nt|builtins|__builtin__|subprocess|commands)\."
                         r"(system|eval|exec|Popen)'", message)
    with pytest.raises(WeightsError, match='refusing to load global'):
        read_checkpoint(pdckpt)
    assert not marker.exists()


# --- Paddle files ------------------------------------------------------------------------------

def test_real_paddle_save_state_dict(tmp_path):
    """A PaddleClas-style .pdparams: paddle.save(layer.state_dict()) of paddle tensors."""
    paddle.seed(0)
    layer = paddle.nn.Sequential(paddle.nn.Linear(4, 3), paddle.nn.LayerNorm(3),
                                 paddle.nn.Conv2D(3, 2, 3))
    path = tmp_path / 'paddleclas.pdparams'
    paddle.save(layer.state_dict(), str(path))
    state, meta, layout = read_weights(path)
    assert layout == 'paddle' and meta == {}
    expected = {key: value.numpy() for key, value in layer.state_dict().items()}
    assert set(state) == set(expected)  # paddle's StructuredToParameterName@@ table is dropped
    for key in expected:
        np.testing.assert_array_equal(state[key], expected[key])
        assert state[key].dtype == expected[key].dtype


@pytest.mark.parametrize('protocol', [2, 4])
def test_real_paddle_save_checkpoint_with_nested_tensors(tmp_path, protocol):
    """paddle.save of {'model': tensors, 'optimizer': ...}: tensors nested in containers pickle as
    (name, ndarray) tuples, and protocol 2 spells bytes with _codecs.encode."""
    paddle.seed(0)
    layer = paddle.nn.Linear(3, 2)
    optimizer = paddle.optimizer.AdamW(parameters=layer.parameters())
    layer(paddle.ones([1, 3])).sum().backward()
    optimizer.step()
    path = tmp_path / 'checkpoint.pdckpt'
    paddle.save({'model': layer.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': 3,
                 'best': np.float32(0.5), 'model_name': 'tiny'}, str(path), protocol=protocol)
    state, meta, _ = read_weights(path)
    assert meta == {'model_name': 'tiny'}
    np.testing.assert_array_equal(state['weight'], layer.weight.numpy())
    np.testing.assert_array_equal(state['bias'], layer.bias.numpy())
    checkpoint = read_checkpoint(path)
    assert checkpoint['epoch'] == 3 and checkpoint['best'] == np.float32(0.5)


def test_numpy_1_module_names_are_understood(tmp_path):
    """Paddle 2.6 with numpy 1.x names numpy.core.multiarray where numpy 2 names numpy._core."""
    arrays = {'w': np.arange(6, dtype=np.float32).reshape(2, 3), 'n': np.int64(7)}
    # numpy 2 writes numpy._core names; rename them as numpy 1 writes them (a no-op under numpy 1).
    data = pickle.dumps(arrays, protocol=2).replace(b'numpy._core.multiarray', b'numpy.core.multiarray')
    assert b'numpy.core.multiarray' in data and b'numpy._core' not in data
    path = tmp_path / 'numpy1.pdparams'
    path.write_bytes(data)
    checkpoint = read_checkpoint(path)
    np.testing.assert_array_equal(checkpoint['w'], arrays['w'])
    assert checkpoint['n'] == 7 and checkpoint['n'].dtype == np.int64


META = {'model_name': 'CycleMLP_B1', 'class_names': ['cat', 'dog'],
        'data_config': {'input_size': 256, 'crop_pct': 1.0, 'interpolation': 'bilinear'}}


@pytest.mark.parametrize('suffix', ['.pdparams', '.safetensors'])
def test_write_read_round_trip(tmp_path, suffix):
    state = {'a.weight': np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32),
             'a.offset': np.zeros((1, 6, 1, 1), np.float32), 'steps': np.arange(3)}
    path = tmp_path / f'weights{suffix}'
    write_weights(path, state, META)
    read_state, meta, layout = read_weights(path)
    assert layout == 'paddle' and meta == META and set(read_state) == set(state)
    for key in state:
        np.testing.assert_array_equal(read_state[key], state[key])
        assert read_state[key].dtype == state[key].dtype
    assert os.listdir(tmp_path) == [path.name]


def test_our_pdparams_is_readable_by_paddle_load(tmp_path):
    state = {'head.weight': np.arange(6, dtype=np.float32).reshape(3, 2)}
    path = tmp_path / 'ours.pdparams'
    write_weights(path, state, META)
    loaded = paddle.load(str(path))
    np.testing.assert_array_equal(np.asarray(loaded['model']['head.weight']), state['head.weight'])
    assert loaded['class_names'] == META['class_names']


def test_foreign_safetensors_layout(tmp_path):
    import safetensors.numpy
    state = {'w': np.ones((2, 3), np.float32)}
    safetensors.numpy.save_file(state, str(tmp_path / 'pt.safetensors'), metadata={'format': 'pt'})
    safetensors.numpy.save_file(state, str(tmp_path / 'plain.safetensors'))
    assert read_weights(tmp_path / 'pt.safetensors')[2] == 'torch'
    assert read_weights(tmp_path / 'plain.safetensors')[1:] == ({}, 'paddle')


def test_container_selection_and_ddp_prefix(tmp_path):
    weight = np.ones(2, np.float32)
    path = tmp_path / 'ddp.pdckpt'
    path.write_bytes(pickle.dumps({'state_dict': {'module.w': weight}, 'epoch': 1}))
    assert list(read_weights(path)[0]) == ['w']
    path.write_bytes(pickle.dumps({'model': {'w': weight, 'count': 3}}))
    with pytest.raises(WeightsError, match="ddp.pdckpt: state dict entry 'count' is 3, expected an array"):
        read_weights(path)


def test_torch_to_paddle_transposes_2d_weights_only():
    state, _, _ = read_weights(OFFICIAL)
    converted = torch_to_paddle(state)
    assert list(converted) == list(state)
    transposed = set()
    for key, value in state.items():
        if not np.array_equal(converted[key], value) or converted[key].shape != value.shape:
            np.testing.assert_array_equal(converted[key], value.T)
            transposed.add(key)
    assert transposed == {key for key, value in state.items() if value.ndim == 2}
    assert all(key.endswith(('mlp_c.weight', 'proj.weight', 'fc1.weight', 'fc2.weight', 'head.weight'))
               for key in transposed)
    assert converted['head.weight'].shape == (32, 10)
    assert converted['patch_embed.proj.weight'].shape == (8, 3, 7, 7)


# --- files that try to change the process, or to take memory or time out of proportion ---------

def _pickle_namespace_class_build(attribute: str, value: str) -> bytes:
    """The argparse.Namespace *class* (not an instance) with BUILD (None, {attribute: value}):
    unchecked, this sets a class attribute that every later Namespace would show."""
    return (pickle_global('argparse', 'Namespace') + b'N}' + pickle_str(attribute)
            + pickle_str(value) + b's\x86b')


def test_a_file_cannot_modify_a_class_or_a_shared_stand_in(tmp_path):
    import argparse
    weight = torch_tensor_pickle(0, (2,), (1,), 2)[len(b'\x80\x02}('):-2]   # "'w': tensor"
    for name, target in (('namespace', _pickle_namespace_class_build('resume', 'evil.pth')),
                         ('storage', pickle_global('torch', 'FloatStorage') + b'N}'
                          + pickle_str('descr') + pickle_str('O') + b's\x86b')):
        path = tmp_path / f'{name}.pth'
        write_torch_zip(path, b'\x80\x02}(' + weight + pickle_str('args') + target + b'u.',
                        np.zeros(2, np.float32).tobytes())
        with pytest.raises(WeightsError, match='refusing to set the state of|float32 with a state other than'):
            read_weights(path)
    assert not hasattr(argparse.Namespace, 'resume')
    assert weights._TORCH_DTYPES['float32'] == np.float32
    np.testing.assert_array_equal(read_weights(OFFICIAL)[0]['norm.weight'].dtype, np.float32)


def test_numpy_dtypes_and_arrays_are_rebuilt_from_checked_values(tmp_path):
    path = tmp_path / 'arrays.pdparams'
    big_endian = np.arange(6, dtype='>f4').reshape(2, 3)
    path.write_bytes(pickle.dumps({'model': {'w': big_endian}}, protocol=2))
    loaded = read_weights(path)[0]['w']
    np.testing.assert_array_equal(loaded, big_endian)
    assert loaded.dtype == np.float32 and loaded.dtype.isnative        # the values, not swapped bytes
    plain = pickle.dumps({'model': {'w': np.ones(3, np.float32)}}, protocol=2)
    flags = b'J\xff\xff\xff\xffK\x00t'       # the end of the dtype state: ..., alignment -1, flags 0
    data = b'X\x0f\x00\x00\x00' + b'\x00\x00\xc2\x80?' * 3   # the bytes of 3 x 1.0f, latin-1 in UTF-8
    assert plain.count(flags) == 1 and plain.count(data) == 1
    path.write_bytes(plain.replace(flags, flags[:-3] + b'K\x10t'))    # flags 16, an object dtype's
    with pytest.raises(WeightsError, match='dtype float32 with a state other than a plain numeric type'):
        read_weights(path)
    path.write_bytes(plain.replace(data, b'X\x0a\x00\x00\x00' + b'\x00\x00\xc2\x80?' * 2))
    with pytest.raises(WeightsError, match=r'an array of shape \(3,\) and dtype float32 needs 12 bytes, the file holds 8'):
        read_weights(path)


def _compressed_storage(path):
    with zipfile.ZipFile(path, 'w') as archive:    # 1000:1, as torch.save never writes a storage
        archive.writestr('archive/data.pkl', torch_tensor_pickle(0, (1 << 21,), (1,), 1 << 21))
        archive.writestr('archive/data/0', bytes(8 << 20), compress_type=zipfile.ZIP_DEFLATED)


@pytest.mark.parametrize('write, message', [
    (lambda path: write_torch_zip(path, torch_tensor_pickle(2, (2, 2), (2, 1), 4), bytes(16)),
     'reaches element 5 of a storage holding 4'),
    (lambda path: write_torch_zip(path, torch_tensor_pickle(0, (1000, 1000000), (0, 0), 1), bytes(4)),
     'a tensor of 1000000000 elements from a storage of 1'),
    (_compressed_storage, "storage '0' is compressed; torch.save stores storages uncompressed"),
    (lambda path: write_torch_zip(path, torch_tensor_pickle(0, (4,), (1,), 1 << 30), bytes(16)),
     "storage '0' holds 16 bytes, expected 1073741824 x float32"),
    (lambda path: path.write_bytes(pickle.dumps({'w': np.array([1, 'a'], dtype=object)}, protocol=4)),
     "numpy dtype 'O"),
], ids=['tensor past its storage', 'stride 0', 'compressed storage', 'short storage', 'object array'])
def test_declared_sizes_and_types_are_bounded_by_what_the_file_holds(tmp_path, write, message):
    """What a file declares (a tensor's geometry, a storage's size, an array's dtype) is checked
    against what it holds before anything is allocated."""
    path = tmp_path / 'declared.pth'
    write(path)
    with pytest.raises(WeightsError, match=re.escape(f'{path}: ') + '.*' + re.escape(message)):
        read_weights(path)


def test_huge_or_deep_structures_end_in_one_short_error(tmp_path):
    path = tmp_path / 'shared.pdparams'
    doubling = []
    for _ in range(64):                  # 2**64 leaves when walked, 64 lists in the file
        doubling = [doubling, doubling]
    path.write_bytes(pickle.dumps({'model': {'w': doubling}}, protocol=2))
    with pytest.raises(WeightsError) as error:
        read_weights(path)
    assert str(error.value) == f"{path}: state dict entry 'w' is a list, expected an array"
    path.write_bytes(b'\x80\x02' + b']' * 100_000 + b'a' * 99_999 + b'.')   # lists 100,000 deep
    with pytest.raises(WeightsError, match=f'{re.escape(str(path))}: expected a dict, found a list$'):
        read_weights(path)
    path.write_bytes(pickle.dumps({'model': {'k' * 10**6: 1}}, protocol=2))
    with pytest.raises(WeightsError) as error:
        read_weights(path)
    assert len(str(error.value)) < len(str(path)) + 120


def test_write_refuses_unknown_suffix(tmp_path):
    with pytest.raises(WeightsError, match=r'weights.pth: cannot write .pth'):
        write_weights(tmp_path / 'weights.pth', {'w': np.ones(1)})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('suffix, writer',
                         [('.pdparams', 'paddle'), ('.safetensors', 'safetensors.numpy')])
def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch, suffix, writer):
    path = tmp_path / f'weights{suffix}'
    old_state = {'w': np.ones(3, np.float32)}
    write_weights(path, old_state, {'model_name': 'old'})
    old_bytes = path.read_bytes()

    def write_half_then_fail(obj, target, *args, **kwargs):
        Path(target).write_bytes(b'partial')
        raise KeyboardInterrupt  # as if the job were killed mid-write

    module = paddle if writer == 'paddle' else weights.safetensors.numpy
    monkeypatch.setattr(module, 'save' if writer == 'paddle' else 'save_file', write_half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        write_weights(path, {'w': np.zeros(3, np.float32)}, {'model_name': 'new'})
    assert path.read_bytes() == old_bytes
    assert os.listdir(tmp_path) == [path.name]


def test_atomic_save_and_read_checkpoint(tmp_path):
    checkpoint = {'model': {'w': np.ones(2, np.float32)}, 'epoch': 4, 'lr': [0.1, 0.2],
                  'rng': {'numpy': np.random.default_rng(0).bit_generator.state['state']['state']}}
    path = tmp_path / 'checkpoint.pdckpt'
    weights.atomic_save(checkpoint, path)
    loaded = read_checkpoint(path)
    assert loaded['epoch'] == 4 and loaded['lr'] == [0.1, 0.2] and loaded['rng'] == checkpoint['rng']
    np.testing.assert_array_equal(loaded['model']['w'], checkpoint['model']['w'])
    with pytest.raises(WeightsError, match='official_tiny.pth: expected a paddle.save pickle'):
        read_checkpoint(OFFICIAL)


# --- convert_weights.py ------------------------------------------------------------------------

def convert(capsys, *args):
    """convert_weights.main in-process; (stdout, stderr) or the WeightsError it raised."""
    try:
        convert_weights.main(convert_weights.get_args_parser().parse_args([str(arg) for arg in args]))
    except WeightsError as error:
        return error
    return capsys.readouterr()


def test_convert_official_checkpoint(tmp_path, capsys):
    state, _, _ = read_weights(OFFICIAL)
    expected = torch_to_paddle(state)
    parameters = sum(v.size for k, v in state.items() if not k.endswith('.offset'))
    outputs = {}
    for suffix in ('.pdparams', '.safetensors'):
        destination = tmp_path / f'tiny{suffix}'
        assert convert(capsys, OFFICIAL, destination).out == (
            f'converted a custom CycleNet: 117 tensors ({parameters:,} parameters) '
            f'from {OFFICIAL} to {destination}\n')
        outputs[suffix], meta, layout = read_weights(destination)
        assert layout == 'paddle' and meta == {}
    for key in expected:
        np.testing.assert_array_equal(outputs['.pdparams'][key], expected[key])
        np.testing.assert_array_equal(outputs['.safetensors'][key], expected[key])


def test_convert_names_the_variant_and_refuses_what_does_not_fit(tmp_path, capsys):
    import cyclemlp
    state = {k: v.numpy() for k, v in cyclemlp.CycleNet(**cyclemlp.ARCHITECTURES['CycleMLP_B1'], num_classes=4).state_dict().items()}
    source = tmp_path / 'paddleclas_b1.pdparams'
    paddle.save(state, str(source))                 # PaddleClas layout: a bare Paddle state dict
    result = convert(capsys, source, tmp_path / 'b1.pdparams')
    assert result.out.startswith('converted CycleMLP_B1: 222 tensors (14,644,452 parameters)')  # 15,155,400 - 996 * 513
    assert read_weights(tmp_path / 'b1.pdparams')[1]['model_name'] == 'CycleMLP_B1'
    error = convert(capsys, source, tmp_path / 'b2.pdparams', '--model', 'CycleMLP_B2')
    assert 'missing keys' in str(error) and str(source) in str(error) and '\n' not in str(error)
    assert not (tmp_path / 'b2.pdparams').exists()


def test_convert_ema_keeps_meta_and_paddle_layout(tmp_path, capsys):
    model_state = torch_to_paddle(read_weights(OFFICIAL)[0])
    ema_state = torch_to_paddle(read_weights(OFFICIAL, ema=True)[0])
    meta = {'class_names': list('abcdefghij')}
    source = tmp_path / 'ours.pdckpt'
    weights.atomic_save({'model': model_state, 'model_ema': ema_state, 'optimizer': {}, **meta}, source)
    destination = tmp_path / 'ema.safetensors'
    assert '(37,012 parameters)' in convert(capsys, source, destination, '--ema').out
    state, written_meta, _ = read_weights(destination)
    assert written_meta == meta
    for key, value in ema_state.items():            # EMA weights, not transposed again
        np.testing.assert_array_equal(state[key], value)


def test_convert_error_is_one_line_from_the_command_line(tmp_path):
    missing = tmp_path / 'missing.pth'
    result = subprocess.run([sys.executable, str(REPO / 'convert_weights.py'), str(missing),
                             str(tmp_path / 'out.pdparams')], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stdout == ''
    assert result.stderr == (f'error: {missing}: no such file (and not a model name: CycleMLP_B1, CycleMLP_B2, '
                             'CycleMLP_B3, CycleMLP_B4, CycleMLP_B5)\n')
    assert not (tmp_path / 'out.pdparams').exists()


def test_convert_never_replaces_a_file_without_being_asked(tmp_path, capsys):
    destination = tmp_path / 'deep' / 'er' / 'tiny.pdparams'            # its folders are made
    convert(capsys, OFFICIAL, destination)
    first = destination.read_bytes()
    error = convert(capsys, OFFICIAL, destination, '--ema')
    assert str(error) == f'{destination}: exists; choose another destination or pass --overwrite'
    assert destination.read_bytes() == first
    convert(capsys, OFFICIAL, destination, '--ema', '--overwrite')
    assert destination.read_bytes() != first


@pytest.mark.parametrize('suffix', ['.pdparams', '.safetensors'])
def test_written_files_are_synced_beside_their_name_and_follow_the_umask(tmp_path, monkeypatch, suffix):
    path = tmp_path / f'w{suffix}'
    synced, fsync = [], os.fsync
    monkeypatch.setattr(os, 'fsync', lambda fd: (synced.append(os.readlink(f'/proc/self/fd/{fd}')), fsync(fd)))
    old = os.umask(0o027)
    try:
        write_weights(path, {'w': np.ones(2, np.float32)})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640 and os.umask(old) == old
    assert len(synced) == 1 and re.fullmatch(re.escape(f'{tmp_path}/.{path.name}.') + r'[^/]+\.tmp', synced[0])


BAD_META = {  # what a file records -> what the one error says
    'class_names a str': ({'class_names': 'cat'}, "class_names is 'cat', expected a list of at most 100000 strings"),
    'too many classes': ({'class_names': ['a'] * 100_001}, 'class_names is a list, expected a list of at most'),
    'a class name not a str': ({'class_names': ['cat', 3]}, 'class_names is a list, expected a list'),
    'model_name a number': ({'model_name': 7}, 'model_name is 7, expected a str'),
    'data_config a list': ({'data_config': [224]}, 'data_config is a list, expected a dict'),
    'input_size out of range': ({'data_config': {'input_size': 10**6}},
                                r"data_config 'input_size' is 1000000, expected an integer in \[8, 4096\]"),
    'crop_pct a str': ({'data_config': {'crop_pct': '0.9'}}, r"data_config 'crop_pct' is '0.9', expected a number"),
    'unknown interpolation': ({'data_config': {'interpolation': 'lanczos'}},
                              "data_config 'interpolation' is 'lanczos', expected one of bicubic, bilinear"),
    'unknown data_config key': ({'data_config': {'mean': 0.5}}, "data_config 'mean' is 0.5, expected only input_size"),
}


@pytest.mark.parametrize('kind', BAD_META)
def test_one_metadata_schema_for_weights_checkpoints_and_safetensors(tmp_path, kind):
    """Recorded metadata passes one schema, wherever it is read or written: a .pdparams or
    checkpoint pickle (read_weights, read_checkpoint), a .safetensors header, write_weights."""
    import safetensors.numpy
    meta, message = BAD_META[kind]
    state = {'w': np.ones(2, np.float32)}
    pickled, header = tmp_path / 'bad.pdckpt', tmp_path / 'bad.safetensors'
    pickled.write_bytes(pickle.dumps({'model': state, **meta}, protocol=2))
    safetensors.numpy.save_file(state, str(header), metadata={key: json.dumps(value) for key, value in meta.items()})
    for path, read in ((pickled, read_weights), (pickled, read_checkpoint), (header, read_weights),
                       (tmp_path / 'new.pdparams', lambda path: write_weights(path, state, meta))):
        with pytest.raises(WeightsError, match=re.escape(f'{path}: ') + message):
            read(path)
    assert not (tmp_path / 'new.pdparams').exists()
    safetensors.numpy.save_file(state, str(header), metadata={'data_config': '[' * 100_000 + ']' * 100_000})
    with pytest.raises(WeightsError, match=re.escape(f'{header}: damaged safetensors file (RecursionError')):
        read_weights(header)
    safetensors.numpy.save_file(state, str(header), metadata={'class_names': '["cat", '})
    with pytest.raises(WeightsError, match=re.escape(f'{header}: damaged safetensors file (JSONDecodeError')):
        read_weights(header)


def _zip_change(change):
    """The official fixture with bytes of its first member's local header (local) or central
    directory entry (central) changed by change(data, local, central)."""
    def write(path):
        data = bytearray(OFFICIAL.read_bytes())
        change(data, data.index(b'PK\x03\x04'), data.index(b'PK\x01\x02'))
        path.write_bytes(bytes(data))
    return write


def _unsupported_method(data, local, central):
    data[local + 8:local + 10] = data[central + 10:central + 12] = struct.pack('<H', 99)


def _encrypted(data, local, central):
    data[local + 6] |= 1
    data[central + 8] |= 1


def _bad_crc(data, local, central):
    name_and_extra = struct.unpack('<HH', data[local + 26:local + 30])
    data[local + 30 + sum(name_and_extra) + 2] ^= 0xFF     # a byte of data.pkl, stored uncompressed


def _sparse(path, size=17 << 30):
    with open(path, 'wb') as file:
        file.truncate(size)        # no disk used: its size is what is refused


BAD_FILES = {  # kind: (write it at path, or None; what the one-line error says after the path)
    'missing': (None, 'no such file'),
    'fifo': (os.mkfifo, 'not a regular file'),
    'device': (lambda path: os.symlink('/dev/zero', path), 'not a regular file'),
    'folder': (os.mkdir, 'not a regular file'),
    'sparse 17 GB': (_sparse, '18253611008 bytes, more than the 17179869184 it may hold'),
    'empty': (lambda path: path.write_bytes(b''), 'file is empty'),
    'one byte': (lambda path: path.write_bytes(b'\x80'), 'not a weights file'),
    'garbage': (lambda path: path.write_bytes(b'this is not a weight file'), 'not a weights file'),
    'legacy torch': (lambda path: path.write_bytes(weights.LEGACY_TORCH_MAGIC + bytes(32)),
                     r'legacy \(pre-1.6, non-zip\) torch.save format .* re-save it with torch>=1.6'),
    'truncated zip': (lambda path: path.write_bytes(OFFICIAL.read_bytes()[:OFFICIAL.stat().st_size // 2]),
                      'damaged torch file'),
    'zip of an unknown method': (_zip_change(_unsupported_method), 'damaged (torch|pickle) file'),
    'encrypted zip': (_zip_change(_encrypted), 'damaged (torch|pickle) file'),
    'zip with a bad CRC': (_zip_change(_bad_crc), 'damaged (torch|pickle) file'),
    'zip with a bad offset': (_zip_change(lambda data, local, central: data.__setitem__(
        slice(central + 42, central + 46), struct.pack('<I', local + 7))), 'damaged (torch|pickle) file'),
    'zip with a bad size': (_zip_change(lambda data, local, central: data.__setitem__(
        slice(central + 24, central + 28), struct.pack('<I', 3))), 'damaged (torch|pickle) file'),
    'truncated pickle': (lambda path: path.write_bytes(pickle.dumps({'w': np.ones(100, np.float32)})[:-50]),
                         'damaged pickle file'),
    'broken safetensors': (lambda path: path.write_bytes(struct.pack('<Q', 1000) + b'{"w": 1'),
                           'damaged safetensors file'),
    'persistent id in a pickle': (lambda path: path.write_bytes(b'\x80\x02Pstorage\n.'), 'damaged pickle file'),
}


@pytest.mark.parametrize('kind', BAD_FILES)
def test_every_bad_file_is_one_error_naming_it(tmp_path, kind):
    """Every reader opens a file once, without blocking, checks the descriptor (a regular file
    within the size bound) and reads those bytes: never a hang, never an unbounded read, and
    whatever the bytes are, one line that names the file."""
    write, message = BAD_FILES[kind]
    path = tmp_path / 'bad.pth'
    if write:
        write(path)
    descriptor_kinds = ('missing', 'fifo', 'device', 'folder', 'sparse 17 GB')
    readers = [read_weights] + ([read_checkpoint] if kind in descriptor_kinds else []) + (
        [safe_io.sha256_of] if kind in descriptor_kinds[:-1] else [])      # sha256_of reads any size
    for reader in readers:
        with pytest.raises(WeightsError, match=re.escape(f'{path}: ') + f'({message})') as error:
            reader(path)
        assert '\n' not in str(error.value)
