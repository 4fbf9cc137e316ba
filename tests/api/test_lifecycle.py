"""Request lifecycle against dedicated daemons: a client that disconnects cancels its
request and frees its KV blocks; a full queue answers 429 with Retry-After; SIGTERM
drains (in-flight requests finish, new ones are refused or get 503, exit status 0)."""
import json
import signal
import socket
import time

import pytest

from apiutil import (CONTEXT_LEN, HOST, StreamReader, chat_body, check_error, http_request,
                     slow_args, validate)

CHAT = "/v1/chat/completions"
LONG = CONTEXT_LEN - 100  # tokens per choice: as long as the context allows


def long_body(model, stream=True, n=1):
    """As long as the context allows: EOS is banned (logit_bias), so a random model never
    ends it early."""
    return chat_body(model, "Tell me a very long story about dragons.", max_tokens=LONG,
                     temperature=0, n=n, stream=stream, logit_bias={"2": -100})


def check_cancelled(s, gen0, cancelled, n):
    """After the client closed: the request stops at once (running back to 0 within 3 s),
    was cut short (fewer tokens generated than it asked for), is counted as cancelled,
    and its KV blocks are all free."""
    t0 = time.monotonic()
    s.wait_metric("cogvlm_requests_running", lambda v: v == 0, timeout=15)
    took = time.monotonic() - t0
    generated = s.metric("cogvlm_generation_tokens_total") - gen0
    assert generated < n * LONG, "the request ran to completion: the disconnect was not noticed"
    assert took < 3, f"the request kept running {took:.1f} s after the client disconnected"
    s.wait_metric("cogvlm_requests_total", lambda v: v >= cancelled + 1, timeout=5, status="cancelled")
    s.wait_metric("cogvlm_kv_blocks_used", lambda v: v == 0, timeout=5)
    assert s.metric("cogvlm_requests_waiting") == 0
    s.assert_healthy()


# The disconnect and queue tests need a request still running when they act: they run
# on the slow model (seconds per request on any machine), not on the test model, which a
# fast machine finishes before the client can hang up.
def test_disconnect_mid_stream_cancels(make_server, tmp_path):
    s = make_server("disconnect-stream", args=slow_args(tmp_path))
    cancelled = s.metric("cogvlm_requests_total", status="cancelled")
    finished = s.metric("cogvlm_requests_total", status="finished")
    gen0 = s.metric("cogvlm_generation_tokens_total")
    sr = StreamReader(s.port, CHAT, long_body(s.model_id, n=4))
    assert sr.read_headers() == 200
    events = [sr.next_event() for _ in range(3)]
    # (the gauge may count sequences: n of them per request; it is published after each
    # engine step, so a loaded machine may show it a moment late)
    s.wait_metric("cogvlm_requests_running", lambda v: v >= 1, timeout=20)
    assert s.metric("cogvlm_kv_blocks_used") > 0
    sr.close()
    for ev in events:
        assert ev is not None and ev != "[DONE]"
        validate("chat_chunk", json.loads(ev))
    check_cancelled(s, gen0, cancelled, n=4)
    assert s.metric("cogvlm_requests_total", status="finished") == finished


def test_disconnect_non_streaming_cancels(make_server, tmp_path):
    s = make_server("disconnect-plain", args=slow_args(tmp_path))
    cancelled = s.metric("cogvlm_requests_total", status="cancelled")
    gen0 = s.metric("cogvlm_generation_tokens_total")
    sock = socket.create_connection((HOST, s.port), timeout=10)
    data = json.dumps(long_body(s.model_id, stream=False, n=4)).encode()
    sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    s.wait_metric("cogvlm_requests_running", lambda v: v >= 1, timeout=10)
    assert s.metric("cogvlm_kv_blocks_used") > 0
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    check_cancelled(s, gen0, cancelled, n=4)


def test_queue_full_429(make_server, tmp_path):
    s = make_server("queue", args=slow_args(tmp_path, **{"--max-seqs": "1", "--queue-limit": "1",
                                                          "--max-n": "1"}))
    for attempt in range(5):
        a = StreamReader(s.port, CHAT, long_body(s.model_id))
        b = None
        try:
            assert a.read_headers() == 200
            assert a.next_event() is not None
            b = StreamReader(s.port, CHAT, long_body(s.model_id))
            # wait for the state "A running, B waiting" (or B already refused); A runs for
            # many seconds on the slow model, so a generous deadline costs nothing
            deadline = time.monotonic() + 30
            state = None
            while time.monotonic() < deadline:
                m = s.metrics_text()
                from apiutil import metric
                run, wait = metric(m, "cogvlm_requests_running"), metric(m, "cogvlm_requests_waiting")
                if run >= 1 and wait >= 1:
                    state = "queued"
                    break
                if run == 0:
                    state = "a-finished"
                    break
                time.sleep(0.005)
            if state == "a-finished":
                continue  # A was too quick for this machine: try again
            if state is None:
                # B was never queued: it must have been refused itself
                b.sock.settimeout(5)
                b.read_headers()
                status, headers = b.status, b.headers
                assert status == 429, f"B neither queued nor refused: {status} {headers}"
                assert "retry-after" in headers
                break
            r = http_request(s.port, "POST", CHAT, long_body(s.model_id, stream=False), timeout=30)
            if r.status == 200 and attempt < 4:
                continue  # A and B both finished in between
            err = check_error(r, 429, etype="rate_limit_error")
            assert err
            ra = r.headers.get("retry-after")
            assert ra is not None and ra.strip().isdigit(), r.headers
            break
        finally:
            a.close()
            if b is not None:
                b.close()
    else:
        pytest.fail("could not provoke a full queue in 5 attempts")
    s.wait_metric("cogvlm_requests_running", lambda v: v == 0, timeout=15)
    s.wait_metric("cogvlm_requests_waiting", lambda v: v == 0, timeout=5)
    s.assert_healthy()


def test_sigterm_drains_in_flight(make_server):
    drain = 20
    s = make_server("drain", args={"--drain-timeout": str(drain)})
    body = long_body(s.model_id, n=2)
    body["max_tokens"] = 800
    a = StreamReader(s.port, CHAT, body, timeout=drain + 10)
    assert a.read_headers() == 200
    first = a.next_event()
    assert first is not None and first != "[DONE]"
    t0 = time.monotonic()
    s.signal(signal.SIGTERM)
    # new work is refused (connection refused) or answered 503
    try:
        deadline = time.monotonic() + 2
        while True:
            h = http_request(s.port, "GET", "/health", timeout=5)
            if h.status != 200 or time.monotonic() > deadline:
                break
            time.sleep(0.01)  # the signal may not have been handled yet
        assert h.status == 503, h
        assert h.json() == {"status": "draining"}, h
        r = http_request(s.port, "POST", CHAT, chat_body(s.model_id, "hi", max_tokens=2), timeout=5)
        check_error(r, 503)
    except (ConnectionRefusedError, ConnectionResetError):
        pass
    # the in-flight request completes
    events = [first] + a.read_all_events()
    a.close()
    assert events[-1] == "[DONE]", f"in-flight stream cut short: {events[-3:]}"
    chunks = [json.loads(e) for e in events[:-1]]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]
                and c["choices"][0]["finish_reason"]]
    assert len(finishes) == 2 and set(finishes) <= {"stop", "length"}, finishes
    rc = s.proc.wait(drain + 5)
    assert rc == 0, f"exit status {rc} after SIGTERM\n{s.log_tail()}"
    assert time.monotonic() - t0 < drain + 5


def test_sigint_idle_exits_zero(make_server):
    s = make_server("sigint")
    s.signal(signal.SIGINT)
    assert s.proc.wait(15) == 0, s.log_tail()


def test_drain_timeout_bounds_exit(make_server):
    """A request that cannot finish within --drain-timeout does not hold the exit up."""
    s = make_server("drain-timeout", args={"--drain-timeout": "1"})
    a = StreamReader(s.port, CHAT, long_body(s.model_id, n=4), timeout=30)
    assert a.read_headers() == 200
    assert a.next_event() is not None
    t0 = time.monotonic()
    s.signal(signal.SIGTERM)
    try:
        rc = s.proc.wait(8)
    finally:
        a.close()
    assert rc == 0, f"exit status {rc}\n{s.log_tail()}"
    assert time.monotonic() - t0 < 6, "exit not bounded by --drain-timeout 1"
