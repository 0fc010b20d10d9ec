"""Files and text at the boundary: a file is opened once and checked on its descriptor, written
whole or not at all, and what it holds is printed only escaped and bounded."""
from __future__ import annotations

import hashlib
import os
import reprlib
import stat
import tempfile
import unicodedata

_short_repr = reprlib.Repr()
_short_repr.maxlevel, _short_repr.maxstring, _short_repr.maxother = 1, 40, 40
_short_repr.maxlist = _short_repr.maxtuple = _short_repr.maxdict = _short_repr.maxset = 3


class WeightsError(ValueError):
    """A weight file (or any file a command reads) is missing, damaged, hostile or not what was expected."""


def printable(text) -> str:
    """text with every control and format character (newlines, terminal escapes, bidi overrides)
    escaped, so a name from a file or folder prints as one line that says what it holds."""
    return ''.join(character if unicodedata.category(character) not in ('Cc', 'Cf')
                   else repr(character)[1:-1] for character in str(text))


def one_line(text, limit: int = 200) -> str:
    """A message from elsewhere (a C++ error, a server), on one line, printable, bounded."""
    return printable(' '.join(str(text).split()))[:limit]


def describe(value) -> str:
    """A bounded description of an untrusted value, safe to put in an error message."""
    if isinstance(value, (str, bytes, int, float, bool, type(None))):
        return _short_repr.repr(value)
    return f'a {type(value).__name__}'


def open_regular_file(path: str, max_bytes: int | None = None, flags: int = os.O_RDONLY):
    """path opened once without blocking (a FIFO cannot hang it), as a binary file, once its descriptor
    is a regular file of at most max_bytes; WeightsError otherwise. What is read is what was checked."""
    try:
        descriptor = os.open(path, flags | os.O_NONBLOCK, 0o666)
    except OSError as error:
        problem = 'no such file' if isinstance(error, FileNotFoundError) else f'cannot open ({error.strerror})'
        raise WeightsError(f'{path}: {problem}') from None
    status = os.fstat(descriptor)
    problem = ('not a regular file' if not stat.S_ISREG(status.st_mode) else
               f'{status.st_size} bytes, more than the {max_bytes} it may hold'
               if max_bytes is not None and status.st_size > max_bytes else None)
    if problem:
        os.close(descriptor)
        raise WeightsError(f'{path}: {problem}')
    return os.fdopen(descriptor, 'rb')


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open_regular_file(path) as file:
        for chunk in iter(lambda: file.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomically(path: str, write):
    """write(temporary) into a new file beside path, fsync it, rename it onto path; what write returned.
    On any failure the temporary is removed. The file gets a plain open()'s mode (mkstemp's is 0600)."""
    directory, name = os.path.split(os.path.abspath(path))
    temporary = None
    try:
        os.makedirs(directory, exist_ok=True)       # the folders a command writes into, as mkdir -p
        descriptor, temporary = tempfile.mkstemp(prefix=f'.{name}.', suffix='.tmp', dir=directory)
        os.close(descriptor)
        result = write(temporary)
        umask = os.umask(0o022)
        os.umask(umask)
        with open(temporary, 'rb') as file:         # by name: a writer may have made a new file there
            os.fchmod(file.fileno(), 0o666 & ~umask)
            os.fsync(file.fileno())
        os.replace(temporary, path)
        return result
    except BaseException as error:
        if temporary is not None and os.path.exists(temporary):
            os.remove(temporary)
        if isinstance(error, OSError):
            raise WeightsError(f'{path}: cannot write ({error.strerror or error})') from None
        raise


def remove_stale_temporaries(path: str) -> list[str]:
    """Remove (and name) the temporaries that writes of path killed by SIGKILL left."""
    directory, name = os.path.split(os.path.abspath(path))
    stale = [entry for entry in os.listdir(directory)
             if entry.startswith(f'.{name}.') and entry.endswith('.tmp')]
    for entry in stale:
        os.remove(os.path.join(directory, entry))
    return stale
