"""The official CycleMLP weights by name: downloaded once into a cache folder, checked, reused.

    zoo.load_model('CycleMLP_B1')                      # and --weights CycleMLP_B1 on every command

The cache folder is $CYCLEMLP_CACHE, else Paddle's own cache convention (paddle.hub):
$PADDLE_HOME/cyclemlp, with PADDLE_HOME defaulting to $XDG_CACHE_HOME/paddle or ~/.cache/paddle.
Files come from the official GitHub release, or from $CYCLEMLP_MIRROR, a base URL that serves
the same file names (a site without internet access hosts them itself). A file put into the
cache folder by hand is used as it is.

What is checked. The official release publishes no checksums, so a download cannot be compared
with one. It is checked by what is known for certain: the whole length the server announced, a
readable archive, and the caller's structural check (zoo: exact keys and shapes of that variant,
read by the safe weights reader, so nothing in the file runs). Then its sha256 is recorded
beside it (NAME.sha256, in `sha256sum` format) and verified at every later use, so a damaged
cache is found: the file is downloaded again. RELEASES has a place for published sha256 values;
one given there is required of every download and cached file.

How. The download streams into a temporary file beside its final name (with a progress bar on
stderr when that is a terminal), with a timeout on connecting and on every read, and only a
checked file is renamed into place: an interrupted, killed or wrong download never becomes the
cached file, and the next run removes what a killed one left. A lock file serialises processes
that need the same file: one downloads, the others (other commands, or the ranks
paddle.distributed.launch starts on one machine) wait and then use its file.
"""
import fcntl
import hashlib
import http.client
import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from typing import Callable, Optional

from weights import WeightsError, one_line, printable, remove_stale_temporaries, sha256_of

RELEASE_URL = 'https://github.com/ShoufaChen/CycleMLP/releases/download/v0.1'
# name: (release file, its published sha256; None: the release publishes none)
RELEASES = {
    'CycleMLP_B1': ('CycleMLP_B1.pth', None),
    'CycleMLP_B2': ('CycleMLP_B2.pth', None),
    'CycleMLP_B3': ('CycleMLP_B3.pth', None),
    'CycleMLP_B4': ('CycleMLP_B4.pth', None),
    'CycleMLP_B5': ('CycleMLP_B5.pth', None),
}
CACHE_VARIABLE = 'CYCLEMLP_CACHE'
MIRROR_VARIABLE = 'CYCLEMLP_MIRROR'
TIMEOUT_VARIABLE = 'CYCLEMLP_TIMEOUT'
DEFAULT_TIMEOUT = 30.0           # seconds to connect, and for each read
CHUNK = 1 << 20
PROGRESS_INTERVAL = 0.2          # seconds between progress bar updates
TEMPORARY_SUFFIX = '.tmp'   # as weights.py's writes: remove_stale_temporaries finds them


class DownloadError(WeightsError):
    """Official weights that cannot be had: the message names the URL, what went wrong and where
    to put the file by hand."""


def cache_folder() -> str:
    if os.environ.get(CACHE_VARIABLE):
        return os.path.abspath(os.path.expanduser(os.environ[CACHE_VARIABLE]))
    paddle_home = os.environ.get('PADDLE_HOME') or os.path.join(
        os.environ.get('XDG_CACHE_HOME') or os.path.join('~', '.cache'), 'paddle')
    return os.path.abspath(os.path.join(os.path.expanduser(paddle_home), 'cyclemlp'))


def release_url(name: str) -> str:
    base = os.environ.get(MIRROR_VARIABLE) or RELEASE_URL
    return f'{base.rstrip("/")}/{RELEASES[name][0]}'


def timeout() -> float:
    value = os.environ.get(TIMEOUT_VARIABLE)
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float('inf'):
        raise DownloadError(f'{TIMEOUT_VARIABLE}={value[:40]!r}: expected a number of seconds above 0')
    return seconds


def official_weights(name: str, check: Callable[[str], None]) -> str:
    """The path of the cached official weights of variant `name`, downloading them first if the
    cache lacks them or holds a damaged copy. check(path) raises WeightsError unless the file
    holds that variant's weights. Raises DownloadError (one line) when the file cannot be had."""
    file_name, published = RELEASES[name]
    folder = cache_folder()
    path = os.path.join(folder, file_name)
    by_hand = f'download {release_url(name)} by hand and put it at {path}'
    if os.path.isfile(path) and _verified(path, published):
        return path
    try:
        os.makedirs(folder, exist_ok=True)
        lock = open(os.path.join(folder, f'.{file_name}.lock'), 'a')
    except OSError as error:
        if os.path.isfile(path):             # a read-only cache: its file, checked, unrecorded
            return _checked(path, _verified(path, published), check, record=False)
        raise DownloadError(f'cache folder {folder}: {error.strerror}; set {CACHE_VARIABLE} to a '
                            f'writable folder, or {by_hand}') from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)    # another process may be downloading it: wait for it
        verified = _verified(path, published) if os.path.isfile(path) else False
        if verified is not False:
            return _checked(path, verified, check, record=True)
        if os.path.isfile(path):
            print(f'{printable(path)} does not match its {"published" if published else "recorded"} '
                  'sha256 (damaged): downloading it again', file=sys.stderr)   # it is replaced once the new one is checked
        remove_stale_temporaries(path)      # what downloads killed before their end left
        _download(name, path, published, check, by_hand)
    return path


def _verified(path: str, published: Optional[str]) -> Optional[bool]:
    """Whether the file matches its published or recorded sha256; None if there is neither (a
    file put into the cache by hand)."""
    expected = published or _recorded(path)
    return None if expected is None else sha256_of(path) == expected


def _recorded(path: str) -> Optional[str]:
    try:
        with open(path + '.sha256', encoding='ascii') as file:
            digest = file.read(200).split()[0]
    except (OSError, ValueError, IndexError):
        return None
    return digest if len(digest) == 64 and all(c in '0123456789abcdef' for c in digest) else None


def _checked(path: str, verified: Optional[bool], check: Callable[[str], None], record: bool) -> str:
    """path, once it matched its sha256 (verified, from _verified) or, unrecorded (None), passes
    check (and is then recorded)."""
    if verified is False:
        raise DownloadError(f'{path} is damaged (it does not match its sha256); delete it to '
                            'download it again')
    if verified is None:
        try:
            check(path)
        except WeightsError as error:
            raise DownloadError(f'{error}; delete {path} to download it again') from None
        if record:
            _write_record(path, sha256_of(path))
    return path


def _write_record(path: str, digest: str) -> None:
    folder, file_name = os.path.split(path)
    temporary = os.path.join(folder, f'.{file_name}.sha256.{os.getpid()}{TEMPORARY_SUFFIX}')   # removed if stale
    try:
        with open(temporary, 'w', encoding='ascii') as file:
            file.write(f'{digest}  {file_name}\n')
        os.replace(temporary, path + '.sha256')
    except OSError as error:
        raise DownloadError(f'{path}.sha256: cannot write ({error.strerror})') from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _download(name: str, path: str, published: Optional[str], check: Callable[[str], None],
              by_hand: str) -> None:
    url = release_url(name)
    folder, file_name = os.path.split(path)
    temporary = os.path.join(folder, f'.{file_name}.{os.getpid()}{TEMPORARY_SUFFIX}')
    try:
        digest = _fetch(url, temporary, by_hand)
        if published and digest != published:
            raise DownloadError(f'{url}: the file does not match its published sha256; {by_hand}')
        try:
            check(temporary)
        except WeightsError as error:
            detail = str(error).replace(temporary, 'the file')
            raise DownloadError(f'{url}: not {name}\'s weights ({detail}); {by_hand}') from None
        os.replace(temporary, path)
        _write_record(path, digest)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _fetch(url: str, temporary: str, by_hand: str) -> str:
    """Stream url into temporary; its sha256, or DownloadError."""
    seconds = timeout()
    written = 0
    try:
        request = urllib.request.Request(url, headers={'User-Agent': 'cyclemlp-paddle'})
    except ValueError as error:     # a mirror that is not a URL
        raise DownloadError(f'{printable(url)}: not a URL ({one_line(error)}); check {MIRROR_VARIABLE}') from None
    try:
        with urllib.request.urlopen(request, timeout=seconds) as response:
            if 'html' in response.headers.get('Content-Type', ''):
                raise DownloadError(f'{url}: the server sent a web page, not a weights file; {by_hand}')
            length = response.headers.get('Content-Length')
            expected = int(length) if length and length.isdigit() else None
            digest = hashlib.sha256()
            progress = Progress(os.path.basename(url), expected)
            try:
                with open_for_writing(temporary, by_hand) as file:
                    for chunk in iter(lambda: response.read(CHUNK), b''):
                        write(file, chunk, by_hand)
                        digest.update(chunk)
                        written += len(chunk)
                        progress.update(written)
            finally:
                progress.close()        # so that an error starts on a line of its own
    except DownloadError:
        raise
    except urllib.error.HTTPError as error:
        raise DownloadError(f'{url}: HTTP {error.code} {one_line(error.reason)}; {by_hand}') from None
    except urllib.error.URLError as error:
        reason = error.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            reason = f'no answer within {seconds:g} s'
        raise DownloadError(f'{url}: cannot connect ({one_line(reason)}); {by_hand}') from None
    except (socket.timeout, TimeoutError):
        raise DownloadError(f'{url}: no data for {seconds:g} s after {written} bytes; {by_hand}') from None
    except (http.client.HTTPException, OSError) as error:   # IncompleteRead, a reset connection
        raise DownloadError(f'{url}: the connection broke after {written} bytes '
                            f'({type(error).__name__}: {one_line(error)}); {by_hand}') from None
    if expected is not None and written != expected:
        raise DownloadError(f'{url}: the download ended after {written} of {expected} bytes; {by_hand}')
    return digest.hexdigest()


def open_for_writing(path: str, by_hand: str):
    try:
        return open(path, 'wb', buffering=0)   # unbuffered: a full disk fails in write()
    except OSError as error:
        raise DownloadError(f'{path}: cannot write the download ({error.strerror}); {by_hand}') from None


def write(file, chunk: bytes, by_hand: str) -> None:
    remaining = memoryview(chunk)
    try:
        while remaining:              # an unbuffered write may write part of the chunk
            remaining = remaining[file.write(remaining):]
    except OSError as error:
        raise DownloadError(f'{file.name}: cannot write the download ({error.strerror}); {by_hand}') from None


class Progress:
    """A one-line progress bar on stderr (size, speed, time left), only when stderr is a terminal."""

    def __init__(self, name: str, total: Optional[int]):
        self.name = name
        self.total = total
        self.start = self.shown = time.monotonic()
        self.active = sys.stderr.isatty()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if not self.active or now - self.shown < PROGRESS_INTERVAL:
            return
        self.shown = now
        speed = done / max(now - self.start, 1e-9)
        if self.total:
            left = time.strftime('%H:%M:%S', time.gmtime((self.total - done) / max(speed, 1e-9)))
            width = shutil.get_terminal_size().columns
            line = (f'{self.name} {done / 2**20:.1f}/{self.total / 2**20:.1f} MB '
                    f'{speed / 2**20:.1f} MB/s {left} left')
            bar = max(0, width - len(line) - 4)
            filled = int(bar * done / self.total)
            line = f'{line} [{"#" * filled}{"." * (bar - filled)}]'
        else:
            line = f'{self.name} {done / 2**20:.1f} MB {speed / 2**20:.1f} MB/s'
        sys.stderr.write('\r' + line[:shutil.get_terminal_size().columns - 1])
        sys.stderr.flush()

    def close(self) -> None:
        if self.active and self.shown != self.start:
            sys.stderr.write('\n')
