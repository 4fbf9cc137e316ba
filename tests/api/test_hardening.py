"""Regression tests of the defects an adversarial review found (docs/SECURITY.md,
"Hardening"): drain cutting responses still being written, request timeouts answered as
`length`, NaN sampling at tiny temperatures, silently wrapped option values, logprob
tokens that do not concatenate to the content, unsupported fields silently ignored, and
the accounting of n choices, vanished clients and server-side cuts.

Nothing here depends on the machine's speed: slow readers are slowed by the test itself
(a small receive buffer, reads at a fixed pace), requests that must outlive a timeout run
on a model whose decode takes seconds on any CPU, and every wait is a deadline."""
import json
import signal
import socket
import subprocess
import time

import pytest

from apiutil import (HOST, SERVER_BIN, TOKENIZER, StreamReader, chat_body, check_error,
                     http_request, slow_args, slow_model, validate)

CHAT = "/v1/chat/completions"
COMPL = "/v1/completions"
EOS = 2                  # the LLaMA-2 tokenizer's </s>
NO_EOS = {str(EOS): -100}  # logit_bias that keeps a random model talking
TOK_A = 263              # "▁a"
TOK_ZHONG = 30275        # "中": one character, three UTF-8 bytes, no leading space


# ------------------------------------------------------------------------- helpers
def slow_server(make_server, tmp_path, name, **args):
    return make_server(name, args=slow_args(tmp_path, **args))


class SlowReader:
    """A raw HTTP request whose response is read with a small receive buffer at a pace the
    test sets, so the server is still writing when the test acts."""

    def __init__(self, port, path, body, rcvbuf=8192, timeout=120):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((HOST, port))
        data = json.dumps(body).encode()
        self.sock.sendall((f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: "
                           f"application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode()
                          + data)
        self.buf = b""
        self.headers = {}

    def read_headers(self):
        while b"\r\n\r\n" not in self.buf:
            d = self.sock.recv(4096)
            if not d:
                raise EOFError("closed before the headers")
            self.buf += d
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        for ln in lines[1:]:
            k, v = ln.split(":", 1)
            self.headers[k.strip().lower()] = v.strip()
        return int(lines[0].split()[1])

    def read(self, n, pace=None):
        """Up to n more raw bytes (fewer at EOF), `pace` bytes per second at most."""
        t0 = time.monotonic()
        got = len(self.buf)
        out = [self.buf]
        self.buf = b""
        while got < n:
            d = self.sock.recv(min(4096, n - got))
            if not d:
                break
            out.append(d)
            got += len(d)
            if pace:
                ahead = got / pace - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
        return b"".join(out)

    def close(self):
        self.sock.close()


def dechunk(raw):
    """The payload of a chunked body (raises if the terminating chunk is missing)."""
    out, i = [], 0
    while True:
        j = raw.index(b"\r\n", i)
        size = int(raw[i:j].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(raw[j + 2:j + 2 + size])
        i = j + 2 + size + 2


def events_of(payload):
    return [e[6:] for e in payload.decode().split("\n\n") if e.startswith("data: ")]


def big_body(model, stream):
    """A reply of ~7 MB: 4 choices x 1000 tokens with 20 alternatives each."""
    return chat_body(model, "Tell me a story.", n=4, logprobs=True, top_logprobs=20,
                     max_tokens=1000, temperature=0.7, seed=1, stream=stream,
                     logit_bias=NO_EOS)


# ------------------------------------------------------------------------- drain
def test_drain_lets_a_slow_non_streaming_reply_finish(make_server):
    """SIGTERM while an 8 MB-class reply is being read slowly: the whole body arrives (it
    was cut after ~4 MB: drain only waited for generations, then closed every socket)."""
    s = make_server("drain-body", args={"--drain-timeout": "120"})
    r = SlowReader(s.port, CHAT, big_body(s.model_id, stream=False))
    try:
        assert r.read_headers() == 200
        length = int(r.headers["content-length"])
        assert length > 1 << 20, length
        head = r.read(64 * 1024)
        s.signal(signal.SIGTERM)
        rest = r.read(length - len(head), pace=4 << 20)
    finally:
        r.close()
    body = head + rest
    assert len(body) == length, f"{len(body)} of {length} bytes arrived"
    reply = validate("chat", json.loads(body))
    assert len(reply["choices"]) == 4
    assert s.proc.wait(60) == 0, s.log_tail()
    log = s.log_text()
    assert "client gone" not in log and "cut by the server" not in log, s.log_tail()


def test_drain_lets_a_slow_stream_finish(make_server):
    """The same for a stream: every finish chunk and [DONE] arrive after SIGTERM (the
    stream lost its end: drain did not count streams whose generation had ended)."""
    s = make_server("drain-stream", args={"--drain-timeout": "120"})
    r = SlowReader(s.port, CHAT, big_body(s.model_id, stream=True))
    try:
        assert r.read_headers() == 200
        head = r.read(64 * 1024)
        s.signal(signal.SIGTERM)
        # the generation ends while most of its ~7 MB is still unsent (the socket buffers
        # hold a few MB at most); /metrics keeps answering while draining
        s.wait_metric("cogvlm_requests_running", lambda v: v == 0, timeout=120)
        rest = r.read(1 << 30, pace=4 << 20)
    finally:
        r.close()
    events = events_of(dechunk(head + rest))
    assert events[-1] == "[DONE]", events[-2:]
    finishes = [c["choices"][0]["finish_reason"] for c in map(json.loads, events[:-1])
                if c.get("choices") and c["choices"][0]["finish_reason"]]
    assert sorted(finishes) == ["length"] * 4, finishes
    assert s.proc.wait(60) == 0, s.log_tail()


def test_drain_deadline_cuts_and_says_so(make_server, tmp_path):
    """A reader that never reads holds the exit up only until --drain-timeout (+ the
    2 s grace for last events); the log blames the server, not the client."""
    s = make_server("drain-cut", args={"--drain-timeout": "1"})
    r = SlowReader(s.port, CHAT, big_body(s.model_id, stream=True), rcvbuf=4096)
    try:
        assert r.read_headers() == 200
        r.read(4096)
        t0 = time.monotonic()
        s.signal(signal.SIGTERM)
        rc = s.proc.wait(30)
        took = time.monotonic() - t0
    finally:
        r.close()
    assert rc == 0, s.log_tail()
    assert took < 1 + 2 + 5, f"exit {took:.1f} s after SIGTERM with --drain-timeout 1"
    log = s.log_text()
    assert "cut by the server" in log, s.log_tail()
    assert "client gone" not in log, s.log_tail()


# ------------------------------------------------------------------------- request timeout
def test_request_timeout_is_an_error_not_length(make_server, tmp_path):
    """--request-timeout cuts a running stream (an error event, no finish_reason, then
    [DONE]) and a request that never ran (504 request_timeout; both were 200 `length`)."""
    s = slow_server(make_server, tmp_path, "timeout", **{"--request-timeout": "1",
                                                        "--max-seqs": "1"})
    running = StreamReader(s.port, CHAT, chat_body("slow", "go", max_tokens=1900, stream=True,
                                                   temperature=0, logit_bias=NO_EOS),
                           timeout=60)
    assert running.read_headers() == 200
    assert running.next_event() is not None  # it runs: the queued one below waits
    queued = http_request(s.port, "POST", CHAT, chat_body("slow", "hi", max_tokens=1900,
                                                          logit_bias=NO_EOS), timeout=60)
    err = check_error(queued, 504, code="request_timeout", etype="server_error")
    assert "timeout" in err["message"]
    events = running.read_all_events()
    running.close()
    assert events and events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    errors = [c["error"] for c in chunks if "error" in c]
    assert len(errors) == 1 and errors[0]["code"] == "request_timeout", errors
    assert all(ch["finish_reason"] is None for c in chunks for ch in c.get("choices", [])), \
        "a timed-out choice must not end with a finish_reason"
    m = s.metric("cogvlm_http_requests_total", route=CHAT, status="504")
    assert m == 2, s.metrics_text()
    assert s.metric("cogvlm_http_requests_total", route=CHAT, status="200") == 0
    s.assert_healthy()


# ------------------------------------------------------------------------- load and options
def test_tokenizer_larger_than_vocabulary_is_refused_at_load(tmp_path):
    d = slow_model(tmp_path, hidden=64, layers=1, vocab=1000)
    p = subprocess.run([str(SERVER_BIN), "--model", str(d), "--tokenizer", str(TOKENIZER),
                        "--dummy-weights", "--port", "0"], capture_output=True, text=True,
                       timeout=60)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out
    assert "vocab" in out and "32000" in out and "1000" in out, out


@pytest.mark.parametrize("argv", [["--port", "84245"], ["--port", "-1"], ["--block-size", "0"],
                                  ["--max-n", "1000"], ["--queue-limit", "0"]])
def test_out_of_range_options_are_refused(argv):
    p = subprocess.run([str(SERVER_BIN)] + argv, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2, p.stdout + p.stderr
    assert argv[0] in p.stderr, p.stderr


def test_sigterm_during_model_load_exits_promptly(tmp_path, logs_dir):
    """A signal while the model loads ends the process at once with status 0 (main used
    to free the options the loading thread was still reading)."""
    d = slow_model(tmp_path, hidden=2048, layers=12)
    log = logs_dir / "load-signal.log"
    with open(log, "wb") as f:
        p = subprocess.Popen([str(SERVER_BIN), "--model", str(d), "--tokenizer", str(TOKENIZER),
                              "--dummy-weights", "--port", "0", "--host", HOST],
                             stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while b"loading" not in log.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.01)
    if b"ready" in log.read_bytes():
        p.terminate()
        p.wait(30)
        pytest.skip("the model loaded before the signal could be sent")
    p.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    rc = p.wait(30)
    text = log.read_text(errors="replace")
    assert rc == 0, text
    assert time.monotonic() - t0 < 10, text
    if "ready" not in text:
        assert "stopped while loading" in text, text


# ------------------------------------------------------------------------- sampling
def test_tiny_temperatures_are_greedy(server, model):
    """Temperatures below 1e-5 are greedy (1e-39 gave NaN probabilities: <unk> forever)."""
    def text(t):
        r = server.post(CHAT, chat_body(model, "Name a colour.", max_tokens=12, temperature=t,
                                        seed=3))
        assert r.status == 200, r
        return r.json()["choices"][0]["message"]["content"]
    greedy = text(0)
    for t in (1e-39, 1e-30, 1e-6):
        assert text(t) == greedy, t


def test_logit_bias(server, model):
    """+100 forces a token at every step, greedy or sampled; -100 bans one (EOS here:
    the random model then always runs to max_tokens); bad maps are a 400 naming the field
    (the engine checks ids against the vocabulary)."""
    for temp in (0, 1.0):
        r = server.post(CHAT, chat_body(model, "Say something.", max_tokens=6, temperature=temp,
                                        logit_bias={str(TOK_ZHONG): 100}))
        assert r.status == 200, r
        c = r.json()["choices"][0]
        assert c["message"]["content"] == "中" * 6 and c["finish_reason"] == "length", c
    r = server.post(CHAT, chat_body(model, "Stop.", max_tokens=8, temperature=0,
                                    logit_bias={str(EOS): 100}))
    c = r.json()["choices"][0]
    assert c["message"]["content"] == "" and c["finish_reason"] == "stop", c
    for seed in range(4):
        r = server.post(CHAT, chat_body(model, "Go on.", max_tokens=20, temperature=1.5,
                                        seed=seed, logit_bias=NO_EOS))
        assert r.json()["usage"]["completion_tokens"] == 20, r.json()
    for bias in ({"abc": 1}, {"5": 101}, {"5": "x"}, {"99999999": 1}, [1, 2],
                 {str(i): 1 for i in range(301)}):
        check_error(server.post(CHAT, chat_body(model, "hi", logit_bias=bias)), 400,
                    param="logit_bias")


# ------------------------------------------------------------------------- logprobs
def test_chat_logprob_tokens_concatenate_to_the_content(server, model):
    for stream in (False, True):
        body = chat_body(model, "Say a.", max_tokens=5, temperature=0, logprobs=True,
                         top_logprobs=2, logit_bias={str(TOK_A): 100}, stream=stream)
        if not stream:
            c = server.post(CHAT, body).json()["choices"][0]
            content, toks = c["message"]["content"], c["logprobs"]["content"]
        else:
            r = StreamReader(server.port, CHAT, body)
            chunks = [json.loads(e) for e in r.read_all_events()[:-1]]
            r.close()
            content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                              if c["choices"])
            toks = [t for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                    for t in c["choices"][0]["logprobs"]["content"]]
        assert content == "a a a a a", content
        assert "".join(t["token"] for t in toks) == content, [t["token"] for t in toks]
        assert b"".join(bytes(t["bytes"]) for t in toks) == content.encode()


def test_completion_text_offset_counts_characters(server, model):
    for stream in (False, True):
        body = {"model": model, "prompt": "x", "max_tokens": 4, "temperature": 0,
                "logprobs": 1, "logit_bias": {str(TOK_ZHONG): 100}, "stream": stream}
        if not stream:
            lp = server.post(COMPL, body).json()["choices"][0]["logprobs"]
            offsets, tokens = lp["text_offset"], lp["tokens"]
        else:
            r = StreamReader(server.port, COMPL, body)
            chunks = [json.loads(e) for e in r.read_all_events()[:-1]]
            r.close()
            offsets, tokens = [], []
            for c in chunks:
                lp = c["choices"][0]["logprobs"] if c["choices"] else None
                if lp:
                    offsets += lp["text_offset"]
                    tokens += lp["tokens"]
        assert tokens == ["中"] * 4, tokens
        assert offsets == [0, 1, 2, 3], offsets


# ------------------------------------------------------------------------- request fields
def test_stream_options_need_stream(server, model):
    check_error(server.post(CHAT, chat_body(model, "hi", stream_options={"include_usage": True})),
                400, param="stream_options")
    check_error(server.post(CHAT, chat_body(model, "hi", stream=False,
                                            stream_options={"include_usage": True})),
                400, param="stream_options")


@pytest.mark.parametrize("field,value", [
    ("response_format", {"type": "xml"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "integer", "minimum": 0}}}),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "required"),
    ("functions", [{"name": "f", "parameters": {}}]),
])
def test_unsupported_fields_are_refused(server, model, field, value):
    check_error(server.post(CHAT, chat_body(model, "hi", **{field: value})), 400, param=field)


@pytest.mark.parametrize("field,value", [("response_format", {"type": "text"}), ("tools", []),
                                         ("tool_choice", "none"), ("tools", None)])
def test_harmless_forms_are_accepted(server, model, field, value):
    r = server.post(CHAT, chat_body(model, "hi", max_tokens=2, **{field: value}))
    assert r.status == 200, r


def test_n_above_the_queue_limit_on_an_idle_server(make_server):
    """The queue limit counts requests: n=4 with --queue-limit 2 is served when idle (each
    choice used to count, so it got 429 from an empty queue)."""
    s = make_server("n-queue", args={"--queue-limit": "2"})
    r = s.post(CHAT, chat_body(s.model_id, "hi", n=4, max_tokens=3))
    assert r.status == 200, r
    assert len(r.json()["choices"]) == 4


# ------------------------------------------------------------------------- accounting
def test_vanished_non_streaming_client_counts_as_499(make_server, tmp_path):
    s = slow_server(make_server, tmp_path, "vanish")
    sock = socket.create_connection((HOST, s.port))
    data = json.dumps(chat_body("slow", "go", max_tokens=1900, logit_bias=NO_EOS)).encode()
    sock.sendall((f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(data)}\r\n\r\n").encode() + data)
    s.wait_metric("cogvlm_requests_running", lambda v: v == 1, timeout=30)
    sock.close()
    s.wait_metric("cogvlm_http_requests_total", lambda v: v == 1, timeout=30, route=CHAT,
                  status="499")
    assert s.metric("cogvlm_http_requests_total", route=CHAT, status="200") == 0
    s.wait_metric("cogvlm_requests_running", lambda v: v == 0, timeout=30)
    s.assert_healthy()
