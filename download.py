"""The official CycleMLP weights by name, downloaded once into a cache folder, checked and reused.

The cache folder is $CYCLEMLP_CACHE, else paddle.hub's $PADDLE_HOME/cyclemlp (PADDLE_HOME:
$XDG_CACHE_HOME/paddle or ~/.cache/paddle), always absolute. Files come from the official release
or from $CYCLEMLP_MIRROR, an http(s) base URL serving the same names (user:password@ in it is sent
as basic authentication to that host only, never printed). The release publishes no checksums: a
download is bounded (its variant's size, $CYCLEMLP_TIMEOUT without progress, $CYCLEMLP_DEADLINE
overall), passes the caller's structural check, and only then takes its name; its sha256, recorded
beside it (NAME.sha256), is verified at every later use. A lock file lets one process download
while the others wait for its file.
"""
import base64
import contextlib
import fcntl
import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Optional, Tuple

from safe_io import (WeightsError, one_line, open_regular_file, printable, remove_stale_temporaries, sha256_of,
                     write_atomically)

RELEASE_URL = 'https://github.com/ShoufaChen/CycleMLP/releases/download/v0.1'
# name: (release file, the most bytes it can have). The bound is the variant's parameter count
# x 4 (float32) plus 4 MiB for the CycleFC offset buffers, the pickle and the zip headers.
RELEASES = {
    'CycleMLP_B1': ('CycleMLP_B1.pth', 15_155_400 * 4 + (4 << 20)),
    'CycleMLP_B2': ('CycleMLP_B2.pth', 26_802_504 * 4 + (4 << 20)),
    'CycleMLP_B3': ('CycleMLP_B3.pth', 38_385_720 * 4 + (4 << 20)),
    'CycleMLP_B4': ('CycleMLP_B4.pth', 51_796_552 * 4 + (4 << 20)),
    'CycleMLP_B5': ('CycleMLP_B5.pth', 75_747_280 * 4 + (4 << 20)),
}
CACHE_VARIABLE = 'CYCLEMLP_CACHE'
MIRROR_VARIABLE = 'CYCLEMLP_MIRROR'
TIMEOUT_VARIABLE = 'CYCLEMLP_TIMEOUT'
DEADLINE_VARIABLE = 'CYCLEMLP_DEADLINE'
DEFAULT_TIMEOUT = 30.0           # seconds to connect, and without a byte while reading
MIN_SPEED = 20_000               # bytes/s: the default deadline is a file's bound at this speed,
MIN_DEADLINE = 600.0             # and at least this many seconds
MAX_SECONDS = 7 * 86400.0        # a longer wait is a typo (and overflows the socket's timeout)
SIDE_FILE_BYTES = 4096           # NAME.sha256 holds one line, the lock file nothing
CHUNK = 1 << 20
PROGRESS_INTERVAL = 0.2          # seconds between progress line updates


class DownloadError(WeightsError):
    """Official weights that cannot be had: the URL, what went wrong, where to put the file by hand."""


def cache_folder() -> str:
    folder = os.environ.get(CACHE_VARIABLE) or os.path.join(os.environ.get('PADDLE_HOME') or os.path.join(
        os.environ.get('XDG_CACHE_HOME') or os.path.join('~', '.cache'), 'paddle'), 'cyclemlp')
    if os.path.expanduser(folder).startswith('~'):   # no HOME, and no home in the user database
        raise DownloadError(f'cache folder {printable(folder)}: no home folder to expand ~ into; '
                            f'set {CACHE_VARIABLE} to a folder')
    return os.path.abspath(os.path.expanduser(folder))


def _source(name: str) -> Tuple[str, Optional[str]]:
    """(the URL of variant name's file, without credentials; the Authorization header for a
    user:password@ in the mirror, else None), or DownloadError naming the variable."""
    base = os.environ.get(MIRROR_VARIABLE) or RELEASE_URL
    try:
        parts = urllib.parse.urlsplit(base)
        parts.port                              # a port that is not a number raises here
    except ValueError as error:
        raise DownloadError(f'{MIRROR_VARIABLE}: not a URL ({one_line(_redacted(error))})') from None
    if parts.scheme not in ('http', 'https') or not parts.hostname:
        raise DownloadError(f'{MIRROR_VARIABLE}={one_line(_redacted(base))!r}: expected an http:// or https:// URL')
    public = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition('@')[2]))
    url = f'{public.rstrip("/")}/{RELEASES[name][0]}'
    if parts.username is None:
        return url, None
    user = f'{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or "")}'
    return url, 'Basic ' + base64.b64encode(user.encode()).decode('ascii')


def _redacted(text) -> str:
    """text with every user:password@ (wherever a malformed URL has it) written ***@."""
    return re.sub(r'[^/@\s]*@', '***@', str(text))


def _seconds(variable: str, default: float) -> float:
    value = os.environ.get(variable)
    try:
        seconds = float(value) if value else default
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= MAX_SECONDS:
        raise DownloadError(f'{variable}={one_line(value, 40)!r}: expected a number of seconds above 0 '
                            f'and at most {MAX_SECONDS:g}')
    return seconds


def official_weights(name: str, check: Callable[[str], None]) -> str:
    """The path of the cached official weights of variant `name`, downloaded first if the cache
    lacks them or holds a damaged copy; check(path) raises WeightsError unless they are name's."""
    file_name = RELEASES[name][0]
    folder = cache_folder()
    path = os.path.join(folder, file_name)
    if _cached(path, check):
        return path
    by_hand = f'download {_source(name)[0]} by hand and put it at {path}'
    try:
        os.makedirs(folder, exist_ok=True)
        lock_path = os.path.join(folder, f'.{file_name}.lock')
        lock = open_regular_file(lock_path, SIDE_FILE_BYTES, os.O_RDWR | os.O_CREAT)
    except (OSError, WeightsError) as error:
        problem = (f'{path} does not match its recorded sha256 (damaged)' if os.path.isfile(path) else
                   f'cache folder {folder}: {error.strerror}' if isinstance(error, OSError) else error)
        raise DownloadError(f'{problem}; set {CACHE_VARIABLE} to a writable folder, or {by_hand}') from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)    # another process may be downloading it: wait for it
        if _cached(path, check):            # downloaded, or put there by hand, while this one waited
            return path
        if os.path.isfile(path):             # replaced once the new one is checked
            print(f'{printable(path)} does not match its recorded sha256 (damaged): downloading it again',
                  file=sys.stderr)
        remove_stale_temporaries(path)      # what downloads killed before their end left
        digest = write_atomically(path, lambda temporary: _download(name, temporary, check, by_hand))
        _write_record(path, digest)         # only a checked file took the name
    return path


def _cached(path: str, check: Callable[[str], None]) -> bool:
    """Whether the cache holds a good copy at path: one matching the sha256 recorded beside it, or,
    with none recorded (put there by hand), one that passes check (recorded where the cache is writable)."""
    if not os.path.isfile(path):
        return False
    record = path + '.sha256'
    if os.path.lexists(record):
        with open_regular_file(record, SIDE_FILE_BYTES) as file:
            words = file.read().split()
        if words and re.fullmatch(rb'[0-9a-f]{64}', words[0]):
            return sha256_of(path) == words[0].decode()
    try:
        check(path)
    except WeightsError as error:
        raise DownloadError(f'{error}; delete {path} to download it again') from None
    with contextlib.suppress(WeightsError):     # a read-only cache: checked at every use
        _write_record(path, sha256_of(path))
    return True


def _write_record(path: str, digest: str) -> None:
    line = f'{digest}  {os.path.basename(path)}\n'
    write_atomically(path + '.sha256', lambda temporary: Path(temporary).write_text(line, encoding='ascii'))


def _opener() -> urllib.request.OpenerDirector:
    """urllib's opener with its http(s) handlers only: a redirect to file:// or ftp:// fails."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler, urllib.request.UnknownHandler, urllib.request.HTTPHandler,
                    urllib.request.HTTPSHandler, urllib.request.HTTPRedirectHandler,
                    urllib.request.HTTPDefaultErrorHandler, urllib.request.HTTPErrorProcessor):
        opener.add_handler(handler())
    return opener


def _download(name: str, temporary: str, check: Callable[[str], None], by_hand: str) -> str:
    """Stream variant name's file into temporary within its bounds, then check it; its sha256."""
    url, authorization = _source(name)
    bound = RELEASES[name][1]
    seconds = _seconds(TIMEOUT_VARIABLE, DEFAULT_TIMEOUT)
    allowed = _seconds(DEADLINE_VARIABLE, max(MIN_DEADLINE, bound / MIN_SPEED))
    request = urllib.request.Request(url, headers={'User-Agent': 'cyclemlp-paddle'})
    if authorization:
        request.add_unredirected_header('Authorization', authorization)   # not sent on to a redirect
    digest, written, expected = hashlib.sha256(), 0, None
    start = shown = time.monotonic()
    try:
        with _opener().open(request, timeout=seconds) as response, open(temporary, 'wb', buffering=0) as file:
            expected = response.length           # the Content-Length http.client reads up to, or None
            while chunk := response.read1(CHUNK):   # what has arrived: a trickle meets the deadline
                written += len(chunk)
                if written > bound:                 # whatever the server announced
                    raise DownloadError(f'{url}: more than the {bound} bytes {name}\'s file can have; '
                                        f'{by_hand}')
                now = time.monotonic()
                if now > start + allowed:
                    raise DownloadError(f'{url}: not finished within {allowed:g} s ({written} bytes '
                                        f'in; {DEADLINE_VARIABLE} allows more); {by_hand}')
                digest.update(chunk)
                try:
                    while chunk:              # an unbuffered write may write part of the chunk
                        chunk = chunk[file.write(chunk):]
                except OSError as error:      # unbuffered: a full disk fails here, not at close
                    raise DownloadError(f'{temporary}: cannot write the download ({error.strerror}); '
                                        f'{by_hand}') from None
                if sys.stderr.isatty() and now - shown >= PROGRESS_INTERVAL:
                    shown = now
                    sys.stderr.write(f'\r{os.path.basename(url)} {written / 2**20:.1f}'
                                     f'{f"/{expected / 2**20:.1f}" if expected else ""} MB '
                                     f'{written / 2**20 / max(now - start, 1e-9):.1f} MB/s ')
    except DownloadError:
        raise
    except urllib.error.HTTPError as error:
        raise DownloadError(f'{url}: HTTP {error.code} {one_line(error.reason)}; {by_hand}') from None
    except urllib.error.URLError as error:
        reason = f'no answer within {seconds:g} s' if isinstance(error.reason, TimeoutError) else error.reason
        raise DownloadError(f'{url}: cannot connect ({one_line(reason)}); {by_hand}') from None
    except TimeoutError:
        raise DownloadError(f'{url}: no data for {seconds:g} s after {written} bytes; {by_hand}') from None
    except (http.client.HTTPException, OSError, ValueError) as error:   # a reset connection, a URL http.client refuses
        raise DownloadError(f'{url}: the download failed after {written} bytes '
                            f'({type(error).__name__}: {one_line(error)}); {by_hand}') from None
    finally:
        if shown != start:
            sys.stderr.write('\n')          # so that an error starts on a line of its own
    if expected is not None and written != expected:
        raise DownloadError(f'{url}: the download ended after {written} of {expected} bytes; {by_hand}')
    try:
        check(temporary)
    except WeightsError as error:
        detail = str(error).replace(temporary, 'the file')
        raise DownloadError(f'{url}: not {name}\'s weights ({detail}); {by_hand}') from None
    return digest.hexdigest()
