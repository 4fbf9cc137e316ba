#!/usr/bin/env python3
"""Leak check: the server under valgrind (memcheck, --leak-check=full
--errors-for-leak-kinds=definite), a few dozen mixed requests (chat and completions,
streaming or not, images, n=2, stop strings, logprobs, a disconnect mid-stream, a
non-streaming request abandoned while it runs, bad JSON, a broken image, an oversized
body, an unknown route, /metrics, /health), then SIGTERM: zero bytes definitely lost,
zero memcheck errors, exit status 0.

Skipped (exit 77, with the reason) when valgrind is not installed or the server does not
get healthy under it within STARTUP_BOUND seconds. Every request must still be answered as
without valgrind.
"""
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import robustlib as rl

STARTUP_BOUND = 90
REQUEST_TIMEOUT = 120
SKIP = 77


def test(chk):
    if rl.sanitized_build():
        print(f"SKIP leaks: {rl.SERVER_BIN} is an ASan build (LeakSanitizer checks it at exit; "
              "valgrind cannot run it)", flush=True)
        sys.exit(SKIP)
    vg = shutil.which("valgrind")
    if not vg:
        print("SKIP leaks: valgrind is not installed", flush=True)
        sys.exit(SKIP)
    vlog = rl.log_dir() / "valgrind.log"
    wrapper = [vg, "--tool=memcheck", "--leak-check=full", "--errors-for-leak-kinds=definite",
               "--show-leak-kinds=definite", "--error-exitcode=99", "--num-callers=30",
               f"--log-file={vlog}"]
    srv = rl.Server("leaks", {"--kv-memory": "8M", "--max-n": 2, "--drain-timeout": 20,
                              "--request-timeout": 120, "--max-body-bytes": "256K",
                              "--vision-cache-memory": "1M"},
                    wrapper=wrapper, env={"COGVLM_CPU_ISA": "avx2"})
    t = time.monotonic()
    try:
        srv.start(timeout=STARTUP_BOUND)
    except RuntimeError as e:
        srv.kill()
        print(f"SKIP leaks: the server did not get healthy under valgrind within {STARTUP_BOUND} s "
              f"({str(e).splitlines()[0][:200]})", flush=True)
        sys.exit(SKIP)
    t_start = time.monotonic() - t
    model = srv.model_id
    img = rl.png(30, 20, lambda x, y: (x * 8, y * 12, 77))
    img2 = rl.png(5, 60)
    n = {"ok": 0}

    def ok(r, status=200, what=""):
        n["ok"] += 1
        chk.ok(r.status == status, f"{what}: {r.status} != {status}: {r.body[:200]!r}")

    t0 = time.monotonic()
    for i in range(4):
        ok(srv.post(rl.chat(model, "hi", max_tokens=6), timeout=REQUEST_TIMEOUT), what="chat")
        ok(srv.post(rl.chat(model, "describe", img if i % 2 else img2, max_tokens=4, n=2), timeout=REQUEST_TIMEOUT),
           what="chat image n=2")
        r = srv.post(rl.chat(model, "hello there", max_tokens=8, stream=True,
                             stream_options={"include_usage": True}), timeout=REQUEST_TIMEOUT)
        ok(r, what="chat stream")
        ok(srv.post({"model": model, "prompt": "Once upon", "max_tokens": 5, "logprobs": 2}, rl.COMP,
                    timeout=REQUEST_TIMEOUT), what="completion logprobs")
        ok(srv.post({"model": model, "prompt": "1 2 3", "max_tokens": 5, "stream": True, "stop": ["e"]},
                    rl.COMP, timeout=REQUEST_TIMEOUT), what="completion stream stop")
        ok(srv.post(rl.chat(model, "hi", max_tokens=4, logprobs=True, top_logprobs=3, temperature=0.8, seed=i),
                    timeout=REQUEST_TIMEOUT), what="chat logprobs")
        ok(srv.post('{"model": "x", "messages": [', timeout=REQUEST_TIMEOUT), 400, "bad json")
        ok(srv.post(rl.chat(model, "hi", img[:40], max_tokens=2), timeout=REQUEST_TIMEOUT), 400, "broken image")
        ok(srv.post(rl.chat(model, "hi", rl.png_claiming(60000, 60000), max_tokens=2), timeout=REQUEST_TIMEOUT),
           413, "bomb")
        ok(srv.http("GET", "/nope", timeout=REQUEST_TIMEOUT), 404, "unknown route")
        ok(srv.http("GET", "/metrics", timeout=REQUEST_TIMEOUT), 200, "metrics")
    ok(srv.post(rl.chat(model, "x" * (300 * 1024), max_tokens=2), timeout=REQUEST_TIMEOUT), 413, "oversized body")
    # a disconnect mid-stream and an abandoned non-streaming request
    for stream in (True, False):
        s = socket.create_connection((rl.HOST, srv.port), timeout=REQUEST_TIMEOUT)
        s.sendall(rl.request_bytes("POST", rl.CHAT, rl.chat(model, "Tell me a long story.", max_tokens=1500,
                                                          stream=stream), None, srv.port))
        if stream:
            buf = b""
            while buf.count(b"\n\n") < 3:
                d = s.recv(4096)
                if not d:
                    break
                buf += d
        else:
            time.sleep(1.0)
        s.close()
        n["ok"] += 1
    m = srv.wait_idle(60)
    chk.ok(rl.metric(m, "cogvlm_kv_blocks_used") == 0, "KV blocks held before SIGTERM")
    t_req = time.monotonic() - t0

    srv.proc.send_signal(signal.SIGTERM)
    try:
        rc = srv.proc.wait(120)
    except subprocess.TimeoutExpired:
        srv.kill()
        rc = None
    text = vlog.read_text(errors="replace") if vlog.exists() else ""
    m_def = re.search(r"definitely lost: ([\d,]+) bytes in ([\d,]+) blocks", text)
    m_ind = re.search(r"indirectly lost: ([\d,]+) bytes", text)
    m_pos = re.search(r"possibly lost: ([\d,]+) bytes", text)
    m_err = re.search(r"ERROR SUMMARY: ([\d,]+) errors", text)

    def num(mm):
        return int(mm.group(1).replace(",", "")) if mm else None
    definite = num(m_def) if m_def else (0 if "All heap blocks were freed" in text or "no leaks are possible" in text else None)
    errors = num(m_err)
    chk.ok(rc == 0, f"exit status under valgrind {rc} (99 = memcheck errors or definite leaks)")
    chk.ok(definite == 0, f"definitely lost: {definite} bytes (see {vlog})")
    chk.ok(errors == 0, f"memcheck: {errors} errors (see {vlog})")
    if definite or errors:
        print("\n".join(text.splitlines()[-80:]), flush=True)
    chk.note(f"{n['ok']} requests under valgrind in {t_req:.0f} s (startup {t_start:.0f} s); after SIGTERM: "
             f"exit {rc}, definitely lost {definite} B, indirectly {num(m_ind) or 0} B, "
             f"possibly {num(m_pos) or 0} B, memcheck errors {errors}")


if __name__ == "__main__":
    rl.main("leaks", test)
