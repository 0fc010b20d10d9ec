"""Writing torch.save archives without torch, opcode by opcode, for tests that need files in the
official layout that cannot be committed (hostile ones, or a release-sized one).

What torch.save writes, as the real files in tests/fixtures/ show: a zip archive, every member
stored uncompressed, holding <root>/data.pkl (a protocol-2 pickle in which each tensor is
torch._utils._rebuild_tensor_v2 of a persistent id ('storage', torch.FloatStorage, key,
'cpu', numel)), <root>/data/<key> (the storage bytes, little-endian), <root>/byteorder and
<root>/version. tests/test_torch_files.py checks that a file written here reads back like the
real fixture; real torch.load (weights_only=True) reads it too (checked by hand, torch 2.14.1).
"""
import struct
import zipfile
from pathlib import Path

import numpy as np


def pickle_str(text: str) -> bytes:
    data = text.encode()
    return b'X' + struct.pack('<I', len(data)) + data


def pickle_global(module: str, name: str) -> bytes:
    return f'c{module}\n{name}\n'.encode()


def pickle_int(value: int) -> bytes:
    return b'J' + struct.pack('<i', value)


def pickle_int_tuple(values) -> bytes:
    return b'(' + b''.join(pickle_int(v) for v in values) + b't'


def ordered_dict() -> bytes:
    return pickle_global('collections', 'OrderedDict') + b')R'


def tensor_pickle(storage_key: str, offset: int, size, stride, numel: int) -> bytes:
    """The opcodes of one float32 tensor on storage `storage_key`."""
    storage = (b'(' + pickle_str('storage') + pickle_global('torch', 'FloatStorage')
               + pickle_str(storage_key) + pickle_str('cpu') + pickle_int(numel) + b'tQ')
    args = (b'(' + storage + pickle_int(offset) + pickle_int_tuple(size) + pickle_int_tuple(stride)
            + b'\x89' + ordered_dict() + b't')
    return pickle_global('torch._utils', '_rebuild_tensor_v2') + args + b'R'


def write_torch_zip(path: Path, data_pkl: bytes, storages: dict, byteorder: bytes = b'little',
                    root: str = 'archive') -> None:
    with zipfile.ZipFile(path, 'w') as archive:
        archive.writestr(f'{root}/data.pkl', data_pkl)
        archive.writestr(f'{root}/byteorder', byteorder)
        for key, raw in storages.items():
            archive.writestr(f'{root}/data/{key}', raw)
        archive.writestr(f'{root}/version', '3\n')       # torch.load requires it


def write_release(path: Path, torch_state: dict, key: str = 'model', meta: bytes = b'') -> None:
    """A torch.save of {key: OrderedDict(torch_state)} with one float32 storage per tensor,
    as the official release files hold (PyTorch layout: Linear weights [out, in]); `meta`, the
    opcodes of a value pickled without PROTO and STOP, is added as 'meta' (as mmcv saves it)."""
    entries, storages = b'', {}
    for index, (name, value) in enumerate(torch_state.items()):
        value = np.ascontiguousarray(value, dtype=np.float32)
        strides = [int(np.prod(value.shape[axis + 1:])) for axis in range(value.ndim)]
        entries += pickle_str(name) + tensor_pickle(str(index), 0, value.shape, strides, value.size)
        storages[str(index)] = value.astype('<f4').tobytes()
    state = ordered_dict() + b'(' + entries + b'u'
    extra = pickle_str('meta') + meta if meta else b''
    write_torch_zip(path, b'\x80\x02}(' + pickle_str(key) + state + extra + b'u.', storages)


def paddle_to_torch(state: dict) -> dict:
    """The inverse of weights.torch_to_paddle: 2-D '.weight' arrays transposed back."""
    return {key: value.T if value.ndim == 2 and key.endswith('.weight') else value
            for key, value in state.items()}
