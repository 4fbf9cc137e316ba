#!/usr/bin/env python3
"""Load balancing: real nginx (deploy/nginx/cogvlm.conf) in front of two cogvlm-servers.

Installs nginx with apt-get when it is missing. Everything listens on 127.0.0.1; nginx
runs as the current user from a temporary prefix (its own nginx.conf, pid, logs, temp
paths) with `daemon off`, started and stopped by this script.

1. Two servers (A, B) with the tiny test model; nginx with the shipped config, where only
   the upstream addresses, the listen port and the log path are rewritten.
2. Balanced phase: 24 requests, 8 at a time, streaming and not. Each must succeed (200,
   complete JSON / SSE stream ending in [DONE] with a finish_reason). Both replicas get
   requests, and each replica's /metrics cogvlm_http_requests_total for
   /v1/chat/completions equals the requests nginx's access log says it sent there; their
   sum equals the requests sent.
3. Failover phase: 40 requests, 8 at a time; after the 10th completes, as soon as A's
   /metrics shows a request running, SIGTERM to A (it drains: in-flight requests finish, new ones get 503 and nginx retries them on B).
   Every request must succeed, those started after the signal included, within a
   client timeout (no hang); A exits 0; B's /metrics grows by exactly what nginx sent it;
   A's own log accounts for every request nginx delivered to it.
4. After A is gone: 8 more requests, all succeed (connection refused -> retried on B).

Exit 0 when all holds, else prints what failed (with log tails) and exits 1. Bounded by an
alarm (110 s); all processes it started are killed on any exit.
"""
import concurrent.futures as cf
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploylib as dl  # noqa: E402

F = dl.Failures("test_lb")
CLIENT_TIMEOUT = 30  # seconds a client waits for any read before calling it a hang
ROUTE = "/v1/chat/completions"


# ------------------------------------------------------------------------------ clients
def chat(port, i, stream):
    """One chat completion through port; returns a dict describing the outcome."""
    body = {"model": dl.MODEL_ID, "stream": stream, "max_tokens": (8, 24, 48, 96)[i % 4],
            "messages": [{"role": "user", "content": f"request {i}: describe the picture"}]}
    res = {"i": i, "stream": stream, "t0": time.monotonic(), "ok": False, "err": None}
    conn = http.client.HTTPConnection(dl.HOST, port, timeout=CLIENT_TIMEOUT)
    try:
        conn.request("POST", ROUTE, body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        res["status"] = r.status
        if r.status != 200:
            res["err"] = f"HTTP {r.status}: {r.read()[:300]!r}"
            return res
        if not stream:
            d = json.loads(r.read())
            ch = d["choices"][0]
            if ch.get("finish_reason") not in ("stop", "length") or \
                    not isinstance(ch["message"].get("content"), str):
                res["err"] = f"bad completion {d!r:.300}"
            else:
                res["ok"] = True
            return res
        if not r.getheader("Content-Type", "").startswith("text/event-stream"):
            res["err"] = f"stream Content-Type {r.getheader('Content-Type')!r}"
            return res
        events, done, finish = 0, False, None
        while True:
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            ev = json.loads(data)
            events += 1
            for c in ev.get("choices", []):
                finish = c.get("finish_reason") or finish
        if not done or not finish or events < 2:
            res["err"] = f"incomplete stream: {events} events, finish {finish}, [DONE] {done}"
        else:
            res["ok"] = True
        return res
    except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
        res["err"] = f"{type(e).__name__}: {e}"  # socket.timeout = a hung request
        return res
    finally:
        res["t1"] = time.monotonic()
        conn.close()


def run_load(port, n, first, concurrency=8, on_done=None):
    """n requests (ids first..first+n-1, every other one streaming), concurrency at a time;
    on_done(count_done) after each completion. Returns the results in id order."""
    results = []
    lock = threading.Lock()
    with cf.ThreadPoolExecutor(concurrency) as ex:
        futs = [ex.submit(chat, port, i, i % 2 == 0) for i in range(first, first + n)]
        for f in cf.as_completed(futs, timeout=CLIENT_TIMEOUT * 3):
            with lock:
                results.append(f.result())
                if on_done:
                    on_done(len(results))
    return sorted(results, key=lambda r: r["i"])


# ------------------------------------------------------------------------------ accounting
def access_log_attempts(work, since=0):
    """Per backend port: attempts that reached it (any status but a failed connect, which
    nginx logs as 502), from the access log lines after byte offset since."""
    path = Path(work) / "cogvlm.access.log"
    text = path.read_bytes()[since:].decode(errors="replace") if path.exists() else ""
    per, lines = {}, 0
    for line in text.splitlines():
        if f'"POST {ROUTE} ' not in line:
            continue
        lines += 1
        ua = re.search(r'ua="([^"]*)"', line).group(1)
        us = re.search(r'us="([^"]*)"', line).group(1)
        addrs = [a.strip() for a in re.split(r"[,:]\s", ua)]
        stats = [s.strip() for s in re.split(r"[,:]\s", us)]
        for a, s in zip(addrs, stats):
            if s == "502" or ":" not in a:
                continue
            port = int(a.rsplit(":", 1)[1])
            per[port] = per.get(port, 0) + 1
    return per, lines


def wait_access_log(work, since, expect, timeout=3):
    """access_log_attempts once it has expect lines: nginx writes a request's line after
    the response has reached the client, so the last ones may lag the clients a little."""
    end = time.monotonic() + timeout
    while True:
        per, n = access_log_attempts(work, since)
        if n >= expect or time.monotonic() > end:
            return per, n
        time.sleep(0.05)


def log_size(work):
    p = Path(work) / "cogvlm.access.log"
    return p.stat().st_size if p.exists() else 0


def chat_count(srv, status=None):
    _, _, body = dl.request(srv.port, "GET", "/metrics", timeout=5)
    m = dl.parse_metrics(body.decode())
    labels = {"route": ROUTE}
    if status:
        labels["status"] = str(status)
    return int(dl.metric_sum(m, "cogvlm_http_requests_total", **labels))


def settle(fn, want, timeout=3):
    """fn() polled until it returns want (a server counts a request when it has finished
    sending it, which may be just after the client has it) or the timeout; the last value."""
    end = time.monotonic() + timeout
    v = fn()
    while v != want and time.monotonic() < end:
        time.sleep(0.05)
        v = fn()
    return v


def server_log_count(srv):
    """Requests the server logged as completed on the chat route (the same event as the
    cogvlm_http_requests_total increment)."""
    return len(re.findall(rf" {re.escape(ROUTE)} \d{{3}} ", srv.log_text()))


def report_failures(results, what):
    bad = [r for r in results if not r["ok"]]
    for r in bad[:10]:
        F.check(False, f"{what}: request {r['i']} (stream={r['stream']}) failed after "
                       f"{r['t1'] - r['t0']:.2f} s: {r['err']}")
    F.check(not bad, f"{what}: {len(bad)} of {len(results)} requests failed")
    return bad


# ------------------------------------------------------------------------------ main
def main():
    dl.install_sigterm_exit(deadline_s=110)
    if not dl.SERVER_BIN.exists():
        print(f"test_lb: {dl.SERVER_BIN} not built (run make)", file=sys.stderr)
        return 2
    nginx = dl.ensure_nginx("test_lb")
    if not nginx:
        print("test_lb: FAIL: nginx is missing and apt-get could not install it",
              file=sys.stderr)
        return 1
    work = dl.tempdir("cogvlm-lb-")
    os.chmod(work, 0o755)
    a = b = ngx = ngx_log = None
    t_start = time.monotonic()
    try:
        a = dl.Server(work, "server-a")
        b = dl.Server(work, "server-b")
        a.wait_ready(60)
        b.wait_ready(60)
        port = dl.free_port()
        for problem in dl.write_nginx_conf(work, nginx, port, [a.port, b.port]):
            F.check(False, problem)
        args = dl.nginx_args(nginx, work)
        t = subprocess.run(args + ["-t"], capture_output=True, text=True)
        if not F.check(t.returncode == 0, f"nginx -t: {t.stderr.strip()}"):
            return F.report()
        ngx_log = open(Path(work) / "nginx.out", "wb")
        ngx = subprocess.Popen(args, stdout=ngx_log, stderr=subprocess.STDOUT,
                               start_new_session=True)
        for _ in range(100):
            try:
                if dl.request(port, "GET", "/lb-health", timeout=2)[0] == 200:
                    break
            except OSError:
                time.sleep(0.05)
        st = dl.request(port, "GET", "/health", timeout=5)[0]
        F.check(st == 200, f"GET /health through nginx: {st}")
        st = dl.request(port, "GET", "/metrics", timeout=5)[0]
        F.check(st == 404, f"GET /metrics through nginx: {st} (want 404: scrape replicas)")

        # ---- 2. balanced
        res1 = run_load(port, 24, 0)
        report_failures(res1, "balanced phase")
        per1, n1 = wait_access_log(work, 0, 24)
        ma = settle(lambda: chat_count(a), per1.get(a.port, 0))
        mb = settle(lambda: chat_count(b), per1.get(b.port, 0))
        F.check(n1 == 24, f"balanced phase: nginx logged {n1} chat requests, sent 24")
        F.check(ma > 0 and mb > 0, f"balanced phase: requests per replica A={ma} B={mb}, "
                                   f"want both > 0 (least_conn)")
        F.check(ma == per1.get(a.port, 0) and mb == per1.get(b.port, 0),
                f"balanced phase: /metrics A={ma} B={mb}, nginx sent "
                f"A={per1.get(a.port, 0)} B={per1.get(b.port, 0)}")
        F.check(ma + mb == 24, f"balanced phase: /metrics A+B = {ma + mb}, sent 24")
        F.check(chat_count(a, 200) + chat_count(b, 200) == 24,
                "balanced phase: 200s in /metrics A+B != 24")
        print(f"test_lb: balanced: 24 requests, A {ma}, B {mb}", flush=True)

        # ---- 3. failover under load
        off2 = log_size(work)
        b_before = chat_count(b)
        sig = {}

        def running(srv):
            _, _, body = dl.request(srv.port, "GET", "/metrics", timeout=5)
            return dl.metric_sum(dl.parse_metrics(body.decode()), "cogvlm_requests_running")

        def on_done(k):
            # from the 10th completion on, as soon as A is generating something
            if k >= 10 and not sig and (k >= 30 or running(a) > 0):
                sig["t"] = time.monotonic()
                a.signal(signal.SIGTERM)
        res2 = run_load(port, 40, 100, on_done=on_done)
        F.check("t" in sig, "failover phase: SIGTERM was never sent")
        report_failures(res2, "failover phase")
        new = [r for r in res2 if "t" in sig and r["t0"] > sig["t"]]
        F.check(len(new) > 0, "failover phase: no request started after the SIGTERM")
        report_failures(new, "failover phase, started after SIGTERM")
        rc = a.wait(30)
        F.check(rc == 0, f"replica A after SIGTERM: exit status {rc} (want 0 after draining)")
        alog = a.log_text()
        F.check("draining" in alog, "replica A did not log draining")
        drained = len(re.findall(rf" {re.escape(ROUTE)} 200 ", alog.split("draining", 1)[-1]))
        F.check(drained > 0, "replica A had no request in flight to finish while draining")

        # ---- 4. after A is gone
        res3 = [chat(port, 200 + i, i % 2 == 0) for i in range(8)]
        report_failures(res3, "after replica A exited")

        per23, n23 = wait_access_log(work, off2, 48)
        per_all, _ = access_log_attempts(work)
        mb2 = settle(lambda: chat_count(b), b_before + per23.get(b.port, 0)) - b_before
        F.check(n23 == 48, f"failover: nginx logged {n23} chat requests, sent 48")
        F.check(mb2 == per23.get(b.port, 0),
                f"failover: B's /metrics grew by {mb2}, nginx sent B {per23.get(b.port, 0)}")
        a_served = server_log_count(a)
        F.check(a_served == per_all.get(a.port, 0),
                f"A logged {a_served} chat requests, nginx delivered {per_all.get(a.port, 0)}")
        a_ok = len(re.findall(rf" {re.escape(ROUTE)} 200 ", alog))
        b_ok = chat_count(b, 200)
        F.check(a_ok + b_ok == 24 + 48,
                f"200 responses: A {a_ok} (its log) + B {b_ok} (/metrics) != 72 requests sent")
        a_503 = len(re.findall(rf" {re.escape(ROUTE)} 503 ", alog))
        print(f"test_lb: failover: 48 requests, {len(new)} started after SIGTERM; A served "
              f"{a_ok - ma} more ({drained} of them while draining) and refused {a_503} "
              f"while draining (retried on B), "
              f"B served {mb2}; {time.monotonic() - t_start:.1f} s", flush=True)
        slow = max(r["t1"] - r["t0"] for r in res1 + res2 + res3)
        F.check(slow < CLIENT_TIMEOUT, f"slowest request took {slow:.1f} s")
    except (RuntimeError, OSError, cf.TimeoutError) as e:
        F.check(False, f"{type(e).__name__}: {e}")
    finally:
        if ngx_log:
            ngx_log.close()
        if ngx and ngx.poll() is None:
            try:
                os.killpg(ngx.pid, signal.SIGQUIT)
                ngx.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(ngx.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                ngx.wait(5)
        for s in (a, b):
            if s:
                s.kill()
        if F.items:
            for name in ("error.log", "server-a.log", "server-b.log", "cogvlm.access.log"):
                p = Path(work) / name
                if p.exists():
                    tail = p.read_text(errors="replace")[-2500:]
                    print(f"--- {name} (tail)\n{tail}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    return F.report()


if __name__ == "__main__":
    sys.exit(main())
