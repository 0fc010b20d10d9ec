"""Reading and writing CycleMLP weight files safely, without PyTorch.

Read, recognised by content: torch.save zip archives, paddle.save pickles (.pdparams/.pdckpt),
.safetensors; written atomically: .pdparams (paddle.load reads it too), .safetensors. A pickle is a
program (torch.load and paddle.load call what it names), so here an unpickler resolves every name
through an allow-list of stand-ins, sets state only on objects the load created, from checked values,
and bounds what a file declares by what it holds: anything else is a WeightsError, nothing runs.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import pickle
import struct
import zipfile
import zlib  # noqa: F401  before Paddle (atomic_save): Paddle 2.6 bundles a zlib that crashes a later one

import numpy as np
import safetensors
import safetensors.numpy

from safe_io import WeightsError, describe, open_regular_file, write_atomically

META_KEYS = ('model_name', 'class_names', 'data_config')
# torch.save files from before PyTorch 1.6 start with a pickled magic number, not a zip header.
LEGACY_TORCH_MAGIC = b'\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19'
# paddle.save of a dict of tensors adds this bookkeeping entry (structured name -> tensor name).
PADDLE_NAME_TABLE_KEY = 'StructuredToParameterName@@'
# Numeric kinds only: object ('O') and void/structured ('V') dtypes could smuggle in pickled objects.
NUMERIC_KINDS = 'biufc'
MAX_PICKLE_BYTES = 64 << 20      # the data.pkl of a torch.save archive (a training checkpoint's is < 1 MB)
MAX_FILE_BYTES = 16 << 30        # B5's training checkpoint (weights, EMA, two moments) is about 1.2 GB
MAX_ARRAY_DIMS = 32
# The schema of recorded metadata: class names, and the evaluation transform (data_config).
MAX_CLASSES = 100_000            # ImageNet-21k has 21,841
MAX_NAME_CHARS = 1000
INPUT_SIZE_RANGE = (8, 4096)
CROP_PCT_RANGE = (0.05, 1.0)
INTERPOLATION_NAMES = ('bicubic', 'bilinear', 'nearest')
DATA_CONFIG = {  # key: (check, what is expected)
    'input_size': (lambda v: type(v) is int and INPUT_SIZE_RANGE[0] <= v <= INPUT_SIZE_RANGE[1],
                   f'an integer in {list(INPUT_SIZE_RANGE)}'),
    'crop_pct': (lambda v: type(v) in (int, float) and CROP_PCT_RANGE[0] <= v <= CROP_PCT_RANGE[1],
                 f'a number in {list(CROP_PCT_RANGE)}'),
    'interpolation': (lambda v: isinstance(v, str) and v in INTERPOLATION_NAMES,
                      f'one of {", ".join(INTERPOLATION_NAMES)}'),
}


# Stand-ins for the globals that torch.save pickles name

# A torch dtype or storage class stands for the numpy dtype of its bytes (immutable: a file cannot
# change it); bfloat16 is read as uint16, then widened (torch writes no uint16 tensors).
_TORCH_DTYPES = {name: np.dtype('uint16' if name == 'bfloat16' else name) for name in (
    'float32', 'float16', 'bfloat16', 'float64', 'int64', 'int32', 'int16', 'int8', 'uint8', 'bool')}
_BFLOAT16 = _TORCH_DTYPES['bfloat16']
# The legacy typed storage classes, in the order of _TORCH_DTYPES.
_TORCH_STORAGE_CLASSES = dict(zip((
    'FloatStorage', 'HalfStorage', 'BFloat16Storage', 'DoubleStorage', 'LongStorage', 'IntStorage',
    'ShortStorage', 'CharStorage', 'ByteStorage', 'BoolStorage'), _TORCH_DTYPES.values()))


class _Storage:
    """The raw bytes of one torch storage (`<root>/data/<key>` in the zip) and their dtype."""

    def __init__(self, raw: bytes, dtype: np.dtype, big_endian: bool):
        self.raw, self.dtype, self.big_endian = raw, dtype, big_endian

    def elements(self, dtype: np.dtype) -> np.ndarray:
        """The bytes as elements of dtype (a tensor's own, for untyped storages), native order."""
        elements = np.frombuffer(self.raw, dtype=dtype.newbyteorder('>' if self.big_endian else '<'))
        return elements.astype(dtype.newbyteorder('='))


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None) -> np.ndarray:
    """A tensor as a copy of a view of its storage (offset, size, stride in elements; v3 is written for
    untyped storages: the dtype comes with the tensor). The geometry is checked first: as_strided
    trusts it and would read outside the buffer if a file lied, and a view that repeats elements (a
    zero stride) could declare far more than the file holds."""
    if not (isinstance(storage, _Storage) and isinstance(dtype, np.dtype)):
        raise WeightsError(f'a tensor is built from {describe(storage)} of dtype {describe(dtype)}, '
                           'expected a storage and a dtype this reader supports')
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
            and type(storage_offset) is int and len(size) <= MAX_ARRAY_DIMS
            and all(type(v) is int and v >= 0 for v in (storage_offset, *size, *stride))):
        raise WeightsError('bad tensor geometry: offset, size and stride must be tuples of '
                           'non-negative integers of equal length')
    elements = storage.elements(dtype)
    count = math.prod(size)
    if count > elements.size:
        raise WeightsError(f'a tensor of {count} elements from a storage of {elements.size}: '
                           'weights never repeat elements')
    if count:
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= elements.size:
            raise WeightsError(f'tensor of size {size}, stride {stride}, offset {storage_offset} reaches '
                               f'element {last} of a storage holding {elements.size}')
    view = np.lib.stride_tricks.as_strided(
        elements[storage_offset:] if count else elements[:0], shape=size,
        strides=[s * elements.itemsize for s in stride], writeable=False)
    array = np.array(view)
    if dtype is _BFLOAT16:  # bfloat16 is the upper half of a float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       metadata=None) -> np.ndarray:
    return _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                              getattr(storage, 'dtype', None))


def _rebuild_parameter(data, *_):
    return data  # requires_grad, hooks and Python attributes set on a Parameter are not weights


# Stand-ins for the globals that pickled numpy arrays name (paddle.save, any numpy version)

def _numpy_dtype(spec, align=False, copy=False) -> np.dtype:
    dtype = np.dtype(spec) if isinstance(spec, str) and len(spec) <= 8 else None
    if dtype is None or dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype:
        raise WeightsError(f'numpy dtype {describe(spec)} is not numeric')
    return dtype


class _EmptyArray:
    """Stands for numpy.ndarray, and is what _reconstruct gives: a placeholder whose BUILD state
    becomes a checked new array (numpy.ndarray itself would build one from unchecked arguments)."""


def _numpy_reconstruct(subtype, shape, typecode) -> _EmptyArray:
    if subtype is not _EmptyArray:
        raise WeightsError(f'array subtype {describe(subtype)} is not numpy.ndarray')
    return _EmptyArray()


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise WeightsError(f'numpy scalar of dtype {describe(dtype)} holds no raw bytes of its size')
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _latin1_encode(text, encoding='latin1'):
    # Protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1'); no other codec is needed.
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise WeightsError(f'_codecs.encode with encoding {describe(encoding)} is not allowed')
    return text.encode('latin1')


# Every global a weights file may name (torch.save's, paddle.save's, and the plain values of an
# mmcv checkpoint's 'meta': numpy scalars, sets), each a stand-in that builds checked values.
ALLOWED_GLOBALS = {
    'collections.OrderedDict': collections.OrderedDict,
    'argparse.Namespace': argparse.Namespace,  # 'args' in official checkpoints; a plain bag
    'torch._utils._rebuild_tensor_v2': _rebuild_tensor_v2,
    'torch._utils._rebuild_tensor_v3': _rebuild_tensor_v3,
    'torch._utils._rebuild_parameter': _rebuild_parameter,
    'torch._utils._rebuild_parameter_with_state': _rebuild_parameter,
    'torch.storage.UntypedStorage': _TORCH_DTYPES['uint8'],
    **{f'torch.{name}': dtype for name, dtype in {**_TORCH_STORAGE_CLASSES, **_TORCH_DTYPES}.items()},
    '_codecs.encode': _latin1_encode,
    'numpy.ndarray': _EmptyArray,
    'numpy.dtype': _numpy_dtype,
    # paddle.save pickles a tensor in a container as the tuple (name, ndarray); protocol 2 says __builtin__.
    'builtins.tuple': tuple, '__builtin__.tuple': tuple, 'builtins.set': set, '__builtin__.set': set,
    'numpy.core.multiarray._reconstruct': _numpy_reconstruct,       # numpy 1.x
    'numpy._core.multiarray._reconstruct': _numpy_reconstruct,      # numpy 2.x
    'numpy.core.multiarray.scalar': _numpy_scalar,
    'numpy._core.multiarray.scalar': _numpy_scalar,
}


# BUILD: the state a pickle may set, by the type of object it sets it on

def _build_array(target: _EmptyArray, state) -> np.ndarray:
    """ndarray.__setstate__'s (version, shape, dtype, is_fortran, raw bytes), checked: a new array."""
    if not (isinstance(state, tuple) and len(state) == 5):
        raise WeightsError('array state is not (version, shape, dtype, order, data)')
    _, shape, dtype, fortran, raw = state
    if not (isinstance(shape, tuple) and len(shape) <= MAX_ARRAY_DIMS
            and all(type(n) is int and n >= 0 for n in shape)):
        raise WeightsError('array shape is not a tuple of non-negative integers')
    if not isinstance(dtype, np.dtype):    # numeric: _numpy_dtype built it
        raise WeightsError(f'array dtype {describe(dtype)} is not numeric')
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != math.prod(shape) * dtype.itemsize:
        raise WeightsError(f'an array of shape {shape} and dtype {dtype} needs '
                           f'{math.prod(shape) * dtype.itemsize} bytes, the file holds '
                           f'{len(raw) if isinstance(raw, (bytes, bytearray)) else describe(raw)}')
    array = np.frombuffer(raw, dtype=dtype).reshape(shape, order='F' if fortran else 'C')
    return array.astype(dtype.newbyteorder('='), order='C')


def _build_dtype(target: np.dtype, state) -> np.dtype:
    """np.dtype.__setstate__: only the byte order, on a new dtype (np.dtype('f4') is shared)."""
    if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] == 3
            and state[1] in ('<', '>', '|', '=') and state[2:5] == (None, None, None)
            and state[5:8] == (-1, -1, 0)):
        raise WeightsError(f'dtype {target} with a state other than a plain numeric type\'s')
    return target.newbyteorder(state[1]) if state[1] in '<>' else target


def _drop_state(target, state):
    return target   # the attributes of an OrderedDict, or an official checkpoint's 'args', are not weights


# By type, checked with isinstance: numpy 2 makes each dtype an instance of its own subclass.
_BUILDERS = ((_EmptyArray, _build_array), (np.dtype, _build_dtype),
             (collections.OrderedDict, _drop_state), (argparse.Namespace, _drop_state))


class _RestrictedUnpickler(pickle._Unpickler):
    """The allow-listed unpickler (module docstring): the pure-Python one, whose BUILD can be
    replaced and which needs no recursion for deeply nested data."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        key = f'{module}.{name}'
        if key not in ALLOWED_GLOBALS:
            raise WeightsError(f'refusing to load global {describe(key)}: weight files may only '
                               'name tensor and container types')
        return ALLOWED_GLOBALS[key]

    def load_build(self):
        state = self.stack.pop()
        target = self.stack[-1]
        build = next((build for kind, build in _BUILDERS if isinstance(target, kind)
                      and not isinstance(target, type)), None)
        if build is None:
            raise WeightsError(f'refusing to set the state of {describe(target)}: weight files '
                               'may only set the state of the arrays and containers they create')
        self.stack[-1] = build(target, state)

    dispatch[pickle.BUILD[0]] = load_build


# The three formats, and the one schema of their metadata

def _read_torch_archive(file) -> dict:
    archive = zipfile.ZipFile(file)
    members = {info.filename: info for info in archive.infolist()}
    pickles = [name for name in members if name.endswith('/data.pkl') and name.count('/') == 1]
    if len(pickles) != 1:
        raise WeightsError(f'a torch.save archive holds one <root>/data.pkl, found {len(pickles)}')
    if members[pickles[0]].file_size > MAX_PICKLE_BYTES:
        raise WeightsError(f'data.pkl declares {members[pickles[0]].file_size} bytes; '
                           'torch.save writes far less')
    # The root folder is 'archive' in files torch writes to a stream, the file's stem otherwise.
    root = pickles[0][:-len('data.pkl')]
    byteorder = members.get(f'{root}byteorder')
    big_endian = byteorder is not None and byteorder.file_size < 16 and archive.read(byteorder).strip() == b'big'
    storages = {}

    def load_storage(pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
                and isinstance(pid[1], np.dtype) and isinstance(pid[2], str)
                and type(pid[4]) is int and pid[4] >= 0):
            raise WeightsError('unexpected persistent id: expected a torch storage')
        _, dtype, key, _location, numel = pid
        if key not in storages:
            info = members.get(f'{root}data/{key}')
            if info is None:
                raise WeightsError(f'missing storage {describe(key)}')
            if info.compress_type != zipfile.ZIP_STORED:
                raise WeightsError(f'storage {describe(key)} is compressed; torch.save stores '
                                   'storages uncompressed: re-save the file with torch.save')
            if info.file_size != numel * dtype.itemsize:
                raise WeightsError(f'storage {describe(key)} holds {info.file_size} bytes, expected '
                                   f'{numel} x {dtype.name}')
            storages[key] = _Storage(archive.read(info), dtype, big_endian)
        return storages[key]

    with archive.open(pickles[0]) as member:
        unpickler = _RestrictedUnpickler(member)
        unpickler.persistent_load = load_storage    # elsewhere pickle's own refuses every persistent id
        result = unpickler.load()
        member.read()   # to the end, where zipfile checks the member's CRC
    return result


def _read_safetensors(file) -> tuple[dict, str]:
    """({'model': arrays, **meta}, layout) of a .safetensors file; its meta is JSON in the header."""
    data = file.read()
    container = {'model': safetensors.numpy.load(data)}
    header = json.loads(data[8:8 + struct.unpack('<Q', data[:8])[0]]).get('__metadata__') or {}
    # Bad JSON (or JSON too deep to parse) is a damaged file, as any error of the libraries here.
    container.update({key: json.loads(header[key]) for key in META_KEYS if key in header})
    # Files that safetensors.torch wrote say so with format 'pt'; our own files record the layout.
    layout = header.get('layout', 'torch' if header.get('format') == 'pt' else 'paddle')
    if layout not in ('torch', 'paddle'):
        raise WeightsError(f"layout {describe(layout)}, expected 'torch' or 'paddle'")
    return container, layout


def _kind(file) -> str:
    """'torch', 'pickle' or 'safetensors', judged from the first bytes of the file (left at its start)."""
    head = file.read(16)
    file.seek(0)
    if not head:
        raise WeightsError('file is empty')
    if head.startswith(LEGACY_TORCH_MAGIC):
        raise WeightsError('legacy (pre-1.6, non-zip) torch.save format is not supported; '
                           're-save it with torch>=1.6: torch.save(torch.load(old), new)')
    if head.startswith(b'PK\x03\x04'):
        return 'torch'
    if head[:1] == b'\x80' and head[1:2] in (b'\x02', b'\x03', b'\x04', b'\x05'):   # PROTO 2..5
        return 'pickle'
    if head[8:9] == b'{':          # a u64 header length, then a JSON header
        return 'safetensors'
    raise WeightsError('not a weights file: expected a torch.save zip archive, a paddle.save pickle '
                       '(.pdparams/.pdckpt) or a .safetensors file')


def _read(path: str, pickle_only: bool = False) -> tuple[dict, dict, str]:
    """(the dict a weights file holds, its checked META_KEYS, its layout): the file opened once and
    checked, read by the safe readers. Every failure is one WeightsError naming the file."""
    path, kind = os.fspath(path), 'weights'
    with open_regular_file(path, MAX_FILE_BYTES) as file:   # what is checked is what is read
        try:
            kind = _kind(file)
            if pickle_only and kind != 'pickle':
                raise WeightsError(f'expected a paddle.save pickle (.pdckpt), found a {kind} file')
            content, layout = (_read_safetensors(file) if kind == 'safetensors' else
                               (_RestrictedUnpickler(file).load(), 'paddle') if kind == 'pickle' else
                               (_read_torch_archive(file), 'torch'))
        except WeightsError as error:
            raise WeightsError(f'{path}: {error}') from None
        except Exception as error:   # a damaged file raises anything from EOFError to zlib.error
            raise WeightsError(f'{path}: damaged {kind} file ({type(error).__name__}: '
                               f'{describe(str(error))[1:-1]})') from None
    if not isinstance(content, dict):
        raise WeightsError(f'{path}: expected a dict, found {describe(content)}')
    return content, check_meta({key: content[key] for key in META_KEYS if key in content}, path), layout


def check_data_config(config, source: str) -> dict:
    """A recorded evaluation transform (data_config), checked; WeightsError naming source otherwise."""
    if not isinstance(config, dict):
        raise WeightsError(f'{source}: data_config is {describe(config)}, expected a dict')
    for key, value in config.items():
        if key not in DATA_CONFIG or not DATA_CONFIG[key][0](value):
            expected = DATA_CONFIG[key][1] if key in DATA_CONFIG else f'only {", ".join(DATA_CONFIG)}'
            raise WeightsError(f'{source}: data_config {describe(key)} is {describe(value)}, '
                               f'expected {expected}')
    return config


def check_meta(meta: dict, source: str) -> dict:
    """The one schema of what a file records besides weights (META_KEYS; None: not recorded)."""
    if meta.get('model_name') is not None and not isinstance(meta['model_name'], str):
        raise WeightsError(f'{source}: model_name is {describe(meta["model_name"])}, expected a str')
    names = meta.get('class_names')
    if names is not None and not (isinstance(names, list) and len(names) <= MAX_CLASSES and all(
            isinstance(name, str) and len(name) < MAX_NAME_CHARS for name in names)):
        raise WeightsError(f'{source}: class_names is {describe(names)}, expected a list of at most '
                           f'{MAX_CLASSES} strings')
    if meta.get('data_config') is not None:
        check_data_config(meta['data_config'], source)
    return meta


# Public API

def read_checkpoint(path: str) -> dict:
    """The whole dict of a .pdckpt/.pdparams pickle (model, optimizer, epoch, ...), for resuming."""
    return _read(path, pickle_only=True)[0]


def check_state(path: str, state) -> dict[str, np.ndarray]:
    """A state dict of str keys and arrays (numeric and native: the readers make no other), or WeightsError."""
    if not isinstance(state, dict):
        raise WeightsError(f'{path}: the state dict is {describe(state)}, expected a dict')
    arrays = {}
    for key, value in state.items():
        if key == PADDLE_NAME_TABLE_KEY:
            continue
        if (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str)
                and isinstance(value[1], np.ndarray)):
            value = value[1]  # (tensor name, array): a paddle tensor pickled inside a container
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise WeightsError(f'{path}: state dict entry {describe(key)} is {describe(value)}, '
                               'expected an array')
        arrays[key.removeprefix('module.')] = value   # DistributedDataParallel's wrapped module
    if not arrays:
        raise WeightsError(f'{path}: the state dict is empty')
    return arrays


def read_weights(path: str, ema: bool = False) -> tuple[dict[str, np.ndarray], dict, str]:
    """(state dict, meta, layout: 'torch' or 'paddle', see torch_to_paddle) of a weights file.
    The state is the dict's 'model', else 'state_dict', else the dict itself; with ema, 'model_ema'
    (timm's ModelEma). The rest of a checkpoint (optimizer, args, an mmcv 'meta') is read and ignored."""
    container, meta, layout = _read(path)
    if ema and 'model_ema' not in container:
        keys = [key for key in container if isinstance(key, str)][:8]
        raise WeightsError(f"{path}: no 'model_ema' entry (has {', '.join(map(describe, keys))})")
    state = container['model_ema'] if ema else container.get('model', container.get('state_dict', container))
    return check_state(path, state), meta, layout


def torch_to_paddle(state: dict) -> dict:
    """A state dict from PyTorch layout to Paddle's: torch.nn.Linear stores [out, in] (x @ W.T),
    paddle.nn.Linear [in, out] (x @ W). Every 2-D '.weight' of CycleMLP is a Linear's; convolution
    and CycleFC weights are [out, in, kh, kw] in both, and LayerNorm's are 1-D."""
    return {key: np.ascontiguousarray(value.T) if value.ndim == 2 and key.endswith('.weight')
            else value for key, value in state.items()}


def atomic_save(obj, path: str) -> None:
    """paddle.save obj (numpy arrays and plain Python values) to path, all or nothing."""
    import paddle  # here: reading and converting weights does not need the framework
    write_atomically(os.fspath(path), lambda temporary: paddle.save(obj, temporary))


def write_weights(path: str, state: dict[str, np.ndarray], meta: dict | None = None) -> None:
    """Write a Paddle-layout state dict and its meta to a .pdparams ({'model': state, **meta}) or
    a .safetensors file (meta JSON-encoded in its header)."""
    path = os.fspath(path)
    meta = check_meta(dict(meta or {}), path)
    suffix = os.path.splitext(path)[1]
    if suffix == '.pdparams':
        atomic_save({'model': dict(state), **meta}, path)
    elif suffix == '.safetensors':
        header = {**{key: json.dumps(value) for key, value in meta.items()}, 'layout': 'paddle'}
        arrays = {key: np.ascontiguousarray(value) for key, value in state.items()}
        write_atomically(path, lambda temporary: safetensors.numpy.save_file(arrays, temporary, header))
    else:
        raise WeightsError(f'{path}: cannot write {suffix or "a file without suffix"}, '
                           "expected .pdparams or .safetensors")
