#!/usr/bin/env python3
"""Soak: a bounded run of mixed traffic at several concurrency levels, then accounting.

Traffic (seeded, so a failure can be replayed with the same COGVLM_ROBUST_SEED): chat and
completions, streaming and not, with and without images (a pool of distinct PNGs, so the
vision cache both hits and evicts), n=1/2, stop strings, sampling options; clients that
disconnect mid-stream (after the first events) or while a non-streaming request runs; bad
requests (invalid JSON, a broken image, an unknown model, an unknown route); GETs of
/v1/models and /health.

Warm-up: every concurrency level once, briefly; then RSS is taken (idle). The soak runs
the levels again for SOAK seconds in all (COGVLM_ROBUST_SOAK_SECONDS, default 60). Then:
  - RSS idle again within RSS_TOLERANCE (5 %) + 2 MiB of the value after warm-up;
  - cogvlm_kv_blocks_used == 0, cogvlm_requests_running == cogvlm_requests_waiting == 0;
  - the engine's finished + cancelled + failed == the choices the client had accepted
    (every 200, and every stream cancelled after its first event; a non-streaming request
    abandoned early may or may not have reached the engine: it widens the range by one);
    failed == 0;
  - cogvlm_http_requests_total matches what the client sent, route by route and status by
    status (a request the client abandoned counts as 499 or, if it had just finished, 200);
  - no request failed unexpectedly, the server is healthy and exits 0 on SIGTERM.
"""
import json
import os
import random
import socket
import threading
import time
from collections import Counter

import robustlib as rl

SOAK = float(os.environ.get("COGVLM_ROBUST_SOAK_SECONDS", "60"))
LEVELS = [2, 8, 16, 4]
WARM_PER_LEVEL = 2.5
RSS_TOLERANCE = 0.05
RSS_SLACK_KIB = 2048
SEED = int(os.environ.get("COGVLM_ROBUST_SEED", "1234"))
MAX_N = 2


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.http = Counter()          # (route, status) the client saw
        self.abandoned = Counter()     # route -> requests the client dropped (200 or 499)
        self.accepted = 0              # choices surely submitted to the engine
        self.maybe = 0                 # choices perhaps submitted (abandoned non-streaming)
        self.kinds = Counter()
        self.errors = []
        self.lat = []

    def add(self, route, status, kind, choices=0, lat=None):
        with self.lock:
            self.http[(route, status)] += 1
            self.kinds[kind] += 1
            self.accepted += choices
            if lat is not None:
                self.lat.append(lat)

    def drop(self, route, kind, sure, choices):
        with self.lock:
            self.abandoned[route] += 1
            self.kinds[kind] += 1
            if sure:
                self.accepted += choices
            else:
                self.maybe += choices

    def error(self, what):
        with self.lock:
            self.errors.append(what)


def make_images(rng, n):
    imgs = []
    for i in range(n):
        w, h = rng.randint(1, 72), rng.randint(1, 72)
        c = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        imgs.append(rl.png(w, h, lambda x, y, c=c: ((x * c[0]) & 255, (y * c[1]) & 255, c[2])))
    return imgs


class Client:
    def __init__(self, srv, tally, images):
        self.srv = srv
        self.t = tally
        self.images = images
        self.model = srv.model_id

    def body(self, rng, chat=True, stream=False, image=False, max_tokens=None):
        mt = max_tokens or rng.randint(1, 40)
        kw = {"max_tokens": mt, "stream": stream}
        if rng.random() < 0.3:
            kw["n"] = rng.randint(1, MAX_N)
        if rng.random() < 0.3:
            kw["temperature"] = rng.choice([0, 0.5, 1.0, 1.7])
            kw["top_p"] = rng.choice([0.5, 0.9, 1.0])
        if rng.random() < 0.2:
            kw["stop"] = [rng.choice(["e", "the", "\n", "ing"])]
        if stream and rng.random() < 0.5:
            kw["stream_options"] = {"include_usage": True}
        if chat:
            text = rng.choice(["hi", "Describe the picture.", "What is the capital of France?",
                               "Tell me a story about a cat and a dog."])
            img = rng.choice(self.images) if image else None
            return rl.CHAT, rl.chat(self.model, text, img, **kw)
        return rl.COMP, dict(model=self.model, prompt=rng.choice(["Once upon a time", "1 2 3", "hello"]), **kw)

    def send(self, route, body, kind, method="POST", expect=200):
        t = time.monotonic()
        try:
            r = rl.http(self.srv.port, method, route, body, timeout=60)
        except Exception as e:  # noqa: BLE001
            self.t.error(f"{kind}: {e!r}")
            return
        dt = time.monotonic() - t
        choices = 0
        if r.status == 200 and method == "POST":
            choices = body.get("n", 1)
            try:
                if body.get("stream"):
                    pl = rl.sse_payloads(r.body)
                    for p in pl[:-1]:
                        json.loads(p)
                else:
                    j = r.json()
                    if len(j["choices"]) != choices:
                        self.t.error(f"{kind}: {len(j['choices'])} choices, asked {choices}")
            except Exception as e:  # noqa: BLE001
                self.t.error(f"{kind}: bad 200 body: {e!r} {r.body[:200]!r}")
        elif r.status != 200:
            why = rl.check_error_body(r)
            if why:
                self.t.error(f"{kind}: {why}")
        if r.status != expect:
            self.t.error(f"{kind}: status {r.status}, expected {expect}: {r.body[:200]!r}")
        route_label = route if route in (rl.CHAT, rl.COMP, "/v1/models", "/health", "/metrics") else "other"
        self.t.add(route_label, r.status, kind, choices, dt if method == "POST" and r.status == 200 else None)

    def cancel_stream(self, rng):
        route, body = self.body(rng, chat=rng.random() < 0.7, stream=True, image=rng.random() < 0.3,
                                max_tokens=1500)
        kind = "cancel-stream"
        s = socket.create_connection((rl.HOST, self.srv.port), timeout=30)
        try:
            s.sendall(rl.request_bytes("POST", route, body, None, self.srv.port))
            buf = b""
            while buf.count(b"\n\n") < 3:  # headers' blank line + 2 SSE events
                d = s.recv(4096)
                if not d:
                    break
                buf += d
            if not buf.startswith(b"HTTP/1.1 200"):
                self.t.error(f"{kind}: {buf[:200]!r}")
                return
            if rng.random() < 0.5:  # half the time a reset instead of a FIN
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except Exception as e:  # noqa: BLE001
            self.t.error(f"{kind}: {e!r}")
            return
        finally:
            s.close()
        self.t.drop(route, kind, True, body.get("n", 1))

    def cancel_plain(self, rng):
        route, body = self.body(rng, chat=True, stream=False, image=rng.random() < 0.3, max_tokens=1500)
        s = socket.create_connection((rl.HOST, self.srv.port), timeout=30)
        try:
            s.sendall(rl.request_bytes("POST", route, body, None, self.srv.port))
            time.sleep(rng.uniform(0.02, 0.15))
        finally:
            s.close()
        self.t.drop(route, "cancel-plain", False, body.get("n", 1))

    def one(self, rng):
        x = rng.random()
        if x < 0.22:
            self.send(*self.body(rng), "chat")
        elif x < 0.40:
            self.send(*self.body(rng, stream=True), "chat-stream")
        elif x < 0.52:
            self.send(*self.body(rng, image=True), "chat-image")
        elif x < 0.60:
            self.send(*self.body(rng, stream=True, image=True), "chat-image-stream")
        elif x < 0.70:
            self.send(*self.body(rng, chat=False, stream=rng.random() < 0.5), "completion")
        elif x < 0.79:
            self.cancel_stream(rng)
        elif x < 0.83:
            self.cancel_plain(rng)
        elif x < 0.86:
            self.send(rl.CHAT, '{"model": "x", "messages": [', "bad-json", expect=400)
        elif x < 0.89:
            self.send(rl.CHAT, rl.chat(self.model, "hi", rl.png(20, 20)[:50], max_tokens=2), "bad-image", expect=400)
        elif x < 0.91:
            self.send(rl.CHAT, rl.chat("no-such-model", "hi", max_tokens=2), "bad-model", expect=404)
        elif x < 0.93:
            self.send("/v1/nothing", None, "bad-route", method="GET", expect=404)
        elif x < 0.96:
            self.send("/v1/models", None, "models", method="GET")
        else:
            self.send("/health", None, "health", method="GET")


def run_level(client, conc, secs, seed):
    stop_at = time.monotonic() + secs

    def worker(i):
        rng = random.Random(seed * 1000 + i)
        n = 0
        while time.monotonic() < stop_at and n < 100000:
            client.one(rng)
            n += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(secs + 90)


def test(chk):
    rng = random.Random(SEED)
    images = make_images(rng, 24)
    srv = rl.Server("soak", {"--kv-memory": "16M", "--max-seqs": 16, "--queue-limit": 256,
                             "--max-n": MAX_N, "--connection-timeout": 10, "--request-timeout": 60,
                             "--vision-cache-memory": "256K", "--max-body-bytes": "2M"}).start()
    own = Counter()  # our own GETs of /metrics and /health (counted by the server too)

    def metrics():
        own[("/metrics", 200)] += 1
        return srv.metrics()

    def wait_idle(timeout=20):
        deadline = time.monotonic() + timeout
        while True:
            m = metrics()
            if (rl.metric(m, "cogvlm_requests_running") == 0 and rl.metric(m, "cogvlm_requests_waiting") == 0
                    and rl.metric(m, "cogvlm_kv_blocks_used") == 0) or time.monotonic() > deadline:
                return m
            time.sleep(0.1)

    def settle():
        """Idle, and the server has logged every connection (abandoned ones included)."""
        m = wait_idle()
        time.sleep(0.6)  # the 250 ms tick notices suspended connections whose client left
        return wait_idle()

    warm = Client(srv, Tally(), images)
    for i, conc in enumerate(LEVELS):
        run_level(warm, conc, WARM_PER_LEVEL, SEED + 100 + i)
    chk.ok(not warm.t.errors, f"warm-up errors: {warm.t.errors[:3]}")
    m0 = settle()
    own.clear()
    own[("/metrics", 200)] = 1  # m0's own scrape is counted from m0 on
    time.sleep(0.3)
    rss0 = srv.status()["VmRSS"]

    tally = Tally()
    client = Client(srv, tally, images)
    with rl.RssPeak(srv, 0.2, start=rss0) as peak:
        t0 = time.monotonic()
        per = SOAK / len(LEVELS)
        for i, conc in enumerate(LEVELS):
            run_level(client, conc, per, SEED + i)
        wall = time.monotonic() - t0
    m1 = settle()
    time.sleep(0.3)
    rss1 = srv.status()["VmRSS"]

    # ---- checks
    chk.ok(not tally.errors, f"{len(tally.errors)} client errors: {tally.errors[:4]}")
    for g in ("cogvlm_requests_running", "cogvlm_requests_waiting", "cogvlm_kv_blocks_used"):
        chk.ok(rl.metric(m1, g) == 0, f"{g} = {rl.metric(m1, g)} after the soak")

    def d(name, **lab):
        return rl.metric(m1, name, **lab) - rl.metric(m0, name, **lab)
    fin, can, fail = (d("cogvlm_requests_total", status=s) for s in ("finished", "cancelled", "failed"))
    engine_total = fin + can + fail
    chk.ok(fail == 0, f"{fail} requests failed in the engine")
    chk.ok(tally.accepted <= engine_total <= tally.accepted + tally.maybe,
           f"engine finished {fin:.0f} + cancelled {can:.0f} + failed {fail:.0f} = {engine_total:.0f}, "
           f"client accepted {tally.accepted} (+ up to {tally.maybe} abandoned early)")

    h0, h1 = rl.http_counts(m0), rl.http_counts(m1)
    delta = Counter({k: h1.get(k, 0) - h0.get(k, 0) for k in set(h0) | set(h1)})
    delta = Counter({k: v for k, v in delta.items() if v})
    own_seen = Counter(own)
    own_seen[("/metrics", 200)] -= 1  # the final scrape (m1) is not in its own numbers
    expected = tally.http + own_seen
    mismatch = []
    routes = {r for r, _ in set(delta) | set(expected)}
    for route in sorted(routes):
        got = {s: v for (r, s), v in delta.items() if r == route}
        want = {s: v for (r, s), v in expected.items() if r == route}
        ab = tally.abandoned.get(route, 0)
        g200, g499 = got.pop(200, 0), got.pop(499, 0)
        w200 = want.pop(200, 0)
        if g200 + g499 != w200 + ab or g499 > ab:
            mismatch.append(f"{route}: server 200={g200:.0f} 499={g499:.0f}, client 200={w200} abandoned={ab}")
        if got != want:
            mismatch.append(f"{route}: server {got}, client {want}")
    chk.ok(not mismatch, "cogvlm_http_requests_total does not match the client: " + "; ".join(mismatch))

    growth = rss1 - rss0
    allowed = rss0 * RSS_TOLERANCE + RSS_SLACK_KIB
    asan = rl.sanitized_build()  # ASan's quarantine and shadow memory: report only
    chk.ok(asan or growth <= allowed, f"RSS {rss0} KiB after warm-up -> {rss1} KiB after the soak "
                              f"(+{growth} KiB > {allowed:.0f} KiB)")
    ok, why = srv.healthy()
    chk.ok(ok, why)
    rc = srv.stop()
    chk.ok(rc == 0, f"exit status after SIGTERM: {rc}")

    n_req = sum(tally.http.values()) + sum(tally.abandoned.values())
    lat = sorted(tally.lat)
    chk.note(f"{n_req} requests in {wall:.0f} s at concurrency {LEVELS} (seed {SEED}): "
             + ", ".join(f"{k} {v}" for k, v in sorted(tally.kinds.items())))
    chk.note(f"latency of 200s p50 {lat[len(lat) // 2] * 1000 if lat else 0:.0f} ms, "
             f"p99 {lat[int(len(lat) * 0.99)] * 1000 if lat else 0:.0f} ms")
    chk.note(f"engine: finished {fin:.0f} + cancelled {can:.0f} + failed {fail:.0f} = {engine_total:.0f}; "
             f"client accepted {tally.accepted} (+{tally.maybe} maybe)")
    chk.note(f"http: server counted {sum(delta.values()):.0f} = client {sum(expected.values())} completed + "
             f"{sum(tally.abandoned.values())} abandoned (server saw "
             f"{sum(v for (r, s), v in delta.items() if s == 499):.0f} as 499, the rest had finished)")
    chk.note(f"RSS after warm-up {rss0 / 1024:.1f} MiB, peak {peak.kib / 1024:.1f} MiB, after soak "
             f"{rss1 / 1024:.1f} MiB ({100.0 * growth / rss0:+.1f} %, limit +{100 * RSS_TOLERANCE:.0f} % + "
             f"{RSS_SLACK_KIB // 1024} MiB{'; ASan build: not checked' if asan else ''}); "
             f"KV used 0, running 0, waiting 0")


if __name__ == "__main__":
    rl.main("soak", test)
