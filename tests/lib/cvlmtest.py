"""cvlmtest.py - the helpers that the Python test suites share (tests/api/apiutil.py,
tests/robust/robustlib.py, tests/deploy/deploylib.py import them and re-export what their
tests use): the paths of the build and the test model, free loopback ports, HTTP over
http.client or a raw socket, SSE framing, chat request bodies, hand-written PNGs,
Prometheus text samples and the pieces every daemon wrapper has (environment, log file,
the port read back from the log).

Written once here so that the three suites cannot drift apart on what a well-formed SSE
stream, a PNG or a server's clean environment is. Python 3 standard library only (the
robust and deploy suites install nothing). Everything here talks to 127.0.0.1 only.

Environment: COGVLM_SERVER_BIN (default build/cogvlm-server), COGVLM_SHARED_DATA (default
../shared/data), COGVLM_TEST_MODEL, COGVLM_TEST_TOKENIZER.
"""
import base64
import http.client
import json
import os
import re
import socket
import struct
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("COGVLM_SHARED_DATA") or (REPO.parent / "shared" / "data"))
SERVER_BIN = Path(os.environ.get("COGVLM_SERVER_BIN") or (REPO / "build" / "cogvlm-server"))
# The random-weight golden model: its greedy outputs run to max_tokens without an EOS.
MODEL_DIR = Path(os.environ.get("COGVLM_TEST_MODEL") or (SHARED / "golden-tiny" / "model-bf16"))
TOKENIZER = Path(os.environ.get("COGVLM_TEST_TOKENIZER") or (SHARED / "llama2-tokenizer.model"))
HOST = "127.0.0.1"


def free_port():
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------- HTTP
class Resp:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers  # dict, lower-case names
        self.body = body

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<{self.status} {self.headers.get('content-type')} {self.body[:400]!r}>"


def encode_body(body, headers):
    """body as bytes (or None): a JSON-able object is dumped, and then headers gets
    Content-Type: application/json unless it names one; a str is UTF-8 encoded."""
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body)
        headers.setdefault("Content-Type", "application/json")
    return body.encode() if isinstance(body, str) else body


def http_request(port, method, path, body=None, headers=None, timeout=60):
    """One request on a fresh http.client connection; body may be bytes, str or a
    JSON-able object. Returns a Resp."""
    h = dict(headers or {})
    body = encode_body(body, h)
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read()
        return Resp(r.status, {k.lower(): v for k, v in r.getheaders()}, data)
    finally:
        conn.close()


def request_bytes(method, path, body=None, headers=None, port=0):
    """The bytes of one HTTP/1.1 request (for raw sockets): Host first, then `headers`,
    then Content-Type (JSON bodies) and Content-Length when there is a body."""
    h = {"Host": f"{HOST}:{port}"}
    h.update(headers or {})
    body = encode_body(body, h)
    if body is not None:
        h["Content-Length"] = str(len(body))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items())
    return head.encode() + b"\r\n" + (body or b"")


def parse_head(head):
    """(status, {lower-case name: value}) of a response head (the bytes before the blank
    line)."""
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for ln in lines[1:]:
        k, v = ln.split(":", 1)
        headers[k.strip().lower()] = v.strip()
    return int(lines[0].split()[1]), headers


def sse_events(body):
    """Splits an SSE body into its `data:` payloads (strings, the last one "[DONE]"),
    checking the framing: every event is exactly one `data: ...` line followed by an empty
    line, and the stream ends with `data: [DONE]`. Raises AssertionError otherwise."""
    assert isinstance(body, bytes)
    text = body.decode("utf-8")  # strict: the stream must be valid UTF-8
    assert text.endswith("data: [DONE]\n\n"), f"stream does not end with [DONE]: {text[-200:]!r}"
    events = text.split("\n\n")
    assert events[-1] == ""
    out = []
    for ev in events[:-1]:
        assert ev.startswith("data: "), f"event is not a data line: {ev[:200]!r}"
        assert "\n" not in ev, f"event spans several lines: {ev[:200]!r}"
        out.append(ev[len("data: "):])
    assert out[-1] == "[DONE]"
    assert "[DONE]" not in out[:-1]
    return out


# ------------------------------------------------------------------------- requests
def data_url(data, mime="image/png"):
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def chat_body(model, text="Describe the picture.", image_url=None, **kw):
    """A chat completion request: one user message, text alone or text and an image URL;
    kw adds top-level fields (max_tokens, stream, ...)."""
    if image_url is None:
        content = text
    else:
        content = [{"type": "text", "text": text},
                   {"type": "image_url", "image_url": {"url": image_url}}]
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    body.update(kw)
    return body


# ------------------------------------------------------------------------- PNG by hand
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def _png(width, height, colour_type, idat):
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return PNG_MAGIC + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png(width, height, pixel=lambda x, y: (200, 30, 60)):
    """A valid 8-bit RGB PNG, written row by row; pixel(x, y) gives (r, g, b)."""
    raw = bytearray()
    for y in range(height):
        raw.append(0)
        for x in range(width):
            raw.extend(pixel(x, y))
    return _png(width, height, 2, zlib.compress(bytes(raw), 9))


def png_claiming(width, height, idat=b""):
    """A tiny PNG whose header claims width x height RGB pixels; the data is whatever idat
    holds (by default a few compressed bytes: far too little)."""
    return _png(width, height, 2, idat or zlib.compress(b"\x00" * 64))


def png_bomb(side, value=0):
    """A complete, valid grayscale PNG of side x side pixels of one gray value (side^2
    bytes decoded: 256 MiB for 16384) that compresses about 1000:1."""
    comp = zlib.compressobj(9)
    row = b"\x00" + bytes([value]) * side
    rows = row * 64
    parts = [comp.compress(rows) for _ in range(side // 64)]
    parts.append(comp.compress(row * (side % 64)))
    parts.append(comp.flush())
    return _png(side, side, 0, b"".join(parts))


# ------------------------------------------------------------------------- metrics
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric_samples(text, strict=True):
    """(name, {labels}, value) of each sample of a Prometheus text exposition. strict: a
    line that is not exactly `name{labels} value` raises AssertionError; otherwise such a
    line is skipped and anything after the value (a timestamp) is ignored."""
    for ln in text.splitlines():
        if not ln or ln.startswith("#"):
            continue
        m = _SAMPLE.match(ln)
        if m and strict and ln[m.end():].strip():
            m = None
        if not m:
            if strict:
                raise AssertionError(f"bad metrics line {ln!r}")
            continue
        yield m.group(1), dict(_LABEL.findall(m.group(3) or "")), float(m.group(4))


# ------------------------------------------------------------------------- daemons
LISTENING = re.compile(r"listening on http://\S*:(\d+)\s")


def listening_port(log_text):
    """The port of the server's `listening on http://HOST:PORT` log line, or None."""
    m = LISTENING.search(log_text)
    return int(m.group(1)) if m else None


def server_env(extra=None, drop=()):
    """The environment for a test daemon: ours without any COGVLM_* variable (so that the
    caller's settings do not leak into the test's) nor the names in drop, plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COGVLM_") and k not in drop}
    env.update(extra or {})
    return env


class ServerProcess:
    """What every suite's Server wrapper has: the process (`proc`), its log file
    (`log_path`) and these readers of them."""

    proc = None
    log_path = None
    tail_lines = 40  # how much of the log error messages quote

    def log_text(self):
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n=None):
        return "\n".join(self.log_text().splitlines()[-(n or self.tail_lines):])

    def alive(self):
        return self.proc is not None and self.proc.poll() is None
