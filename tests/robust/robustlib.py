"""Helpers of the robustness suite (Python 3 stdlib only): starting build/cogvlm-server on
a loopback port, raw HTTP over sockets, Prometheus parsing, /proc memory figures, images
written by hand (zlib + struct), result lines. What the three Python suites share lives in
tests/lib/cvlmtest.py; the names the tests use from it are re-exported here.

Every server started here dies with the test process (PR_SET_PDEATHSIG) and is killed at
exit and on SIGTERM/SIGINT/SIGHUP, so a failing or interrupted test leaves nothing behind.

Environment (the same names as tests/api): COGVLM_SERVER_BIN (default build/cogvlm-server),
COGVLM_SHARED_DATA (default ../shared/data), COGVLM_TEST_MODEL, COGVLM_TEST_TOKENIZER,
COGVLM_ROBUST_LOGS (keep the daemons' logs there; default a temporary directory that is
removed unless a test failed).
"""
import atexit
import ctypes
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
import cvlmtest  # noqa: E402
from cvlmtest import (HOST, REPO, SHARED, Resp, data_url, png, png_bomb,  # noqa: E402,F401
                      png_claiming, request_bytes)

# Absolute: the servers run with cwd REPO. The model is the random-weight golden one: its
# greedy outputs run to max_tokens without an EOS, which the overload and timeout tests
# rely on for long generations.
SERVER_BIN = cvlmtest.SERVER_BIN.absolute()
MODEL_DIR = cvlmtest.MODEL_DIR.absolute()
TOKENIZER = cvlmtest.TOKENIZER.absolute()
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MiB = 1024 * 1024

_servers = []
_log_dir = None
_keep_logs = bool(os.environ.get("COGVLM_ROBUST_LOGS"))


def log_dir():
    global _log_dir
    if _log_dir is None:
        d = os.environ.get("COGVLM_ROBUST_LOGS")
        if d:
            Path(d).mkdir(parents=True, exist_ok=True)
            _log_dir = Path(d)
        else:
            _log_dir = Path(tempfile.mkdtemp(prefix="cogvlm-robust-"))
    return _log_dir


def _cleanup():
    for s in list(_servers):
        s.kill()
    if _log_dir is not None and not _keep_logs:
        shutil.rmtree(_log_dir, ignore_errors=True)


def _on_signal(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through finally blocks, then atexit


atexit.register(_cleanup)
for _sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(_sig, _on_signal)


def raise_fd_limit(want):
    """Raises the soft RLIMIT_NOFILE towards `want`; returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def sanitized_build():
    """True when SERVER_BIN is built with AddressSanitizer (`make asan`): RSS figures are
    then dominated by shadow memory and valgrind cannot run it."""
    try:
        with open(SERVER_BIN, "rb") as f:
            return b"__asan_init" in f.read()
    except OSError:
        return False


try:  # resolved before any fork: the child must not dlopen (another thread may hold its lock)
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _PRCTL = None


def _die_with_parent():
    """preexec_fn: the child gets SIGKILL when the test process dies, however it dies
    (strictly: when the forking thread ends, so servers are started from the main thread)."""
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG


# ------------------------------------------------------------------------- results
class Check:
    """Collects failed checks and measured numbers of one test; `finish()` prints its
    one-line result."""

    def __init__(self, name):
        self.name = name
        self.failures = []
        self.numbers = []

    def ok(self, cond, what):
        if not cond:
            self.failures.append(what)
            print(f"  FAIL {self.name}: {what}", file=sys.stderr, flush=True)
        return bool(cond)

    def note(self, text):
        self.numbers.append(text)

    def finish(self):
        status = "PASS" if not self.failures else "FAIL"
        nums = "; ".join(self.numbers)
        print(f"{status} {self.name}: {nums}", flush=True)
        if self.failures:
            print(f"  {self.name}: {len(self.failures)} check(s) failed: "
                  + " | ".join(self.failures[:8]), flush=True)
        return 0 if not self.failures else 1


def known(chk, known_issues, name, cond, what):
    """A check that may fail because of a known, reported server bug: listed in
    `known_issues`, a failure is printed as XFAIL (and noted) instead of failing the test,
    unless COGVLM_ROBUST_STRICT=1; a pass is printed as XPASS (then drop it from the list)."""
    if name in known_issues and not os.environ.get("COGVLM_ROBUST_STRICT"):
        if cond:
            print(f"  XPASS {name}: passes now; remove it from KNOWN_ISSUES", flush=True)
        else:
            print(f"  XFAIL {name}: {what}", flush=True)
            if f"XFAIL {name}" not in chk.numbers:
                chk.note(f"XFAIL {name}")
        return cond
    return chk.ok(cond, f"{name}: {what}")


def main(name, fn):
    """Runs fn(check), turning any exception into a failure; exits 0/1."""
    chk = Check(name)
    try:
        fn(chk)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - reported
        import traceback
        traceback.print_exc()
        chk.ok(False, f"exception: {type(e).__name__}: {str(e)[:600]}")
    rc = chk.finish()
    global _keep_logs
    if rc and _log_dir is not None:
        _keep_logs = True
        print(f"  {name}: server logs kept in {_log_dir}", flush=True)
    for s in list(_servers):
        s.kill()
    sys.exit(rc)


# ------------------------------------------------------------------------- raw HTTP
def read_response(sock, deadline):
    """Reads one HTTP/1.1 response (Content-Length, chunked or close-delimited)."""
    buf = b""

    def fill():
        nonlocal buf
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        d = sock.recv(65536)
        if not d:
            raise EOFError("connection closed")
        buf += d

    while b"\r\n\r\n" not in buf:
        fill()
    head, buf = buf.split(b"\r\n\r\n", 1)
    status, headers = cvlmtest.parse_head(head)
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(buf) < n:
            fill()
        return Resp(status, headers, buf[:n])
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = b""
        while True:
            while b"\r\n" not in buf:
                fill()
            size_line, buf = buf.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            while len(buf) < size + 2:
                fill()
            body += buf[:size]
            buf = buf[size + 2:]
            if size == 0:
                return Resp(status, headers, body)
    try:
        while True:
            fill()
    except EOFError:
        pass
    return Resp(status, headers, buf)


def http(port, method, path, body=None, headers=None, timeout=60):
    """One request on a fresh connection (Connection: close)."""
    hh = {"Connection": "close"}
    hh.update(headers or {})
    deadline = time.monotonic() + timeout
    s = socket.create_connection((HOST, port), timeout=timeout)
    try:
        s.sendall(request_bytes(method, path, body, hh, port))
        return read_response(s, deadline)
    finally:
        s.close()


def check_error_body(resp, status=None):
    """An OpenAI-style error: {"error": {"message": str, "type": str, "param", "code"}}."""
    if status is not None and resp.status != status:
        return f"status {resp.status}, expected {status}: {resp.body[:200]!r}"
    if not resp.headers.get("content-type", "").startswith("application/json"):
        return f"error content-type {resp.headers.get('content-type')!r}"
    try:
        err = resp.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"not an OpenAI error body: {resp.body[:200]!r}"
    if not (isinstance(err, dict) and isinstance(err.get("message"), str) and err["message"]
            and isinstance(err.get("type"), str) and "param" in err and "code" in err):
        return f"error object incomplete: {err!r}"
    return None


# `data:` payloads of an SSE body (the last one "[DONE]"); raises if the framing is wrong.
sse_payloads = cvlmtest.sse_events


# ------------------------------------------------------------------------- metrics
def parse_metrics(text):
    """[(name, {labels}, value)] of a Prometheus text exposition (a bad line raises)."""
    return list(cvlmtest.metric_samples(text, strict=True))


def metric(samples, name, **labels):
    return sum(v for n, lab, v in samples
               if n == name and all(lab.get(k) == w for k, w in labels.items()))


def http_counts(samples):
    """{(route, status): n} of cogvlm_http_requests_total."""
    return {(lab["route"], int(lab["status"])): v for n, lab, v in samples
            if n == "cogvlm_http_requests_total"}


# ------------------------------------------------------------------------- /proc
def proc_status(pid):
    """VmRSS, VmHWM, Threads of a process (KiB for the Vm* fields)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for ln in f:
            k, _, v = ln.partition(":")
            if k in ("VmRSS", "VmHWM", "Threads"):
                out[k] = int(v.split()[0])
    return out


def open_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


class RssPeak:
    """Samples the server's VmRSS every `interval` s in a thread while in a `with` block;
    .kib is the highest value seen (starting from `start`)."""

    def __init__(self, srv, interval, start=0):
        self.srv, self.interval, self.kib = srv, interval, start
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.kib = max(self.kib, self.srv.status()["VmRSS"])
            except OSError:
                return
            self._stop.wait(self.interval)

    def __enter__(self):
        self._th.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._th.join(2)


def tcp_sockets(tx_queue=False):
    """(local port, remote port, state) of every TCP socket in /proc/net/tcp{,6}; the state
    in hex as there: 01 ESTABLISHED, 04 FIN_WAIT1, 08 CLOSE_WAIT, ... With tx_queue, a
    fourth item: the bytes written by the socket's owner that the peer has not acked."""
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                rows = f.readlines()[1:]
        except OSError:
            continue
        for ln in rows:
            parts = ln.split()
            row = (int(parts[1].rsplit(":", 1)[1], 16), int(parts[2].rsplit(":", 1)[1], 16),
                   parts[3])
            yield row + (int(parts[4].split(":")[0], 16),) if tx_queue else row


def tcp_state(local_port, remote_port=None):
    """TCP state of the loopback socket with this local (and remote) port, or None."""
    for lp, rp, state in tcp_sockets():
        if lp == local_port and (remote_port is None or rp == remote_port):
            return state
    return None


def tcp_tx_queue(local_port, remote_port):
    """(state, unacked bytes queued for sending) of the loopback socket with these ports, or
    (None, None) when there is none."""
    for lp, rp, state, txq in tcp_sockets(tx_queue=True):
        if lp == local_port and rp == remote_port:
            return state, txq
    return None, None


def tcp_established(port):
    """Server-side ESTABLISHED sockets on our listening port."""
    return sum(1 for lp, _, state in tcp_sockets() if lp == port and state == "01")


# ------------------------------------------------------------------------- images
# (png, png_claiming and png_bomb come from cvlmtest)
def gif_claiming(width, height):
    """A GIF89a whose screen and image descriptor claim width x height, 1 byte of LZW data."""
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
            + b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00;")


def jpeg_claiming(width, height):
    """A baseline JPEG header (SOI, DQT, SOF0, DHT, SOS) claiming width x height, no scan data."""
    dqt = b"\xff\xdb" + struct.pack(">H", 67) + b"\x00" + bytes([1] * 64)
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    dht = (b"\xff\xc4" + struct.pack(">H", 3 + 16 + 1) + b"\x00" + bytes([1] + [0] * 15) + b"\x00")
    sos = b"\xff\xda" + struct.pack(">HB", 8, 1) + b"\x01\x00" + b"\x00\x3f\x00"
    return b"\xff\xd8" + dqt + sof + dht + sos + b"\x00" * 16 + b"\xff\xd9"


def webp_claiming(width, height):
    """A lossless WebP (VP8L) header claiming width x height (each at most 16384)."""
    bits = (width - 1) | ((height - 1) << 14)
    vp8l = b"\x2f" + struct.pack("<I", bits) + b"\x00" * 8
    chunk = b"VP8L" + struct.pack("<I", len(vp8l)) + vp8l
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def chat(model, text="hi", image=None, mime="image/png", **kw):
    """A chat request body; image is a URL (str) or the image's bytes (sent as a data URL)."""
    if image is not None and not isinstance(image, str):
        image = data_url(image, mime)
    return cvlmtest.chat_body(model, text, image, **kw)


# ------------------------------------------------------------------------- the daemon
class Server(cvlmtest.ServerProcess):
    """build/cogvlm-server on an ephemeral loopback port (--port 0; the port is read from
    its `listening on http://HOST:PORT` log line)."""

    tail_lines = 30

    def __init__(self, name, args=None, wrapper=None, env=None):
        self.name = name
        self.args = {"--host": HOST, "--port": "0", "--model": str(MODEL_DIR),
                     "--tokenizer": str(TOKENIZER), "--threads": "1", "--log-level": "info"}
        self.args.update(args or {})
        self.wrapper = list(wrapper or [])
        self.env = dict(env or {})
        self.proc = None
        self.port = None
        self.log_path = log_dir() / f"{name}.log"
        self.model_id = MODEL_DIR.name

    def argv(self):
        argv = self.wrapper + [str(SERVER_BIN)]
        for k, v in self.args.items():
            argv += [k, str(v)]
        return argv

    @property
    def pid(self):
        return self.proc.pid

    def start(self, timeout=60):
        if not SERVER_BIN.exists():
            raise RuntimeError(f"{SERVER_BIN} is missing: run `make` first")
        env = cvlmtest.server_env(self.env)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                         preexec_fn=_die_with_parent)
        _servers.append(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while "
                                   f"starting; log:\n{self.log_tail()}")
            if self.port is None:
                self.port = cvlmtest.listening_port(self.log_text())
            if self.port:
                try:
                    if http(self.port, "GET", "/health", timeout=5).status == 200:
                        return self
                except OSError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: not healthy within {timeout}s; log:\n{self.log_tail()}")

    def http(self, method, path, body=None, headers=None, timeout=60):
        return http(self.port, method, path, body, headers, timeout)

    def post(self, body, path=CHAT, timeout=60):
        return http(self.port, "POST", path, body, timeout=timeout)

    def metrics(self):
        r = http(self.port, "GET", "/metrics", timeout=15)
        if r.status != 200:
            raise AssertionError(f"/metrics: {r!r}")
        return parse_metrics(r.body.decode())

    def healthy(self, timeout=10):
        """(ok, reason): the process lives and GET /health answers 200 {"status":"ok"}."""
        if not self.alive():
            return False, f"{self.name} died (rc {self.proc.returncode}): {self.log_tail(8)}"
        try:
            r = http(self.port, "GET", "/health", timeout=timeout)
        except OSError as e:
            return False, f"/health: {e!r}"
        if r.status != 200:
            return False, f"/health: {r!r}"
        return True, ""

    def wait_idle(self, timeout=20):
        """Waits for running == waiting == kv_blocks_used == 0; returns the last samples."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if (metric(m, "cogvlm_requests_running") == 0 and metric(m, "cogvlm_requests_waiting") == 0
                    and metric(m, "cogvlm_kv_blocks_used") == 0):
                return m
            if time.monotonic() > deadline:
                return m
            time.sleep(0.1)

    def status(self):
        return proc_status(self.proc.pid)

    def stop(self, timeout=30):
        """SIGTERM and wait; returns the exit status (None if it had to be killed)."""
        if not self.alive():
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        if self in _servers:
            _servers.remove(self)


def in_threads(fns, timeout):
    """Runs each fn in a daemon thread; returns [(value, exception)] in order once all are
    done or the timeout passed (a still-running one gives (None, TimeoutError))."""
    res = [(None, TimeoutError("still running"))] * len(fns)

    def run(i, fn):
        try:
            res[i] = (fn(), None)
        except BaseException as e:  # noqa: BLE001 - reported
            res[i] = (None, e)

    threads = [threading.Thread(target=run, args=(i, fn), daemon=True) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0, deadline - time.monotonic()))
    return res
