"""Helpers of the black-box API suite: starting the real daemon, a streaming reader,
JSON-schema validation against OpenAI's official spec and our own openapi.yaml, Prometheus
parsing, test images.

What the three Python suites share (paths, HTTP, SSE framing, chat bodies, hand-written
PNGs, the daemon wrapper's log readers) lives in tests/lib/cvlmtest.py; the names the
tests import from here are re-exported below. Everything here talks to 127.0.0.1 only.
"""
import copy
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
import cvlmtest  # noqa: E402
from cvlmtest import (HOST, MODEL_DIR, REPO, SERVER_BIN, SHARED, TOKENIZER,  # noqa: E402,F401
                      Resp, chat_body, data_url, free_port, http_request, png_claiming,
                      sse_events)

OPENAI_SPEC = SHARED / "openai-openapi.yaml"
OUR_SPEC = REPO / "openapi.yaml"
IMAGES = SHARED / "images"
CONTEXT_LEN = int(os.environ.get("COGVLM_TEST_CONTEXT", "2048"))

# Options every test server gets unless a test overrides them.
BASE_ARGS = {
    "--threads": "1",
    "--kv-memory": "64M",
    "--max-n": "4",
    "--max-body-bytes": str(4 * 1024 * 1024),
    "--max-image-pixels": str(4096 * 4096),
    "--request-timeout": "60",
    "--drain-timeout": "15",
    "--queue-limit": "64",
    "--log-level": "info",
}


# ------------------------------------------------------------------------- schemas
def _nullable_to_anyof(node):
    """OpenAI's 3.1 document still uses OpenAPI 3.0's `nullable: true` in places; JSON
    Schema 2020-12 ignores that keyword, so rewrite it into `anyOf [..., null]`."""
    if isinstance(node, list):
        return [_nullable_to_anyof(x) for x in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable_to_anyof(v) for k, v in node.items()}
    if node.pop("nullable", False) is True:
        desc = node.pop("description", None)
        out = {"anyOf": [node, {"type": "null"}]}
        if desc is not None:
            out["description"] = desc
        return out
    node.pop("nullable", None)
    return node


def _load_yaml(path):
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path, "rb") as f:
        return yaml.load(f, Loader=loader)


@lru_cache(maxsize=None)
def _registry():
    reg = Registry()
    openai_doc = _nullable_to_anyof(_load_yaml(OPENAI_SPEC))
    ours = _nullable_to_anyof(_load_yaml(OUR_SPEC))
    reg = reg.with_resource("urn:openai", Resource.from_contents(openai_doc, default_specification=DRAFT202012))
    reg = reg.with_resource("urn:cogvlm", Resource.from_contents(ours, default_specification=DRAFT202012))
    return reg, openai_doc, ours


def _validator(schema):
    reg, _, _ = _registry()
    return jsonschema.Draft202012Validator(schema, registry=reg)


@lru_cache(maxsize=None)
def openai_validator(name):
    return _validator({"$ref": f"urn:openai#/components/schemas/{name}"})


@lru_cache(maxsize=None)
def our_validator(name):
    return _validator({"$ref": f"urn:cogvlm#/components/schemas/{name}"})


@lru_cache(maxsize=None)
def openai_completion_chunk_validator():
    """CreateCompletionResponse, which OpenAI says streamed chunks share, except that the
    spec's finish_reason is not nullable while every real stream (OpenAI's included) sends
    `finish_reason: null` until a choice's last chunk: allow null there and nothing else."""
    _, doc, _ = _registry()
    schema = copy.deepcopy(doc["components"]["schemas"]["CreateCompletionResponse"])
    fr = schema["properties"]["choices"]["items"]["properties"]["finish_reason"]
    schema["properties"]["choices"]["items"]["properties"]["finish_reason"] = {
        "anyOf": [fr, {"type": "null"}]}
    schema = json.loads(json.dumps(schema).replace('"#/components/', '"urn:openai#/components/'))
    return _validator(schema)


def _check(validator, obj, what):
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        msgs = "; ".join(f"{list(e.absolute_path)}: {e.message[:300]}" for e in errors[:5])
        raise AssertionError(f"{what} does not validate: {msgs}\nbody: {json.dumps(obj)[:1500]}")


# Which schema of each spec a given kind of body must satisfy.
KINDS = {
    "chat": ("CreateChatCompletionResponse", "ChatCompletion"),
    "chat_chunk": ("CreateChatCompletionStreamResponse", "ChatCompletionChunk"),
    "completion": ("CreateCompletionResponse", "Completion"),
    "completion_chunk": (None, "CompletionChunk"),
    "models": ("ListModelsResponse", "ModelList"),
    "model": ("Model", "Model"),
    "error": ("ErrorResponse", "ErrorResponse"),
    "health": (None, "Health"),
}


def validate(kind, obj):
    """Validates obj against OpenAI's official schema and against ours (openapi.yaml)."""
    theirs, ours = KINDS[kind]
    if kind == "completion_chunk":
        _check(openai_completion_chunk_validator(), obj, "completion chunk (OpenAI CreateCompletionResponse)")
    elif theirs:
        _check(openai_validator(theirs), obj, f"OpenAI {theirs}")
    _check(our_validator(ours), obj, f"openapi.yaml {ours}")
    return obj


def check_error(resp, status, param=None, code=None, etype=None):
    """resp must be an error response of this status, with an OpenAI-shaped body. When
    param is given, the field must be named in error.param or in error.message."""
    assert resp.status == status, f"expected {status}, got {resp!r}"
    assert resp.headers.get("content-type", "").startswith("application/json"), resp
    body = validate("error", resp.json())
    err = body["error"]
    assert err["message"], body
    if param is not None:
        named = err["param"] or ""
        assert (named == param or named.startswith(param + ".") or named.startswith(param + "[")
                or named.endswith("." + param) or param in err["message"]), f"error does not name the field {param!r}: {body}"
    if code is not None:
        assert err["code"] == code, body
    if etype is not None:
        assert err["type"] == etype, body
    return err


# ------------------------------------------------------------------------- metrics
def parse_metrics(text):
    """{family_name: family} with prometheus_client's parser (a strict format check)."""
    from prometheus_client.parser import text_string_to_metric_families
    return {f.name: f for f in text_string_to_metric_families(text)}


def metric(text, name, **labels):
    """Sum of the samples named `name` whose labels include `labels` (0 if none)."""
    total = 0.0
    found = False
    for fam in parse_metrics(text).values():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
                found = True
    return total if found else 0.0


# ------------------------------------------------------------------------- images
def png_bytes(w=40, h=30, color=(200, 30, 60)):
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (w, h), color)
    ImageDraw.Draw(im).rectangle([w // 4, h // 4, w // 2, h // 2], fill=(10, 220, 40))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(w=64, h=48):
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (w, h), (20, 60, 200))
    ImageDraw.Draw(im).ellipse([8, 8, 40, 36], fill=(250, 250, 0))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@lru_cache(maxsize=None)
def png_bomb(side=16384):
    """A complete, valid grayscale PNG of side x side black pixels (side^2 bytes once
    decoded: 256 MiB for 16384) that compresses to a few hundred KB."""
    return cvlmtest.png_bomb(side)


def shared_image(name):
    p = IMAGES / name
    return p.read_bytes() if p.exists() else None


# ------------------------------------------------------------------------- the daemon
class Server(cvlmtest.ServerProcess):
    """The real build/cogvlm-server on a free loopback port."""

    def __init__(self, log_dir, name="server", args=None, env=None, served_name=None):
        self.log_dir = Path(log_dir)
        self.name = name
        self.extra_args = dict(args or {})
        self.extra_env = dict(env or {})
        self.served_name = served_name
        self.proc = None
        self.port = None
        self.log_path = None
        self.returncode = None
        self.early_health = []  # (status, body) of every /health poll while starting

    @property
    def model_id(self):
        if self.served_name:
            return self.served_name
        if "--served-model-name" in self.extra_args:
            return self.extra_args["--served-model-name"]
        if "COGVLM_SERVED_MODEL_NAME" in self.extra_env:
            return self.extra_env["COGVLM_SERVED_MODEL_NAME"]
        return MODEL_DIR.name

    @property
    def base_url(self):
        return f"http://{HOST}:{self.port}"

    def argv(self):
        opts = dict(BASE_ARGS)
        opts.update({"--host": HOST, "--port": str(self.port), "--model": str(MODEL_DIR),
                     "--tokenizer": str(TOKENIZER)})
        opts.update(self.extra_args)
        argv = [str(SERVER_BIN)]
        for k, v in opts.items():
            if v is None:
                continue
            argv += [k, v]
        return argv

    def start(self, timeout=60):
        if not SERVER_BIN.exists():
            raise RuntimeError(f"{SERVER_BIN} is missing: run `make` first")
        env = cvlmtest.server_env(self.extra_env)
        last = None
        for attempt in range(3):
            self.port = free_port()
            self.log_path = self.log_dir / f"{self.name}-{self.port}.log"
            log = open(self.log_path, "wb")
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env, cwd=REPO)
            log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    r = http_request(self.port, "GET", "/health", timeout=5)
                    self.early_health.append((r.status, r.body))
                    if r.status == 200:
                        return self
                    last = r
                except OSError as e:
                    last = e
                time.sleep(0.05)
            if self.proc.poll() is None:
                self.kill()
                raise RuntimeError(f"{self.name}: /health not 200 within {timeout}s ({last!r}); "
                                   f"log:\n{self.log_tail()}")
            if b"in use" not in self.log_path.read_bytes():
                break
        raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before becoming "
                           f"healthy; argv {self.argv()}; log:\n{self.log_tail()}")

    def request(self, method, path, body=None, headers=None, timeout=60):
        return http_request(self.port, method, path, body, headers, timeout)

    def post(self, path, body, headers=None, timeout=60):
        return self.request("POST", path, body, headers, timeout)

    def get(self, path, headers=None, timeout=30):
        return self.request("GET", path, None, headers, timeout)

    def metrics_text(self):
        r = self.get("/metrics")
        assert r.status == 200, r
        return r.body.decode()

    def metric(self, name, **labels):
        return metric(self.metrics_text(), name, **labels)

    def assert_healthy(self):
        assert self.alive(), f"{self.name} died: rc={self.proc.returncode}\n{self.log_tail()}"
        r = self.get("/health", timeout=10)
        assert r.status == 200, f"/health after the request: {r!r}"
        assert r.json() == {"status": "ok"}, r

    def wait_metric(self, name, pred, timeout=15, **labels):
        deadline = time.monotonic() + timeout
        v = None
        while time.monotonic() < deadline:
            v = self.metric(name, **labels)
            if pred(v):
                return v
            time.sleep(0.05)
        raise AssertionError(f"{name}{labels} = {v} did not reach the expected value in {timeout}s")

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, timeout=20):
        """SIGTERM, then wait; returns the exit status (kills and raises after timeout)."""
        if self.proc is None or self.proc.poll() is not None:
            self.returncode = self.proc.returncode if self.proc else None
            return self.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not exit within {timeout}s of SIGTERM")
        return self.returncode

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# ------------------------------------------------------------------------- slow model
def slow_model(tmp_dir, hidden=512, layers=8, vocab=32000):
    """A model directory for --dummy-weights (the test model's config, made larger) whose
    decode costs milliseconds per token on any CPU: ~57M parameters, ~114 MB of weights
    read per step, so that a request asked for ~2000 tokens runs for seconds even on the
    fastest machine. Tests whose point needs a request still running when they act use
    it, never a fixed sleep tuned to one machine."""
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    cfg.update(hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
               num_attention_heads=max(1, hidden // 64), vocab_size=vocab)
    d = Path(tmp_dir) / f"slow-{hidden}-{layers}-{vocab}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def slow_args(tmp_dir, **more):
    """Server options serving slow_model() as model id "slow"."""
    a = {"--model": str(slow_model(tmp_dir)), "--tokenizer": str(TOKENIZER),
         "--dummy-weights": "true", "--served-model-name": "slow"}
    a.update(more)
    return a


class StreamReader:
    """A streaming request on a raw socket, read incrementally (for tests that must act
    while a stream is in flight). Handles chunked transfer encoding."""

    def __init__(self, port, path, body, headers=None, timeout=30):
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.sendall(cvlmtest.request_bytes("POST", path, body, headers, port))
        self.buf = b""
        self.status = None
        self.headers = {}
        self.chunked = False
        self.raw_body = b""  # de-chunked body so far
        self.closed = False
        self.eof = False

    def _fill(self):
        d = self.sock.recv(65536)
        if not d:
            self.eof = True
            raise EOFError("server closed the connection")
        self.buf += d

    def read_headers(self):
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        self.status, self.headers = cvlmtest.parse_head(head)
        self.chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        return self.status

    def _read_more_body(self):
        if not self.chunked:
            if self.buf:
                self.raw_body += self.buf
                self.buf = b""
                return
            self._fill()
            self.raw_body += self.buf
            self.buf = b""
            return
        while True:
            if b"\r\n" in self.buf:
                size_line, rest = self.buf.split(b"\r\n", 1)
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    self.eof = True
                    self.buf = rest
                    raise EOFError("end of chunked body")
                if len(rest) >= size + 2:
                    self.raw_body += rest[:size]
                    self.buf = rest[size + 2:]
                    return
            self._fill()

    def next_event(self):
        """The next SSE data payload (str), or None at end of stream."""
        if self.status is None:
            self.read_headers()
        while True:
            i = self.raw_body.find(b"\n\n")
            if i >= 0:
                ev, self.raw_body = self.raw_body[:i], self.raw_body[i + 2:]
                s = ev.decode("utf-8")
                assert s.startswith("data: "), s
                return s[6:]
            try:
                self._read_more_body()
            except EOFError:
                return None

    def read_all_events(self):
        out = []
        while True:
            ev = self.next_event()
            if ev is None:
                return out
            out.append(ev)

    def close(self):
        if not self.closed:
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()


def run_in_thread(fn, *a, **kw):
    res = {}

    def target():
        try:
            res["value"] = fn(*a, **kw)
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            res["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, res
