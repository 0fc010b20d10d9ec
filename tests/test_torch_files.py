"""tests/torch_files.py writes what torch.save writes: the official fixture (written by real
torch.save from the official code) rewritten by it reads back the same, member for member."""
import zipfile
from pathlib import Path

import numpy as np

from torch_files import write_release
from weights import read_weights

OFFICIAL_RELEASE_LAYOUT = Path(__file__).resolve().parent / 'fixtures' / 'official_tiny_legacy_root.pth'


def test_a_written_release_reads_like_one_torch_wrote(tmp_path):
    state, meta, layout = read_weights(OFFICIAL_RELEASE_LAYOUT)      # {'model': state_dict}, by torch
    path = tmp_path / 'release.pth'
    write_release(path, state)
    written, written_meta, written_layout = read_weights(path)
    assert (written_meta, written_layout) == (meta, layout) == ({}, 'torch')
    assert list(written) == list(state)
    for key, value in state.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)
        assert written[key].dtype == value.dtype
    with zipfile.ZipFile(OFFICIAL_RELEASE_LAYOUT) as real, zipfile.ZipFile(path) as ours:
        assert {info.compress_type for info in ours.infolist()} == {info.compress_type for info in real.infolist()}
        assert sum(name.count('/data/') for name in ours.namelist()) == len(state)
        records = lambda archive: {name.split('/', 1)[1] for name in archive.namelist() if '/data/' not in name}  # noqa: E731
        assert records(ours) <= records(real)            # data.pkl, byteorder, version: torch.load needs them
