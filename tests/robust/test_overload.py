#!/usr/bin/env python3
"""Overload: a burst of 10x the capacity (--max-seqs + --queue-limit) of concurrent chat
requests, all released at once on pre-opened connections.

Checks: every response is either 200 (complete: a full body, or an SSE stream ending with
[DONE]) or 429 with a numeric Retry-After and an OpenAI error body (rate_limit_error /
queue_full); at least the capacity is admitted and most of the excess is refused; the
latency of every admitted request stays under a bound derived from the measured solo
latency (2 s + 2 x admitted x solo latency, i.e. no batching gain at all on a busy
machine); the server stays healthy and idles back to 0 running, 0 waiting,
0 KV blocks; the peak RSS (VmHWM) stays under --kv-memory + --vision-cache-memory +
OVERHEAD_MIB; every admitted request is counted finished by the engine.

The KV budget is deliberately tight (MAX_SEQS sequences of MAX_TOKENS just fit), so the
burst also runs the scheduler at full KV occupancy.

Part 2, expensive refusals: HEAVY requests at once whose text prompt (HEAVY_MIB MiB, under
--max-body-bytes) is far beyond the context, so each ends in a 400; meanwhile a normal
client's small requests must keep succeeding within NORMAL_BOUND seconds.

Part 3, output amplification: LP_REQS concurrent non-streaming requests of a few hundred
bytes each asking for n=4 x LP_TOKENS tokens with top_logprobs=20 (megabytes of JSON out):
the server's peak RSS growth should stay within 4x the response bytes + 32 MiB (it holds
the output while rendering it), since no configured limit covers this memory.

Part 4, --request-timeout 1 against requests that would generate for several seconds
(n=4, top_logprobs, max_tokens calibrated to ~3 s): both the non-streaming and the streaming one must
end (cancelled) within TIMEOUT_BOUND s, counted as cancelled by the engine; the first is a 504
(`code: request_timeout`), the second ends with that error as an event before [DONE].
"""
import json
import socket
import threading
import time

import robustlib as rl

MAX_SEQS = 4
QUEUE_LIMIT = 8
CAPACITY = MAX_SEQS + QUEUE_LIMIT
BURST = 10 * CAPACITY
MAX_TOKENS = 900
KV_MIB = 4            # 256 blocks of 16 tokens at 1 KiB/token: 4 x ~915 tokens fit
VCACHE_MIB = 4
OVERHEAD_MIB = 48     # binary, weights of the tiny model, thread stacks, 120 connections
REFUSE_BOUND = 2.0    # seconds: a refusal must not wait behind the admitted work
PROMPT = "Tell me a very long story about dragons."
HEAVY = 4             # = the libuv work pool (UV_THREADPOOL_SIZE default) that parses requests
HEAVY_MIB = 3
NORMAL_BOUND = 2.0
# Known server issues (reported; docs/SECURITY.md "Known limitations"): XFAIL, not failure.
KNOWN_ISSUES: set = set()  # none open; see docs/SECURITY.md ("Known limitations")
TIMEOUT_BOUND = 2.5
LP_REQS = 4
LP_TOKENS = 300


def one(port, barrier, body, out, i):
    rec = {"i": i, "stream": body.get("stream", False)}
    out[i] = rec
    try:
        s = socket.create_connection((rl.HOST, port), timeout=120)
        data = rl.request_bytes("POST", rl.CHAT, body, {"Connection": "close"}, port)
        barrier.wait(30)
        rec["t0"] = time.monotonic()
        s.sendall(data)
        r = rl.read_response(s, time.monotonic() + 120)
        rec["t1"] = time.monotonic()
        rec["resp"] = r
        s.close()
    except BaseException as e:  # noqa: BLE001 - reported
        rec["error"] = repr(e)


def check_ok(rec, model):
    """None if this 200 is a complete answer, else why not."""
    r = rec["resp"]
    try:
        if rec["stream"]:
            pl = rl.sse_payloads(r.body)
            last = json.loads(pl[-2])
            if last["choices"] and last["choices"][0].get("finish_reason") not in ("length", "stop"):
                # with include_usage the last chunk has no choices; look further back
                fins = [c.get("finish_reason") for p in pl[:-1] for c in json.loads(p)["choices"]]
                if not any(f in ("length", "stop") for f in fins):
                    return f"stream without finish_reason: {pl[-3:]!r}"
        else:
            j = r.json()
            if j["choices"][0]["finish_reason"] not in ("length", "stop") or j["model"] != model:
                return f"bad completion {r.body[:200]!r}"
    except Exception as e:  # noqa: BLE001
        return f"unparsable 200: {e!r} {r.body[:200]!r}"
    return None


def burst(chk):
    rl.raise_fd_limit(4 * BURST + 256)
    srv = rl.Server("overload", {
        "--max-seqs": MAX_SEQS, "--queue-limit": QUEUE_LIMIT, "--kv-memory": f"{KV_MIB}M",
        "--vision-cache-memory": f"{VCACHE_MIB}M", "--max-n": 1, "--max-connections": 4 * BURST,
        "--request-timeout": 120, "--connection-timeout": 60}).start()
    model = srv.model_id
    body = rl.chat(model, PROMPT, max_tokens=MAX_TOKENS, temperature=0)

    # solo latency of one request of this size (median of 3), and its length
    solo = []
    for _ in range(3):
        t = time.monotonic()
        r = srv.post(body, timeout=60)
        solo.append(time.monotonic() - t)
        chk.ok(r.status == 200, f"solo request: {r!r}")
    t_solo = sorted(solo)[1]
    base = srv.status()

    m0 = srv.metrics()
    with rl.RssPeak(srv, 0.02) as sampler:
        barrier = threading.Barrier(BURST)
        out = [None] * BURST
        threads = []
        for i in range(BURST):
            b = dict(body, stream=(i % 2 == 1))
            t = threading.Thread(target=one, args=(srv.port, barrier, b, out, i), daemon=True)
            t.start()
            threads.append(t)
        t_start = time.monotonic()
        for t in threads:
            t.join(max(0.1, 150 - (time.monotonic() - t_start)))
        wall = time.monotonic() - t_start

    n200 = n429 = 0
    lat = []
    lat429 = []
    bad = []
    for rec in out:
        if rec is None or "error" in rec or "resp" not in rec:
            bad.append(f"request {rec and rec.get('i')}: {rec and rec.get('error', 'no answer')}")
            continue
        r = rec["resp"]
        if r.status == 200:
            n200 += 1
            lat.append(rec["t1"] - rec["t0"])
            why = check_ok(rec, model)
            if why:
                bad.append(why)
        elif r.status == 429:
            n429 += 1
            lat429.append(rec["t1"] - rec["t0"])
            ra = r.headers.get("retry-after", "")
            if not ra.strip().isdigit():
                bad.append(f"429 without a numeric Retry-After: {r.headers}")
            why = rl.check_error_body(r, 429)
            if why:
                bad.append(why)
            else:
                err = r.json()["error"]
                if err["type"] != "rate_limit_error" or err["code"] != "queue_full":
                    bad.append(f"429 error type/code {err}")
        else:
            bad.append(f"unexpected status {r!r}")
    chk.ok(not bad, f"{len(bad)} bad answers: {bad[:3]}")
    chk.ok(n200 + n429 == BURST, f"{n200} x 200 + {n429} x 429 != {BURST}")
    chk.ok(n200 >= CAPACITY, f"only {n200} admitted, capacity is {CAPACITY}")
    chk.ok(n429 >= BURST // 2, f"only {n429} of {BURST} refused: the queue limit does not bite")
    # Bound: every admitted request completes within the time the engine needs to run all
    # the admitted ones one after the other (no batching gain at all), doubled for a busy
    # machine, plus 2 s: nothing admitted starves behind the refused traffic.
    bound = 2.0 + 2 * max(n200, CAPACITY) * t_solo
    worst = max(lat) if lat else float("nan")
    chk.ok(lat and worst <= bound, f"admitted latency {worst:.2f} s > bound {bound:.2f} s")
    worst429 = max(lat429) if lat429 else 0.0
    chk.ok(worst429 <= REFUSE_BOUND, f"a 429 took {worst429:.2f} s > {REFUSE_BOUND} s")

    m1 = srv.wait_idle(30)
    for g in ("cogvlm_requests_running", "cogvlm_requests_waiting", "cogvlm_kv_blocks_used"):
        chk.ok(rl.metric(m1, g) == 0, f"{g} = {rl.metric(m1, g)} after the burst")
    fin = rl.metric(m1, "cogvlm_requests_total", status="finished") - rl.metric(m0, "cogvlm_requests_total", status="finished")
    chk.ok(fin == n200, f"engine finished {fin} requests, {n200} were admitted")
    h429 = (rl.http_counts(m1).get((rl.CHAT, 429), 0) - rl.http_counts(m0).get((rl.CHAT, 429), 0))
    chk.ok(h429 == n429, f"cogvlm_http_requests_total 429 = {h429}, client saw {n429}")
    pre = rl.metric(m1, "cogvlm_preemptions_total")
    ok, why = srv.healthy()
    chk.ok(ok, why)
    # the server still serves normally afterwards
    r = srv.post(rl.chat(model, "hi", max_tokens=4))
    chk.ok(r.status == 200, f"request after the burst: {r!r}")

    hwm = srv.status()["VmHWM"]
    limit_kib = (KV_MIB + VCACHE_MIB + OVERHEAD_MIB) * 1024
    asan = rl.sanitized_build()  # shadow memory: the RSS bound does not apply
    chk.ok(asan or hwm <= limit_kib, f"VmHWM {hwm} KiB > KV {KV_MIB} MiB + vision cache {VCACHE_MIB} MiB "
                             f"+ overhead {OVERHEAD_MIB} MiB")
    rc = srv.stop()
    chk.ok(rc == 0, f"exit status after SIGTERM: {rc}")
    lat.sort()
    chk.note(f"burst {BURST} (capacity {CAPACITY} = max-seqs {MAX_SEQS} + queue-limit {QUEUE_LIMIT}, "
             f"max_tokens {MAX_TOKENS}): {n200} x 200, {n429} x 429 in {wall:.1f} s; "
             f"429 latency max {worst429 * 1000:.0f} ms <= {REFUSE_BOUND:.0f} s")
    chk.note(f"admitted latency p50 {lat[len(lat) // 2] if lat else float('nan'):.2f} s, "
             f"max {worst:.2f} s <= bound {bound:.2f} s (solo {t_solo:.2f} s)")
    chk.note(f"RSS idle {base['VmRSS'] // 1024} MiB, peak {max(sampler.kib, hwm) // 1024} MiB <= "
             f"{limit_kib // 1024} MiB (KV {KV_MIB} + vcache {VCACHE_MIB} + overhead {OVERHEAD_MIB}); "
             f"preemptions {int(pre)}" + (" (ASan build: RSS not checked)" if asan else ""))


def heavy_prompts(chk):
    srv = rl.Server("heavy-prompts", {"--kv-memory": "16M", "--max-body-bytes": f"{HEAVY_MIB + 1}M"}).start()
    model = srv.model_id
    words = HEAVY_MIB * rl.MiB // 6
    data = json.dumps(rl.chat(model, "hello " * words, max_tokens=2)).encode()
    t = time.monotonic()
    r = srv.post(data, timeout=120)
    alone = time.monotonic() - t
    chk.ok(r.status == 400, f"a {HEAVY_MIB} MiB prompt: {r!r}")
    stop = threading.Event()
    lat, bad = [], []

    def normal():
        while not stop.is_set():
            t = time.monotonic()
            try:
                r = srv.post(rl.chat(model, "hi", max_tokens=4), timeout=120)
                if r.status != 200:
                    bad.append(repr(r))
            except Exception as e:  # noqa: BLE001
                bad.append(repr(e))
            lat.append(time.monotonic() - t)
            stop.wait(0.1)

    th = threading.Thread(target=normal, daemon=True)
    th.start()
    time.sleep(0.3)
    t = time.monotonic()
    res = rl.in_threads([lambda: srv.post(data, timeout=120) for _ in range(HEAVY)], 150)
    heavy_wall = time.monotonic() - t
    time.sleep(0.3)
    stop.set()
    th.join(130)
    chk.ok(all(e is None and v.status == 400 for v, e in res),
           f"heavy prompts: {[(repr(v)[:80] if v else repr(e)) for v, e in res][:2]}")
    chk.ok(not bad, f"normal client during the heavy prompts: {bad[:3]}")
    worst = max(lat) if lat else float("nan")
    rl.known(chk, KNOWN_ISSUES, "prompt-cpu-amplification", lat and worst <= NORMAL_BOUND,
             f"{HEAVY} x {HEAVY_MIB} MiB text prompts (each refused with 400 after {alone:.1f} s of "
             f"tokenizing alone) stalled a normal request for {worst:.1f} s (> {NORMAL_BOUND:.0f} s)")
    ok, why = srv.healthy()
    chk.ok(ok, why)
    rc = srv.stop()
    chk.ok(rc == 0, f"heavy-prompts exit status {rc}")
    chk.note(f"{HEAVY} x {HEAVY_MIB} MiB over-context prompts: 400 after {heavy_wall:.1f} s (one alone "
             f"{alone:.1f} s); a normal request meanwhile waited up to {worst:.1f} s")


def logprobs_memory(chk):
    srv = rl.Server("logprobs", {"--kv-memory": "16M", "--max-n": 4, "--max-seqs": 16}).start()
    model = srv.model_id
    srv.post(rl.chat(model, "hi", max_tokens=4, logprobs=True, top_logprobs=2))  # warm
    base = srv.status()["VmRSS"]
    body = rl.chat(model, "hi", max_tokens=LP_TOKENS, n=4, logprobs=True, top_logprobs=20, temperature=1.0)
    t = time.monotonic()
    res = rl.in_threads([lambda: srv.post(body, timeout=120) for _ in range(LP_REQS)], 150)
    wall = time.monotonic() - t
    chk.ok(all(e is None and v.status == 200 for v, e in res), f"logprobs requests: {res[:1]}")
    out = sum(len(v.body) for v, e in res if v)
    peak = srv.status()["VmHWM"] - base  # KiB
    bound = (4 * out + 32 * rl.MiB) // 1024
    asan = rl.sanitized_build()
    rl.known(chk, KNOWN_ISSUES, "logprobs-memory-amplification", asan or peak <= bound,
             f"{LP_REQS} requests of {len(json.dumps(body))} bytes (n=4, {LP_TOKENS} tokens, top_logprobs=20) "
             f"-> {out // rl.MiB} MiB of JSON out took +{peak // 1024} MiB of RSS (> {bound // 1024} MiB)")
    rss_after = srv.status()["VmRSS"]
    ok, why = srv.healthy()
    chk.ok(ok, why)
    chk.ok(srv.stop() == 0, "logprobs server exit status")
    chk.note(f"{LP_REQS} x n=4 x {LP_TOKENS} tokens x top_logprobs 20 (non-streaming): {out // rl.MiB} MiB out "
             f"in {wall:.1f} s, peak RSS +{peak // 1024} MiB (bound {bound // 1024} MiB), "
             f"+{(rss_after - base) // 1024} MiB still resident afterwards")


def request_timeout(chk):
    srv = rl.Server("request-timeout", {"--kv-memory": "64M", "--request-timeout": 1, "--max-n": 4}).start()
    model = srv.model_id

    def body(tokens, stream):  # greedy: no choice ends early on its own
        return rl.chat(model, "hi", max_tokens=tokens, n=4, logprobs=True, top_logprobs=20, temperature=0,
                       stream=stream)

    # calibrate: enough tokens for ~3 s of generation (at most the context), so that the
    # 1 s timeout must cut it
    t = time.monotonic()
    srv.post(body(200, False), timeout=60)
    step = (time.monotonic() - t) / 200
    tokens = min(2000, max(200, int(3.0 / step)))
    if tokens * step < 2.0:
        chk.note(f"--request-timeout: skipped, this machine generates {tokens} x 4 tokens in "
                 f"{tokens * step:.1f} s (< 2 s)")
        srv.stop()
        return
    out = {}
    for stream in (False, True):
        m0 = srv.metrics()
        t = time.monotonic()
        r = srv.post(body(tokens, stream), timeout=120)
        dt = time.monotonic() - t
        m1 = srv.wait_idle(20)
        can = (rl.metric(m1, "cogvlm_requests_total", status="cancelled")
               - rl.metric(m0, "cogvlm_requests_total", status="cancelled"))
        gen = rl.metric(m1, "cogvlm_generation_tokens_total") - rl.metric(m0, "cogvlm_generation_tokens_total")
        what = "stream" if stream else "non-stream"
        out[what] = f"{r.status} after {dt:.1f} s, {gen:.0f} of {4 * tokens} tokens, {can:.0f} of 4 cancelled"
        if stream:  # an error event (no finish_reason) ends it, then [DONE]
            ev = rl.sse_payloads(r.body) if r.status == 200 else []
            errs = [json.loads(e)["error"] for e in ev[:-1] if '"error"' in e]
            chk.ok(r.status == 200 and ev[-1:] == ["[DONE]"] and len(errs) == 1 and
                   errs[0].get("code") == "request_timeout",
                   f"stream with --request-timeout 1 ends with a request_timeout event: {r!r}")
        else:  # a 504, never a 200 with finish_reason "length"
            chk.ok(r.status == 504 and '"request_timeout"' in r.body.decode(errors="replace"),
                   f"non-stream with --request-timeout 1 is a 504 request_timeout: {r!r}")
        cond = dt <= TIMEOUT_BOUND and can == 4
        if stream:
            rl.known(chk, KNOWN_ISSUES, "stream-request-timeout", cond,
                     f"--request-timeout 1 does not stop a streaming request: {out[what]}")
        else:
            chk.ok(cond, f"--request-timeout 1, non-streaming: {out[what]}")
    chk.ok(srv.stop() == 0, "request-timeout server exit status")
    chk.note(f"--request-timeout 1 (requests of ~{tokens * step:.1f} s): "
             + "; ".join(f"{k} {v}" for k, v in out.items()))


def test(chk):
    burst(chk)
    heavy_prompts(chk)
    logprobs_memory(chk)
    request_timeout(chk)


if __name__ == "__main__":
    rl.main("overload", test)
