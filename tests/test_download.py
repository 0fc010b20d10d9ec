"""The official weights by name (download.py, zoo.weights_file), against a real HTTP server on
127.0.0.1 that serves a B1-sized file in the official release layout, and misbehaves on demand:
a truncated body, 404/403/500, an HTML page, bytes that are not weights, the weights of another
model, a redirect loop or to another scheme, an answer that never comes, a body that stalls,
trickles or never ends, a length it never sends, a slow body to kill a download in. Each of
download.py's mechanisms (bytes, time, scheme, credentials, cache folder, side files) has one
test over every kind of input it guards."""
import base64
import contextlib
import hashlib
import http.server
import os
import pwd
import resource
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import paddle
import pytest
from PIL import Image

import download
import zoo
from conftest import REPO_ROOT, photo_like_array, tiny_state
from torch_files import paddle_to_torch, write_release
from weights import WeightsError, read_weights

NAME, FILE = 'CycleMLP_B1', 'CycleMLP_B1.pth'
SLOW_CHUNK, SLOW_PAUSE = 1 << 20, 0.05        # a B1-sized body over 3 s: time to stop it midway, even on a loaded machine
BOUND = 1 << 16                          # a tiny release's size bound (RELEASES patched)
HUGE = 10 ** 12                          # a terabyte, announced
USER, PASSWORD = 'alice', 's3cr@t'       # a mirror's credentials (the @ written %40 in the URL)


@pytest.fixture(scope='module')
def release(tmp_path_factory):
    """CycleMLP_B1.pth as the official release holds it ({'model': state dict}, PyTorch layout),
    with random weights, and a tiny model's file in the same layout (another model)."""
    root = tmp_path_factory.mktemp('release')
    paddle.seed(0)
    path = root / FILE
    write_release(path, paddle_to_torch(zoo.numpy_state(zoo.create_model('CycleMLP_B1'))))
    other = root / 'other.pth'
    write_release(other, paddle_to_torch(tiny_state(0, 1000)))
    return dict(path=path, data=path.read_bytes(), other=other.read_bytes())


class Handler(http.server.BaseHTTPRequestHandler):
    """GET /<behaviour>/<file>: what the behaviour sends (see `behaviours`)."""

    def do_GET(self):
        behaviour, _, file = self.path.strip('/').partition('/')
        self.server.requests.append(self.path)
        try:
            self.server.behaviours[behaviour](self, file)
        except (ConnectionError, TimeoutError):   # the client stopped reading, as it should
            pass

    def send_body(self, body: bytes, content_type='application/octet-stream', length=None, pause=0.0):
        self.send_response(200)
        self.send_header('Content-Type', content_type)
        self.send_header('Content-Length', str(len(body) if length is None else length))
        self.end_headers()
        for start in range(0, len(body), SLOW_CHUNK):
            self.wfile.write(body[start:start + SLOW_CHUNK])
            time.sleep(pause)

    def send_forever(self, length=None, chunked=False, step=1 << 16, pause=0.0, limit=1 << 30):
        """Zeros until the client hangs up (or `limit` bytes), announcing `length` or none."""
        self.send_response(200)
        self.send_header('Content-Type', 'application/octet-stream')
        if length is not None:
            self.send_header('Content-Length', str(length))
        if chunked:
            self.send_header('Transfer-Encoding', 'chunked')
        self.end_headers()
        for _ in range(limit // step):
            self.wfile.write(b'%x\r\n%s\r\n' % (step, bytes(step)) if chunked else bytes(step))
            self.wfile.flush()
            time.sleep(pause)

    def redirect(self, location):
        self.send_response(302)
        self.send_header('Location', location)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope='module')
def server(release):
    data = release['data']

    def good(handler, file):
        if file == FILE:
            handler.send_body(data)
        else:
            handler.send_error(404)

    def authorized(handler, file):
        expected = 'Basic ' + base64.b64encode(f'{USER}:{PASSWORD}'.encode()).decode()
        if handler.headers.get('Authorization') == expected:
            good(handler, file)
        else:
            handler.send_error(401)

    behaviours = {
        'good': good,
        'auth': authorized,
        'tiny': lambda handler, file: handler.send_body(b'weights'),
        'endless': lambda handler, file: handler.send_forever(),
        'chunked': lambda handler, file: handler.send_forever(chunked=True),
        'huge': lambda handler, file: handler.send_forever(length=HUGE),
        'longer': lambda handler, file: handler.send_forever(length=BOUND // 2),
        'stall': lambda handler, file: (handler.send_body(b'x' * 100, length=1000), time.sleep(3)),
        'trickle': lambda handler, file: handler.send_forever(length=1000, step=1, pause=0.5, limit=20),
        'to-file': lambda handler, file: handler.redirect('file:///dev/zero'),
        'to-ftp': lambda handler, file: handler.redirect(f'ftp://127.0.0.1:{handler.server.server_port}/{file}'),
        'slow': lambda handler, file: handler.send_body(data, pause=SLOW_PAUSE),
        'truncated': lambda handler, file: handler.send_body(data[:len(data) // 2], length=len(data)),
        'missing': lambda handler, file: handler.send_error(404),
        'forbidden': lambda handler, file: handler.send_error(403),
        'broken': lambda handler, file: handler.send_error(500),
        'html': lambda handler, file: handler.send_body(b'<html><body>Sign in</body></html>', 'text/html'),
        'garbage': lambda handler, file: handler.send_body(os.urandom(4096)),
        'other': lambda handler, file: handler.send_body(release['other']),
        'hang': lambda handler, file: time.sleep(3),
        'loop': lambda handler, file: (handler.send_response(302), handler.send_header('Location', handler.path),
                                       handler.end_headers()),
    }
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    httpd.daemon_threads = True
    httpd.behaviours, httpd.requests = behaviours, []
    thread = threading.Thread(target=httpd.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path, server, monkeypatch):
    """An empty cache folder and the mirror variable pointing at the server's 'good' files;
    returns (folder, set_behaviour)."""
    folder = tmp_path / 'cache'
    monkeypatch.setenv(download.CACHE_VARIABLE, str(folder))
    monkeypatch.setenv(download.TIMEOUT_VARIABLE, '0.2')
    server.requests.clear()

    def behave(behaviour):
        monkeypatch.setenv(download.MIRROR_VARIABLE, f'http://127.0.0.1:{server.server_port}/{behaviour}')
    behave('good')
    return folder, behave


def url(server, behaviour):
    return f'http://127.0.0.1:{server.server_port}/{behaviour}/{FILE}'


def environment(folder, server, behaviour='good'):
    env = {key: value for key, value in os.environ.items() if not key.startswith('CYCLEMLP_')}
    return {**env, download.CACHE_VARIABLE: str(folder), download.TIMEOUT_VARIABLE: '2',
            download.MIRROR_VARIABLE: f'http://127.0.0.1:{server.server_port}/{behaviour}',
            'PYTHONPATH': str(REPO_ROOT)}


def test_first_use_downloads_once_and_later_uses_read_the_cache(cache, server, release):
    folder, _ = cache
    path = zoo.weights_file(NAME)
    assert path == str(folder / FILE) and server.requests == [f'/good/{FILE}']
    assert Path(path).read_bytes() == release['data']
    digest = hashlib.sha256(release['data']).hexdigest()
    assert (folder / f'{FILE}.sha256').read_text() == f'{digest}  {FILE}\n'    # sha256sum's format
    assert sorted(os.listdir(folder)) == [f'.{FILE}.lock', FILE, f'{FILE}.sha256']
    model = zoo.create_model(NAME, pretrained=True)
    assert server.requests == [f'/good/{FILE}']                                # no second request
    expected, _ = zoo.read_state(str(release['path']))
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), expected[key], err_msg=key)


def test_predict_with_no_weights_flag_uses_the_official_b1(cache, server, tmp_path):
    folder, _ = cache
    photo = tmp_path / 'photo.jpg'
    Image.fromarray(photo_like_array(120, 90, 3)).save(photo)
    result = subprocess.run([sys.executable, str(REPO_ROOT / 'predict.py'), str(photo), '--topk', '2'],
                            capture_output=True, text=True, env=environment(folder, server), timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == str(photo) and len(lines) == 3
    names = open(REPO_ROOT / 'imagenet_classes.txt').read().splitlines()
    for line in lines[1:]:
        probability, index, label = re.fullmatch(r' {4}(\d\.\d{4}) +(\d+)  (.+)', line).groups()
        assert names[int(index)] == label
    assert server.requests == [f'/good/{FILE}'] and (folder / FILE).is_file()
    assert result.stderr == ''                   # no progress bar when stderr is not a terminal


@pytest.mark.parametrize('behaviour, problem', [
    ('truncated', r'the connection broke after \d+ bytes \(IncompleteRead|the download ended after \d+ of \d+ bytes'),
    ('missing', 'HTTP 404 Not Found'),
    ('forbidden', 'HTTP 403 Forbidden'),
    ('broken', 'HTTP 500 Internal Server Error'),
    ('html', r"not CycleMLP_B1's weights \(the file: not a weights file"),   # the structural check
    ('garbage', r"not CycleMLP_B1's weights \(the file: not a weights file"),
    ('other', r"not CycleMLP_B1's weights \(the file does not fit CycleNet \[2, 2, 4, 2\] .*missing keys"),
    ('loop', r'HTTP 302 The HTTP server returned a redirect error that would lead to an infinite loop'),
])
def test_each_failure_is_one_line_and_leaves_nothing(cache, server, behaviour, problem):
    folder, behave = cache
    behave(behaviour)
    assert_refused(lambda: zoo.weights_file(NAME), server, behaviour, problem, folder)


def assert_refused(call, server, behaviour, problem, folder):
    """call() raises a one-line DownloadError naming the URL, `problem` (a regex) and where to put
    the file by hand, and leaves no partial file and no record."""
    with pytest.raises(download.DownloadError) as error:
        call()
    message = str(error.value)
    assert '\n' not in message
    assert re.fullmatch(re.escape(f'{url(server, behaviour)}: ') + f'(?:{problem}).*'
                        + re.escape(f'; download {url(server, behaviour)} by hand and put it at {folder / FILE}'),
                        message), message
    assert os.listdir(folder) == [f'.{FILE}.lock']


def refuse_after_recording_size(sizes):
    """A structural check that records the size of the file it is given, then refuses it."""
    def check(path):
        sizes.append(os.path.getsize(path))
        raise WeightsError(f'{path}: not a weights file')
    return check


@pytest.mark.parametrize('behaviour, problem', [
    ('endless', rf"more than the {BOUND} bytes CycleMLP_B1's file can have"),
    ('chunked', rf"more than the {BOUND} bytes CycleMLP_B1's file can have"),
    ('huge', rf"more than the {BOUND} bytes CycleMLP_B1's file can have"),      # a terabyte announced
    ('longer', r"not CycleMLP_B1's weights \(the file: not a weights file\)"),   # only what it announced is read
])
def test_a_download_never_holds_more_than_its_bound(cache, server, monkeypatch, behaviour, problem):
    folder, behave = cache
    behave(behaviour)
    monkeypatch.setitem(download.RELEASES, NAME, (FILE, BOUND))
    sizes = []
    assert_refused(lambda: download.official_weights(NAME, refuse_after_recording_size(sizes)),
                   server, behaviour, problem, folder)
    assert sizes == ([BOUND // 2] if behaviour == 'longer' else [])


@pytest.mark.parametrize('behaviour, variables, problem', [
    ('hang', {}, r'no data for 0.2 s after 0 bytes|cannot connect \(no answer within 0.2 s\)'),
    ('stall', {}, r'no data for 0.2 s after 100 bytes'),
    ('trickle', {download.TIMEOUT_VARIABLE: '2', download.DEADLINE_VARIABLE: '1'},
     r'not finished within 1 s \([1-4] bytes in; CYCLEMLP_DEADLINE allows more\)'),
])
def test_a_download_is_bounded_in_time(cache, server, monkeypatch, behaviour, variables, problem):
    """No byte for CYCLEMLP_TIMEOUT seconds (0.2 here) is an error, and so is a byte every half
    second, past the deadline."""
    folder, behave = cache
    behave(behaviour)
    for variable, value in variables.items():
        monkeypatch.setenv(variable, value)
    start = time.monotonic()
    assert_refused(lambda: zoo.weights_file(NAME), server, behaviour, problem, folder)
    assert time.monotonic() - start < 2.5


@pytest.mark.parametrize('variable', [download.TIMEOUT_VARIABLE, download.DEADLINE_VARIABLE])
@pytest.mark.parametrize('value', ['soon', '0', '-1', '1e-400', 'nan', 'inf', '1e300', '9' * 400])
def test_time_settings_are_checked_in_one_line(cache, monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(download.DownloadError) as error:
        zoo.weights_file(NAME)
    assert str(error.value) == (f'{variable}={value[:40]!r}: expected a number of seconds above 0 '
                                'and at most 604800')


@pytest.mark.parametrize('mirror, problem', [
    ('file:///dev/zero', "CYCLEMLP_MIRROR='file:///dev/zero': expected an http:// or https:// URL"),
    ('ftp://127.0.0.1/v0.1', "CYCLEMLP_MIRROR='ftp://127.0.0.1/v0.1': expected an http:// or https:// URL"),
    ('127.0.0.1:{port}/good', "CYCLEMLP_MIRROR='127.0.0.1:{port}/good': expected an http:// or https:// URL"),
    ('localhost:{port}/good', "CYCLEMLP_MIRROR='localhost:{port}/good': expected an http:// or https:// URL"),
    ('http:///good', "CYCLEMLP_MIRROR='http:///good': expected an http:// or https:// URL"),
    ('http://127.0.0.1:x/good', 'CYCLEMLP_MIRROR: not a URL (Port could not be cast to integer value as '),
    ('{server}/to-file', "{server}/to-file/CycleMLP_B1.pth: HTTP 302 Found - Redirection to url 'file:///dev/zero' is not allowed; "),
    ('{server}/to-ftp', '{server}/to-ftp/CycleMLP_B1.pth: cannot connect (unknown url type: ftp); '),
], ids=['file', 'ftp', 'no scheme', 'host as scheme', 'no host', 'bad port', 'redirect to file', 'redirect to ftp'])
def test_only_http_is_spoken(cache, server, monkeypatch, mirror, problem):
    folder, _ = cache
    fill = dict(port=server.server_port, server=f'http://127.0.0.1:{server.server_port}')
    monkeypatch.setenv(download.MIRROR_VARIABLE, mirror.format(**fill))
    with pytest.raises(download.DownloadError) as error:
        zoo.weights_file(NAME)
    assert str(error.value).startswith(problem.format(**fill)) and '\n' not in str(error.value), str(error.value)
    assert not folder.exists() or os.listdir(folder) == [f'.{FILE}.lock']


@pytest.mark.parametrize('mirror', [
    '{server}/auth', '{server}/missing', '{server}/html', '{server}/garbage', '{server}/truncated',
    '{server}/hang', '{server}/endless', '{server}/to-ftp', 'ftp://{credentials}@127.0.0.1/v0.1',
    '{credentials}@127.0.0.1:{port}/good', 'http://{credentials}@127.0.0.1:x/good', 'http://{credentials}@[::1/good',
])
def test_mirror_credentials_are_used_and_never_printed(cache, server, monkeypatch, capsys, mirror):
    """user:password@ in the mirror is sent as basic authentication ('auth' requires it) and
    appears in no message, progress line or error, whatever goes wrong."""
    folder, _ = cache
    credentials = f'{USER}:{PASSWORD.replace("@", "%40")}'
    monkeypatch.setenv(download.MIRROR_VARIABLE, mirror.format(
        server=f'http://{credentials}@127.0.0.1:{server.server_port}', credentials=credentials,
        port=server.server_port))
    monkeypatch.setitem(download.RELEASES, NAME, (FILE, 80 << 20) if 'auth' in mirror else (FILE, BOUND))
    monkeypatch.setattr(download, 'PROGRESS_INTERVAL', 0.0)
    monkeypatch.setattr(sys.stderr, 'isatty', lambda: True)       # the progress line is shown
    try:
        zoo.weights_file(NAME)
        message = ''
    except download.DownloadError as error:
        message = str(error)
    printed = capsys.readouterr()
    assert (message == '') == ('auth' in mirror), message
    assert f'{FILE} ' in printed.err or 'auth' not in mirror     # the progress line was shown
    for text in (message, printed.out, printed.err):
        assert USER not in text and 's3cr' not in text, text


def test_no_server_is_one_line_from_the_command_line(tmp_path, server):
    """Offline: nothing listens on the mirror's port. The command prints one line, exit code 1."""
    closed = http.server.HTTPServer(('127.0.0.1', 0), Handler)
    port = closed.server_port
    closed.server_close()
    env = environment(tmp_path / 'cache', server)
    env[download.MIRROR_VARIABLE] = f'http://127.0.0.1:{port}'
    result = subprocess.run([sys.executable, str(REPO_ROOT / 'convert_weights.py'), NAME, str(tmp_path / 'b1.pdparams')],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1 and result.stdout == ''
    assert re.fullmatch(rf'error: http://127.0.0.1:{port}/{FILE}: cannot connect \(.*refused\); download '
                        rf'.* by hand and put it at {re.escape(str(tmp_path / "cache" / FILE))}\n', result.stderr)


def test_a_damaged_cache_is_downloaded_again(cache, server, capsys):
    folder, behave = cache
    path = Path(zoo.weights_file(NAME))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1                            # one bit flipped in a weight
    path.write_bytes(bytes(data))
    assert zoo.weights_file(NAME) == str(path)
    assert server.requests == [f'/good/{FILE}'] * 2
    assert 'does not match its recorded sha256 (damaged): downloading it again' in capsys.readouterr().err
    assert hashlib.sha256(path.read_bytes()).hexdigest() == (folder / f'{FILE}.sha256').read_text().split()[0]
    path.write_bytes(bytes(data))                         # damaged again, and now offline
    behave('missing')
    for _ in range(2):                                    # still found damaged, not used
        with pytest.raises(download.DownloadError, match=f'HTTP 404 .* put it at {re.escape(str(path))}'):
            zoo.weights_file(NAME)
    assert path.read_bytes() == bytes(data)               # replaced only by a checked download


def test_a_file_put_into_the_cache_by_hand_is_checked_and_recorded(cache, server, release):
    folder, _ = cache
    folder.mkdir()
    (folder / FILE).write_bytes(release['data'])
    assert zoo.weights_file(NAME) == str(folder / FILE) and server.requests == []
    assert (folder / f'{FILE}.sha256').read_text().startswith(hashlib.sha256(release['data']).hexdigest())
    (folder / f'{FILE}.sha256').unlink()
    (folder / FILE).write_bytes(release['other'])           # another model, put there by hand
    with pytest.raises(download.DownloadError, match=f'{re.escape(str(folder / FILE))} does not fit CycleNet.*; '
                                                     f'delete {re.escape(str(folder / FILE))} to download it again'):
        zoo.weights_file(NAME)


def test_a_cache_folder_that_cannot_be_written(cache, server, release, tmp_path, monkeypatch):
    monkeypatch.setenv(download.CACHE_VARIABLE, str(REPO_ROOT / 'README.md' / 'cache'))   # under a file
    with pytest.raises(download.DownloadError, match=r'cache folder .*README.md/cache: Not a directory; set '
                                                     r'CYCLEMLP_CACHE to a writable folder, or download .* by hand'):
        zoo.weights_file(NAME)
    folder = tmp_path / 'read-only'
    folder.mkdir()
    monkeypatch.setenv(download.CACHE_VARIABLE, str(folder))
    with read_only(folder):
        with pytest.raises(download.DownloadError, match=rf'read-only/\.{FILE}\.lock: cannot open \((Permission '
                                                         r'denied|Operation not permitted)\); set CYCLEMLP_CACHE'):
            zoo.weights_file(NAME)
    (folder / FILE).write_bytes(release['data'])
    with read_only(folder):                               # a read-only cache with the file: used
        assert zoo.weights_file(NAME) == str(folder / FILE)
    (folder / f'{FILE}.sha256').write_text(f'{"0" * 64}  {FILE}\n')     # ... but not when damaged
    with read_only(folder):
        with pytest.raises(download.DownloadError, match=r'does not match its recorded sha256 \(damaged\); set '
                                                         'CYCLEMLP_CACHE to a writable folder, or download'):
            zoo.weights_file(NAME)
    assert server.requests == []


class read_only:
    """The folder read-only, for root too: the immutable attribute (chattr +i) as root, else
    its mode."""

    def __init__(self, folder):
        self.folder = folder

    def __enter__(self):
        if os.geteuid() == 0:
            subprocess.run(['chattr', '+i', str(self.folder)], check=True)
        else:
            self.folder.chmod(0o555)

    def __exit__(self, *exc):
        if os.geteuid() == 0:
            subprocess.run(['chattr', '-i', str(self.folder)], check=True)
        else:
            self.folder.chmod(0o755)


# A process that needs the official weights; the check is the safe reader's (no Paddle import).
FETCH = '''
import sys, download, weights
try:
    print(download.official_weights(sys.argv[1], lambda path: weights.read_weights(path)), flush=True)
except download.DownloadError as error:
    sys.exit(f'error: {error}')
'''


def test_processes_that_need_the_file_at_once_download_it_once(tmp_path, server):
    env = environment(tmp_path / 'cache', server, 'slow')
    processes = [subprocess.Popen([sys.executable, '-c', FETCH, NAME], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=60) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert [out.strip() for out, _ in outputs] == [str(tmp_path / 'cache' / FILE)] * 2
    assert server.requests == [f'/slow/{FILE}']


@pytest.mark.parametrize('stop', [signal.SIGKILL, signal.SIGINT, signal.SIGTERM],
                         ids=['kill -9', 'Ctrl-C (library)', 'SIGTERM (command)'])
def test_a_download_stopped_midway_never_becomes_the_file(tmp_path, server, stop):
    """kill -9 leaves a temporary file the next run removes; Ctrl-C in a program using the
    library and SIGTERM to a command (one line, exit 143) remove it on the way out."""
    folder = tmp_path / 'cache'
    command = ([sys.executable, str(REPO_ROOT / 'convert_weights.py'), NAME, str(tmp_path / 'b1.pdparams')]
               if stop == signal.SIGTERM else [sys.executable, '-c', FETCH, NAME])
    # Ctrl-C as a terminal delivers it: SIGINT at its default, whatever this process inherited
    # (a shell's background job, such as a CI script run with &, ignores it, and so would the child).
    process = subprocess.Popen(command, env=environment(folder, server, 'slow'), stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 30
    while not any(name.endswith('.tmp') and (folder / name).stat().st_size > 0
                  for name in (os.listdir(folder) if folder.exists() else [])) and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=30)
    if stop == signal.SIGTERM:
        assert (process.returncode, stderr) == (128 + signal.SIGTERM, 'interrupted\n')
    else:
        assert process.returncode == -stop or (stop == signal.SIGINT and 'KeyboardInterrupt' in stderr)
    left = [name for name in os.listdir(folder) if name.endswith('.tmp')]
    assert FILE not in os.listdir(folder) and len(left) == (1 if stop == signal.SIGKILL else 0)
    result = subprocess.run([sys.executable, '-c', FETCH, NAME], env=environment(folder, server),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(folder)) == [f'.{FILE}.lock', FILE, f'{FILE}.sha256']   # the stale part is gone
    read_weights(folder / FILE)


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, server):
    """A file size limit of 1 MiB (ulimit -f; SIGXFSZ ignored, so the write fails as on a full disk)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    folder = tmp_path / 'cache'
    result = subprocess.run([sys.executable, '-c', FETCH, NAME], env=environment(folder, server), preexec_fn=limit,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert re.fullmatch(rf'error: {re.escape(str(folder))}/\.{FILE}\.[^/]+\.tmp: cannot write the download '
                        rf'\(File too large\); download .* by hand and put it at {re.escape(str(folder / FILE))}\n',
                        result.stderr), result.stderr
    assert os.listdir(folder) == [f'.{FILE}.lock']


def test_names_and_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsError, match=r"CycleMLP_B9: no such file \(and not a model name: CycleMLP_B1, "):
        zoo.weights_file('CycleMLP_B9')
    Path(NAME).write_bytes(b'')                     # an existing path always means the file
    assert zoo.weights_file(NAME) == NAME
    monkeypatch.delenv(download.MIRROR_VARIABLE, raising=False)
    assert download._source('CycleMLP_B5')[0] == 'https://github.com/ShoufaChen/CycleMLP/releases/download/v0.1/CycleMLP_B5.pth'
    with pytest.raises(ValueError, match='pretrained means the official weights'):
        zoo.create_model(NAME, pretrained=True, weights='x.pth')


NO_HOME = ('cache folder {}: no home folder to expand ~ into; set CYCLEMLP_CACHE to a folder')


@pytest.mark.parametrize('variables, home_in_user_database, expected', [
    ({'HOME': '{tmp}/home'}, True, '{tmp}/home/.cache/paddle/cyclemlp'),
    ({'XDG_CACHE_HOME': '{tmp}/xdg'}, False, '{tmp}/xdg/paddle/cyclemlp'),
    ({'PADDLE_HOME': '{tmp}/paddle'}, False, '{tmp}/paddle/cyclemlp'),
    ({'PADDLE_HOME': 'paddle'}, False, '{tmp}/work/paddle/cyclemlp'),
    ({'CYCLEMLP_CACHE': 'weights'}, False, '{tmp}/work/weights'),
    ({}, True, pwd.getpwuid(os.getuid()).pw_dir + '/.cache/paddle/cyclemlp'),
    ({}, False, NO_HOME.format('~/.cache/paddle/cyclemlp')),
    ({'CYCLEMLP_CACHE': '~/weights'}, False, NO_HOME.format('~/weights')),
], ids=['HOME', 'XDG_CACHE_HOME', 'PADDLE_HOME', 'relative PADDLE_HOME', 'relative cache', 'no HOME, user database',
        'no home at all', '~ in the cache, no home'])
def test_the_cache_folder_is_absolute(cache, tmp_path, monkeypatch, variables, home_in_user_database, expected):
    """From the working folder tmp/work, with HOME unset unless given: the folder, made absolute,
    or one line; never a relative '~' folder."""
    _, behave = cache
    for variable in ('HOME', 'XDG_CACHE_HOME', 'PADDLE_HOME', download.CACHE_VARIABLE):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in variables.items():
        monkeypatch.setenv(variable, value.format(tmp=tmp_path))
    if not home_in_user_database:
        monkeypatch.setattr(pwd, 'getpwuid', lambda uid: (_ for _ in ()).throw(KeyError(uid)))
    (tmp_path / 'work').mkdir()
    monkeypatch.chdir(tmp_path / 'work')
    expected = expected.format(tmp=tmp_path)
    if not expected.startswith('/'):
        with pytest.raises(download.DownloadError) as error:
            zoo.weights_file(NAME)
        assert str(error.value) == expected
        assert os.listdir(tmp_path / 'work') == []
        return
    assert download.cache_folder() == expected
    if expected.startswith(str(tmp_path)):                  # downloads there, and names it absolutely
        behave('tiny')
        assert download.official_weights(NAME, lambda path: None) == f'{expected}/{FILE}'
        assert Path(expected, FILE).read_bytes() == b'weights'


@contextlib.contextmanager
def within(seconds):
    """The block fails with TimeoutError if it takes longer (a hang, not a slow test), raised
    again every second in case code under test catches it as an OSError."""
    def expire(*_):
        raise TimeoutError(f'still running after {seconds} s')
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize('side_file', [f'{FILE}.sha256', f'.{FILE}.lock'], ids=['record', 'lock'])
@pytest.mark.parametrize('kind, problem', [
    ('fifo', 'not a regular file'), ('symlink to /dev/zero', 'not a regular file'),
    ('oversized', '4294967296 bytes, more than the 4096 it may hold')])
def test_the_cache_side_files_are_checked_before_use(cache, server, side_file, kind, problem):
    """A FIFO, a device or a huge file where the cache keeps its record or lock is one line, at
    once (the same open-and-check as every weights file's); nothing is downloaded. The record is
    read only when the cached file exists."""
    folder, _ = cache
    folder.mkdir()
    if side_file.endswith('.sha256'):
        (folder / FILE).write_bytes(b'weights')
    target = folder / side_file
    if kind == 'fifo':
        os.mkfifo(target)
    elif kind == 'symlink to /dev/zero':
        target.symlink_to('/dev/zero')
    else:
        with open(target, 'wb') as file:
            file.truncate(1 << 32)                             # 4 GiB, sparse
    with within(10), pytest.raises(WeightsError) as error:
        download.official_weights(NAME, lambda path: None)
    assert str(error.value).startswith(f'{target}: {problem}')
    assert server.requests == []
