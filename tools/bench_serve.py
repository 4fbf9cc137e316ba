#!/usr/bin/env python3
"""bench_serve.py - open-loop serving benchmark for any OpenAI-compatible endpoint.

Sends a seeded sequence of streaming requests (/v1/chat/completions, optionally with
images as data: URLs, or /v1/completions) at a Poisson or fixed request rate, with an
optional cap on requests in flight, and measures per request:

- TTFT: time from sending the request to the first SSE chunk that carries text;
- ITL: the gap between successive text-carrying chunks (a server that coalesces several
  tokens into one chunk shows fewer, longer gaps: the summary states chunks per token);
- TPOT: (e2e - ttft) / (output tokens - 1), for requests with at least 2 output tokens;
- e2e: time from sending the request to the end of the stream;
- output tokens: `usage.completion_tokens` of the final chunk (asked for with
  stream_options.include_usage); servers that send no usage are counted from
  finish_reason "length" (= max_tokens) or else from the number of text chunks.

The summary (mean, median, p90, p99 of each latency; request, output-token and total-token
throughput; failures by HTTP status; goodput against --goodput targets) is printed like
vLLM's benchmark_serving, and --json writes it with every request's record for plotting.

Only the Python standard library is used (asyncio streams speaking HTTP/1.1 with one
connection per request, a small SSE parser), so there is nothing to install. The
generator measures its own cost, the process CPU time per request and per chunk, so a
reader can tell that it was not the bottleneck; --self-test runs it against an in-process
fake server that answers instantly and reports the request and chunk rates it sustains.

Examples:
  tools/bench_serve.py --url http://127.0.0.1:8000 --num-requests 200 --request-rate 8 \\
      --synthetic-images 8 --image-ratio 0.3 --max-tokens-dist uniform:8:64 --json out.json
  tools/bench_serve.py --endpoint completions --request-rate inf --concurrency 16
  tools/bench_serve.py --self-test
"""
import argparse
import asyncio
import base64
import json
import math
import os
import random
import resource
import struct
import sys
import threading
import time
import urllib.parse
import zlib

# ----------------------------------------------------------------------------- prompts
# Words for random text prompts: common English words, each one or two LLaMA tokens, so
# a prompt of N words is about 1.3 N tokens on a LLaMA-2 vocabulary.
WORDS = (
    "the of and to in is was that for on as with by at from his her they this have had not "
    "are but were which one all their there been has when who will more would out can also "
    "into other some time two what only new these may first any then about after than over "
    "year most people such made many where between city world state school water river "
    "house music light small large early great long little green blue red yellow circle "
    "square triangle shape color count left right above below center corner edge line "
    "picture image question answer simple system number model paper table window garden "
    "mountain ocean forest morning evening winter summer journey market village station"
).split()

# Questions sent with an image (they suit the tiny shapes model; any VLM can answer them).
IMAGE_QUESTIONS = (
    "What color is the circle?", "How many shapes are there?", "Describe the image.",
    "What shape is in the picture?", "Where is the red shape?", "What colors do you see?",
)

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
          "yellow": (235, 210, 40), "purple": (140, 60, 180), "orange": (240, 140, 30)}


def png_bytes(width, height, rows):
    """Encodes RGB rows (each a bytes of width*3) as a PNG: signature, IHDR, one zlib
    IDAT with filter type 0 on every row, IEND."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    raw = b"".join(b"\x00" + r for r in rows)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6))
            + chunk(b"IEND", b""))


def synthetic_image(rng, size):
    """A light background with 1-3 filled circles, squares or triangles of distinct
    colours at random places, as PNG bytes."""
    bg = tuple(rng.randint(225, 250) for _ in range(3))
    pix = [bytearray(bytes(bg) * size) for _ in range(size)]
    for name in rng.sample(sorted(COLORS), rng.randint(1, 3)):
        col = bytes(COLORS[name])
        kind = rng.choice(("circle", "square", "triangle"))
        r = rng.randint(size // 10, size // 5)
        cx, cy = rng.randint(r, size - r - 1), rng.randint(r, size - r - 1)
        for y in range(cy - r, cy + r + 1):
            row = pix[y]
            for x in range(cx - r, cx + r + 1):
                dx, dy = x - cx, y - cy
                if kind == "circle":
                    inside = dx * dx + dy * dy <= r * r
                elif kind == "square":
                    inside = True
                else:  # apex at the top, base at the bottom
                    inside = abs(dx) * 2 * r <= (dy + r) * r
                if inside:
                    row[3 * x:3 * x + 3] = col
    return png_bytes(size, size, [bytes(r) for r in pix])


def load_images(args, rng):
    """The image pool as data: URLs (encoded once, before the run)."""
    urls = []
    if args.image_dir:
        mimes = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
                 ".webp": "image/webp", ".gif": "image/gif"}
        for name in sorted(os.listdir(args.image_dir)):
            mime = mimes.get(os.path.splitext(name)[1].lower())
            if mime:
                with open(os.path.join(args.image_dir, name), "rb") as f:
                    urls.append("data:%s;base64,%s" % (mime, base64.b64encode(f.read()).decode()))
        if not urls:
            sys.exit("bench_serve: no jpg/png/webp/gif files in %s" % args.image_dir)
    for _ in range(args.synthetic_images):
        data = synthetic_image(rng, args.image_size)
        urls.append("data:image/png;base64," + base64.b64encode(data).decode())
    return urls


def parse_range(spec, name):
    """'N' -> (N, N); 'lo:hi' -> (lo, hi)."""
    try:
        parts = [int(x) for x in spec.split(":")]
    except ValueError:
        sys.exit("bench_serve: bad %s %r" % (name, spec))
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or parts[0] < 1 or parts[1] < parts[0]:
        sys.exit("bench_serve: bad %s %r (want N or lo:hi, 1 <= lo <= hi)" % (name, spec))
    return parts


def max_tokens_sampler(args):
    """A function rng -> max_tokens from --max-tokens / --max-tokens-dist."""
    dist = args.max_tokens_dist
    if not dist:
        return lambda rng: args.max_tokens
    kind, _, rest = dist.partition(":")
    if kind == "uniform":
        lo, hi = parse_range(rest, "--max-tokens-dist")
        return lambda rng: rng.randint(lo, hi)
    if kind == "choice":  # choice:8,32,128
        vals = [int(v) for v in rest.split(",") if v]
        return lambda rng: rng.choice(vals)
    if kind == "exp":  # exp:MEAN[:MAX], geometric-like long tail, at least 1
        p = [float(v) for v in rest.split(":")]
        cap = int(p[1]) if len(p) > 1 else 10**9
        return lambda rng: max(1, min(cap, int(round(rng.expovariate(1.0 / p[0])))))
    sys.exit("bench_serve: --max-tokens-dist is uniform:LO:HI, choice:A,B,.. or exp:MEAN[:MAX]")


def build_requests(args, model):
    """The whole seeded request sequence: body bytes, whether it has an image, max_tokens
    and the arrival offset (seconds after the start). Identical for identical arguments,
    whichever server it is sent to."""
    # Separate streams for content and arrival times, so that the same seed gives the
    # same prompts, images and max_tokens at every request rate.
    rng = random.Random(args.seed)
    arrivals = random.Random(args.seed * 1000003 + 17)
    images = load_images(args, rng)
    if args.image_ratio > 0 and not images:
        sys.exit("bench_serve: --image-ratio needs --image-dir or --synthetic-images")
    if args.image_ratio > 0 and args.endpoint == "completions":
        sys.exit("bench_serve: images need --endpoint chat")
    words_lo, words_hi = parse_range(args.prompt_words, "--prompt-words")
    sample_max = max_tokens_sampler(args)
    extra = json.loads(args.extra_body) if args.extra_body else {}
    # Exactly round(ratio * N) requests carry an image, at seeded positions: the mix is
    # the same in every run, not a coin flip per request.
    with_image = set(rng.sample(range(args.num_requests),
                                round(args.image_ratio * args.num_requests)))
    # Images are dealt from a seeded shuffle of the pool, each once before any repeats:
    # a pool at least as large as the number of image requests means all distinct images
    # (no vision-cache hits), a smaller one means repeats at a known rate.
    deal = rng.sample(range(len(images)), len(images)) if images else []
    reqs, t, dealt = [], 0.0, 0
    for i in range(args.num_requests):
        if i and args.request_rate != math.inf:
            t += arrivals.expovariate(args.request_rate) if args.arrival == "poisson" \
                else 1.0 / args.request_rate
        has_image = i in with_image
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(words_lo, words_hi)))
        mt = sample_max(rng)
        body = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": mt, "temperature": args.temperature}
        if args.endpoint == "completions":
            body["prompt"] = text
        elif has_image:
            q = rng.choice(IMAGE_QUESTIONS)
            body["messages"] = [{"role": "user", "content": [
                {"type": "text", "text": q},
                {"type": "image_url", "image_url": {"url": images[deal[dealt % len(deal)]]}}]}]
            dealt += 1
        else:
            body["messages"] = [{"role": "user", "content": text}]
        body.update(extra)
        reqs.append({"id": i, "arrival_s": t, "image": has_image, "max_tokens": mt,
                     "body": json.dumps(body).encode()})
    return reqs


# ----------------------------------------------------------------------------- HTTP / SSE
class Endpoint:
    """Where requests go (host, port, path prefix, headers), and a pool of idle
    keep-alive connections to it: reusing connections, as HTTP clients normally do,
    spares a connect and a close per request, the largest part of the generator's cost."""

    def __init__(self, url, api_key, keep_alive=True):
        u = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        if u.scheme != "http":
            sys.exit("bench_serve: only http:// URLs are supported (got %s)" % url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.prefix = u.path.rstrip("/")
        if self.prefix.endswith("/v1"):  # accept both http://h:p and http://h:p/v1
            self.prefix = self.prefix[:-3]
        self.auth = ("Authorization: Bearer %s\r\n" % api_key) if api_key else ""
        self.keep_alive = keep_alive
        self.idle = []  # (reader, writer) of connections whose last response was read whole
        self.connects = 0

    def head(self, method, path, length=None):
        h = "%s %s%s HTTP/1.1\r\nHost: %s:%d\r\nUser-Agent: bench_serve\r\n" \
            "Accept: text/event-stream, application/json\r\n%s%s" % (
                method, self.prefix, path, self.host, self.port,
                "" if self.keep_alive else "Connection: close\r\n", self.auth)
        if length is not None:
            h += "Content-Type: application/json\r\nContent-Length: %d\r\n" % length
        return (h + "\r\n").encode()

    async def connect(self):
        """An idle pooled connection (reused=True) or a new one."""
        while self.idle:
            reader, writer = self.idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer, True
            writer.close()
        self.connects += 1
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return reader, writer, False

    def release(self, reader, writer, headers):
        """Pools a connection whose response was read to its end, unless either side
        asked to close it."""
        if self.keep_alive and headers.get("connection", "").lower() != "close":
            self.idle.append((reader, writer))
        else:
            writer.close()

    def close_all(self):
        for _, writer in self.idle:
            writer.close()
        self.idle = []


async def read_head(reader, response=True):
    """Status code (of a response; None for a request) and lower-cased headers."""
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1]) if response else None
    headers = {}
    for line in lines[1:]:
        k, sep, v = line.partition(":")
        if sep:
            headers[k.strip().lower()] = v.strip()
    return status, headers


async def body_pieces(reader, headers):
    """Yields the body as it arrives: de-chunked, by Content-Length, or up to EOF."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readline()).split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # the empty trailer
                return
            data = await reader.readexactly(size + 2)  # data + CRLF
            yield data[:-2]
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        headers["connection"] = "close"  # the body ends with the connection
        while True:
            data = await reader.read(65536)
            if not data:
                return
            yield data


async def send(ep, method, path, body=None):
    """Writes a request on a pooled or new connection and reads the response head.
    A reused connection that the server closed meanwhile (no response byte came back)
    is retried once on a new connection."""
    for attempt in (0, 1):
        reader, writer, reused = await ep.connect()
        writer.write(ep.head(method, path, None if body is None else len(body)) + (body or b""))
        try:
            status, headers = await read_head(reader)
            return reader, writer, status, headers
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            writer.close()
            if not reused or (isinstance(e, asyncio.IncompleteReadError) and e.partial):
                raise


async def http_get_json(ep, path, timeout=10):
    async with asyncio.timeout(timeout):
        reader, writer, status, headers = await send(ep, "GET", path)
        body = b"".join([p async for p in body_pieces(reader, headers)])
        ep.release(reader, writer, headers)
        return status, json.loads(body) if body else None


def chunk_text(ev):
    """The text a stream chunk carries (completions or chat form), '' if none."""
    ch = ev.get("choices") or ()
    if not ch:
        return ""
    c = ch[0]
    if "text" in c:
        return c["text"] or ""
    delta = c.get("delta") or {}
    return delta.get("content") or ""


def sse_events(buf, piece, data_lines):
    """Feeds one body piece to the SSE parser state (unfinished line, pending data lines);
    returns (new buf, payloads of the events completed by this piece). Lines may end in
    LF or CRLF; comments (": ping"), event:, id: and retry: lines are ignored."""
    buf += piece
    *lines, buf = buf.split(b"\n")  # keep the unfinished last line
    done = []
    for line in lines:
        if line.endswith(b"\r"):
            line = line[:-1]
        if line:
            if line.startswith(b"data:"):
                data_lines.append(line[5:].lstrip(b" "))
        elif data_lines:  # a blank line dispatches the event
            done.append(b"\n".join(data_lines))
            data_lines.clear()
    return buf, done


async def one_request(ep, path, req, rec, timeout):
    """Sends one streaming request and fills rec with its timings and token counts.
    Event timestamps are taken when the bytes holding the event are read."""
    clock = time.perf_counter
    writer = None
    try:
        async with asyncio.timeout(timeout):
            t0 = clock()
            rec["sent_s"] = t0
            reader, writer, status, headers = await send(ep, "POST", path, req["body"])
            rec["status"] = status
            times, usage, finish, done, buf, pending = [], None, None, False, b"", []
            if status != 200:
                body = b"".join([p async for p in body_pieces(reader, headers)])
                rec["error"] = body[:300].decode("utf-8", "replace")
            else:
                rec["events"] = 0  # kept up to date so that a stalled stream shows its progress
                async for piece in body_pieces(reader, headers):
                    now = clock()
                    buf, events = sse_events(buf, piece, pending)
                    rec["events"] += len(events)
                    for data in events:
                        if data == b"[DONE]":
                            done = True
                            continue
                        ev = json.loads(data)
                        if "error" in ev:
                            rec["error"] = json.dumps(ev["error"])[:300]
                        if chunk_text(ev):
                            times.append(now)
                        for c in ev.get("choices") or ():
                            finish = c.get("finish_reason") or finish
                        if ev.get("usage"):
                            usage = ev["usage"]
            end = clock()
            ep.release(reader, writer, headers)
            writer = None
        if status != 200:
            return
        if not done and "error" not in rec:
            rec["error"] = "stream ended without [DONE]"
        rec["e2e_s"] = end - t0
        rec["chunks"] = len(times)
        rec["finish_reason"] = finish
        if times:
            rec["ttft_s"] = times[0] - t0
            rec["itl_s"] = [b - a for a, b in zip(times, times[1:])]
        if usage and usage.get("completion_tokens") is not None:
            rec["output_tokens"], rec["tokens_from"] = usage["completion_tokens"], "usage"
            rec["prompt_tokens"] = usage.get("prompt_tokens")
        elif finish == "length":
            rec["output_tokens"], rec["tokens_from"] = req["max_tokens"], "length"
        else:
            rec["output_tokens"], rec["tokens_from"] = len(times), "chunks"
        n = rec["output_tokens"]
        if times and n > 1:
            rec["tpot_s"] = (rec["e2e_s"] - rec["ttft_s"]) / (n - 1)
        rec["ok"] = "error" not in rec  # an answer of 0 tokens (EOS first) is an answer
    except TimeoutError:
        rec["error"] = "timeout after %g s" % timeout
        rec["timeout"] = True
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        rec["error"] = "%s: %s" % (type(e).__name__, e)
    finally:
        rec["end_s"] = clock()
        if writer is not None:  # a failed or abandoned response: never reuse it
            writer.close()


# ----------------------------------------------------------------------------- run
async def run_load(ep, path, reqs, concurrency, timeout):
    """Dispatches every request at its arrival offset (open loop: a slow answer never
    delays later arrivals); with a concurrency cap, arrivals wait client-side for a slot
    and that wait is recorded as queue_s, not as latency (as vLLM's benchmark does)."""
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    recs = [{"id": r["id"], "image": r["image"], "max_tokens": r["max_tokens"], "ok": False}
            for r in reqs]
    clock = time.perf_counter

    async def fire(req, rec):
        arrived = clock()
        rec["lag_s"] = arrived - (start + req["arrival_s"])  # generator lateness
        if sem is None:
            await one_request(ep, path, req, rec, timeout)
        else:
            async with sem:
                rec["queue_s"] = clock() - arrived
                await one_request(ep, path, req, rec, timeout)

    tasks = []
    start = clock()
    for req, rec in zip(reqs, recs):
        delay = start + req["arrival_s"] - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(fire(req, rec)))
    await asyncio.gather(*tasks)
    end = clock()
    for rec in recs:  # times relative to the start, for plots
        for k in ("sent_s", "end_s"):
            if k in rec:
                rec[k] -= start
    return recs, end - start


def pct(xs, q):
    """Percentile with linear interpolation between closest ranks (numpy's default)."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100.0
    f = int(math.floor(k))
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


def stats_ms(xs):
    if not xs:
        return {"n": 0, "mean": None, "median": None, "p90": None, "p99": None, "max": None}
    return {"n": len(xs), "mean": 1e3 * sum(xs) / len(xs), "median": 1e3 * pct(xs, 50),
            "p90": 1e3 * pct(xs, 90), "p99": 1e3 * pct(xs, 99), "max": 1e3 * max(xs)}


def parse_goodput(spec):
    """'ttft:500,tpot:50,e2e:2000' (milliseconds) -> {'ttft_s': 0.5, ...}."""
    out = {}
    for part in filter(None, (spec or "").split(",")):
        k, _, v = part.partition(":")
        if k not in ("ttft", "tpot", "e2e") or not v:
            sys.exit("bench_serve: --goodput takes ttft:MS,tpot:MS,e2e:MS (any of them)")
        out[k + "_s"] = float(v) / 1e3
    return out


def summarize(recs, wall, goodput, cpu):
    """The run's summary. Rates divide by the duration up to the end of the last request
    that did not time out, so that a stream the server left hanging (counted as a
    timeout failure) does not stretch the throughput of all the others."""
    ends = [r["end_s"] for r in recs if "end_s" in r and not r.get("timeout")]
    duration = max(ends) if ends else wall
    ok = [r for r in recs if r["ok"]]
    failed = [r for r in recs if not r["ok"]]
    by_status = {}
    for r in failed:
        key = str(r.get("status", "no response"))
        by_status[key] = by_status.get(key, 0) + 1
    out_tok = sum(r["output_tokens"] for r in ok)
    in_tok = sum(r.get("prompt_tokens") or 0 for r in ok)
    chunks = sum(r.get("chunks", 0) for r in recs)
    s = {
        "completed": len(ok), "failed": len(failed), "failed_by_status": by_status,
        "http_429": by_status.get("429", 0),
        "timeouts": sum(1 for r in recs if r.get("timeout")),
        "duration_s": duration, "wall_s": wall,
        "total_input_tokens": in_tok, "input_tokens_known": all(
            r.get("prompt_tokens") is not None for r in ok),
        "total_output_tokens": out_tok,
        "output_tokens_from": sorted({r["tokens_from"] for r in ok}),
        "image_requests": sum(1 for r in recs if r["image"]),
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tok / duration if duration else 0.0,
        "total_token_throughput": (in_tok + out_tok) / duration if duration else 0.0,
        "chunks_per_output_token": (sum(r["chunks"] for r in ok) / out_tok) if out_tok else None,
        "mean_output_tokens": out_tok / len(ok) if ok else 0.0,
        "ttft_ms": stats_ms([r["ttft_s"] for r in ok if "ttft_s" in r]),
        "tpot_ms": stats_ms([r["tpot_s"] for r in ok if "tpot_s" in r]),
        "itl_ms": stats_ms([g for r in ok for g in r.get("itl_s", ())]),
        "e2e_ms": stats_ms([r["e2e_s"] for r in ok]),
        "dispatch_lag_ms": stats_ms([r["lag_s"] for r in recs if "lag_s" in r]),
    }
    if any("queue_s" in r for r in recs):
        s["client_queue_ms"] = stats_ms([r["queue_s"] for r in recs if "queue_s" in r])
    if goodput:
        def meets(r):
            return all(r.get(k, 0.0) <= v for k, v in goodput.items())
        good = sum(1 for r in ok if meets(r))
        s["goodput"] = {"targets_ms": {k[:-2]: v * 1e3 for k, v in goodput.items()},
                        "good_requests": good,
                        "request_goodput": good / duration if duration else 0.0}
    s["generator"] = {
        "cpu_s": cpu["cpu_s"], "loop_thread_cpu_s": cpu["thread_s"],
        "cpu_fraction_of_one_core": cpu["cpu_s"] / duration if duration else 0.0,
        "cpu_us_per_request": 1e6 * cpu["cpu_s"] / max(1, len(recs)),
        "cpu_us_per_chunk": 1e6 * cpu["cpu_s"] / chunks if chunks else None,
        "chunks": chunks, "connections_opened": cpu["connections"],
        "max_rss_mb": cpu["max_rss_mb"]}
    return s


def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def print_summary(s, title="Serving Benchmark Result"):
    w = 50
    print("{s:{c}^{n}}".format(s=" %s " % title, n=w, c="="))
    row = "{:<40} {:>10}".format
    print(row("Successful requests:", s["completed"]))
    print(row("Failed requests:", s["failed"]))
    if s["failed"]:
        print(row("  of which HTTP 429 (overload):", s["http_429"]))
        print(row("  of which timed out:", s["timeouts"]))
        for k, v in sorted(s["failed_by_status"].items()):
            print(row("  with HTTP status %s:" % k, v))
    print(row("Requests with an image:", s["image_requests"]))
    print(row("Benchmark duration (s):", fmt(s["duration_s"])))
    print(row("Total input tokens:", s["total_input_tokens"] if s["input_tokens_known"]
              else "%d?" % s["total_input_tokens"]))
    print(row("Total generated tokens:", s["total_output_tokens"]))
    print(row("Mean generated tokens per request:", fmt(s["mean_output_tokens"])))
    print(row("Request throughput (req/s):", fmt(s["request_throughput"])))
    if "goodput" in s:
        print(row("Request goodput (req/s):", fmt(s["goodput"]["request_goodput"])))
    print(row("Output token throughput (tok/s):", fmt(s["output_throughput"])))
    print(row("Total token throughput (tok/s):", fmt(s["total_token_throughput"])))
    for key, name, long in (("ttft_ms", "TTFT", "Time to First Token"),
                            ("tpot_ms", "TPOT", "Time per Output Token (excl. 1st token)"),
                            ("itl_ms", "ITL", "Inter-token Latency"),
                            ("e2e_ms", "E2EL", "End-to-end Latency")):
        print("{s:{c}^{n}}".format(s=long, n=w, c="-"))
        st = s[key]
        print(row("Mean %s (ms):" % name, fmt(st["mean"])))
        print(row("Median %s (ms):" % name, fmt(st["median"])))
        print(row("P90 %s (ms):" % name, fmt(st["p90"])))
        print(row("P99 %s (ms):" % name, fmt(st["p99"])))
    print(row("Stream chunks per output token:", fmt(s["chunks_per_output_token"])))
    g = s["generator"]
    print("{s:{c}^{n}}".format(s="Generator overhead", n=w, c="-"))
    print(row("Generator CPU time (s):", fmt(g["cpu_s"], ".3f")))
    print(row("Generator CPU (fraction of one core):", fmt(g["cpu_fraction_of_one_core"], ".3f")))
    print(row("Generator CPU per request (us):", fmt(g["cpu_us_per_request"], ".0f")))
    print(row("Generator CPU per chunk (us):", fmt(g["cpu_us_per_chunk"], ".1f")))
    print(row("P99 dispatch lag (ms):", fmt(s["dispatch_lag_ms"]["p99"])))
    print("=" * w, flush=True)


def cpu_snapshot():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, time.thread_time()


async def resolve_model(ep, model):
    if model:
        return model
    try:
        status, js = await http_get_json(ep, "/v1/models")
        if status == 200 and js and js.get("data"):
            return js["data"][0]["id"]
    except (OSError, ValueError, asyncio.TimeoutError):
        pass
    sys.exit("bench_serve: could not read the model id from %s/v1/models (give --model)" %
             ep.prefix)


async def benchmark(args, ep):
    """Builds the request sequence, runs it and returns (records, summary)."""
    model = await resolve_model(ep, args.model)
    reqs = build_requests(args, model)
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    warm = build_requests(argparse.Namespace(**dict(vars(args), seed=args.seed + 7919,
                                                    num_requests=args.warmup)), model) \
        if args.warmup else []
    for w in warm:  # one at a time, not recorded: connections, caches, page-in
        await one_request(ep, path, w, {}, args.timeout)
    c0, t0 = cpu_snapshot()
    n0 = ep.connects
    recs, duration = await run_load(ep, path, reqs, args.concurrency, args.timeout)
    c1, t1 = cpu_snapshot()
    ep.close_all()
    cpu = {"cpu_s": c1 - c0, "thread_s": t1 - t0, "connections": ep.connects - n0,
           "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return model, recs, summarize(recs, duration, parse_goodput(args.goodput), cpu)


# ----------------------------------------------------------------------------- self-test
async def fake_handler(reader, writer):
    """A fake OpenAI server: answers every streaming request at once with max_tokens
    one-token chunks, a usage chunk and [DONE] (chunked transfer encoding, keep-alive)."""
    try:
        while True:
            try:
                _, headers = await read_head(reader, response=False)
            except asyncio.IncompleteReadError:
                return  # the client closed the connection
            body = json.loads(await reader.readexactly(int(headers.get("content-length", 0))))
            n = int(body.get("max_tokens") or 16)
            if "messages" in body:
                one = {"id": "x", "object": "chat.completion.chunk", "model": "fake",
                       "usage": None, "choices": [{"index": 0, "delta": {"content": " tok"},
                                                   "finish_reason": None}]}
            else:
                one = {"id": "x", "object": "text_completion", "model": "fake",
                       "choices": [{"index": 0, "text": " tok", "finish_reason": None}]}
            ev = b"data: " + json.dumps(one).encode() + b"\n\n"
            piece = b"%x\r\n%s\r\n" % (len(ev), ev)
            last = {"id": "x", "choices": [],
                    "usage": {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": n + 8}}
            tail = b"data: " + json.dumps(last).encode() + b"\n\ndata: [DONE]\n\n"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            for _ in range(n):
                writer.write(piece)
                await writer.drain()  # one chunk per write, as a real server streams
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail))
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError, ValueError):
        pass
    finally:
        writer.close()


def start_fake_server():
    """Runs the fake server on its own event loop in a daemon thread of this process;
    returns its port. The generator's own cost is its loop thread's CPU time."""
    ready = threading.Event()
    box = {}

    def serve():
        loop = asyncio.new_event_loop()
        srv = loop.run_until_complete(asyncio.start_server(fake_handler, "127.0.0.1", 0,
                                                           backlog=4096))
        box["port"] = srv.sockets[0].getsockname()[1]
        ready.set()
        loop.run_forever()

    threading.Thread(target=serve, daemon=True).start()
    ready.wait()
    return box["port"]


async def self_test(args):
    """Two phases against the fake server, all requests at once (rate inf) under a
    concurrency cap: short answers (request rate) and long answers (chunk rate)."""
    port = start_fake_server()
    ep = Endpoint("http://127.0.0.1:%d" % port, None)
    n = args.num_requests if args.num_requests_given else 2000
    res = {}
    for phase, tokens, count in (("requests", 2, n), ("chunks", 128, max(20, n // 8))):
        a = argparse.Namespace(**dict(vars(args), num_requests=count, request_rate=math.inf,
                                      max_tokens=tokens, max_tokens_dist=None, image_ratio=0.0,
                                      warmup=0, model="fake",
                                      concurrency=args.concurrency or 32))
        _, recs, s = await benchmark(a, ep)
        g = s["generator"]
        res[phase] = {
            "requests": count, "completed": s["completed"], "chunks": g["chunks"],
            "duration_s": s["duration_s"],
            "requests_per_s": s["completed"] / s["duration_s"],
            "chunks_per_s": g["chunks"] / s["duration_s"],
            "loop_thread_cpu_us_per_request": 1e6 * g["loop_thread_cpu_s"] / count,
            "loop_thread_cpu_us_per_chunk": 1e6 * g["loop_thread_cpu_s"] / max(1, g["chunks"]),
            "process_cpu_us_per_request": g["cpu_us_per_request"],
        }
    rq, ck = res["requests"], res["chunks"]
    # The generator's own ceilings: one core's worth of its loop thread's CPU per item.
    res["max_request_rate"] = rq["requests_per_s"]
    res["max_chunk_rate"] = ck["chunks_per_s"]
    res["generator_only_request_ceiling"] = 1e6 / rq["loop_thread_cpu_us_per_request"]
    res["generator_only_chunk_ceiling"] = 1e6 / ck["loop_thread_cpu_us_per_chunk"]
    ok = rq["completed"] == rq["requests"] and ck["completed"] == ck["requests"]
    res["ok"] = ok
    w = 50
    print("{s:{c}^{n}}".format(s=" bench_serve self-test ", n=w, c="="))
    row = "{:<40} {:>10}".format
    print(row("Requests completed:", "%d/%d" % (rq["completed"] + ck["completed"],
                                                rq["requests"] + ck["requests"])))
    print(row("Sustained request rate (req/s):", fmt(rq["requests_per_s"], ".0f")))
    print(row("Sustained chunk rate (chunks/s):", fmt(ck["chunks_per_s"], ".0f")))
    print(row("Generator CPU per request (us):", fmt(rq["loop_thread_cpu_us_per_request"], ".0f")))
    print(row("Generator CPU per chunk (us):", fmt(ck["loop_thread_cpu_us_per_chunk"], ".1f")))
    print(row("Generator-only request ceiling (req/s):",
              fmt(res["generator_only_request_ceiling"], ".0f")))
    print(row("Generator-only chunk ceiling (chunks/s):",
              fmt(res["generator_only_chunk_ceiling"], ".0f")))
    print("(sustained rates include the fake server, which shares this process)")
    print("=" * w, flush=True)
    return res


# ----------------------------------------------------------------------------- main
def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="Open-loop serving benchmark for OpenAI-compatible endpoints "
                    "(streaming; TTFT, TPOT, ITL, e2e, throughput, goodput).")
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default http://127.0.0.1:8000)")
    ap.add_argument("--endpoint", choices=("chat", "completions"), default="chat",
                    help="/v1/chat/completions (default) or /v1/completions")
    ap.add_argument("--model", help="model id (default: the first of GET /v1/models)")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                    help="sent as Authorization: Bearer (default $OPENAI_API_KEY)")
    ap.add_argument("--num-requests", type=int, default=None, help="requests to send (200)")
    ap.add_argument("--request-rate", type=float, default=math.inf,
                    help="mean arrivals per second; inf (default) sends all at once")
    ap.add_argument("--arrival", choices=("poisson", "fixed"), default="poisson",
                    help="exponential gaps (Poisson process, default) or evenly spaced arrivals")
    ap.add_argument("--concurrency", type=int, default=0,
                    help="cap on requests in flight (0 = none; later arrivals wait client-side)")
    ap.add_argument("--prompt-words", default="8:32", help="text prompt length in words, N or LO:HI (default 8:32)")
    ap.add_argument("--image-dir", help="folder of jpg/png/webp/gif images to send")
    ap.add_argument("--synthetic-images", type=int, default=0,
                    help="also draw N PNG images of coloured shapes (images are used each "
                         "once, in seeded order, before any repeats)")
    ap.add_argument("--image-size", type=int, default=224, help="side of synthetic images in pixels (default 224)")
    ap.add_argument("--image-ratio", type=float, default=0.0,
                    help="fraction of chat requests that carry an image (exactly, rounded)")
    ap.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request (default 32)")
    ap.add_argument("--max-tokens-dist",
                    help="sample max_tokens instead: uniform:LO:HI, choice:A,B,C or exp:MEAN[:MAX]")
    ap.add_argument("--temperature", type=float, default=0.0, help="(default 0)")
    ap.add_argument("--extra-body", help="JSON object merged into every request body "
                                         "(e.g. '{\"ignore_eos\": true}' where supported)")
    ap.add_argument("--warmup", type=int, default=0,
                    help="requests sent one by one before the measured run, not recorded (default 0)")
    ap.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds (default 600)")
    ap.add_argument("--no-keep-alive", action="store_true",
                    help="a new connection per request (Connection: close)")
    ap.add_argument("--seed", type=int, default=0, help="(default 0)")
    ap.add_argument("--goodput", help="targets for goodput, ms: ttft:MS,tpot:MS,e2e:MS")
    ap.add_argument("--json", help="write the summary and every request's record here")
    ap.add_argument("--label", default="", help="free text stored in the JSON")
    ap.add_argument("--quiet", action="store_true", help="no summary on stdout")
    ap.add_argument("--self-test", action="store_true",
                    help="measure the generator against an in-process instant fake server")
    args = ap.parse_args(argv)
    args.num_requests_given = args.num_requests is not None
    if args.num_requests is None:
        args.num_requests = 200
    if args.num_requests < 1 or args.request_rate <= 0 or args.concurrency < 0:
        ap.error("--num-requests >= 1, --request-rate > 0, --concurrency >= 0")
    if not 0.0 <= args.image_ratio <= 1.0:
        ap.error("--image-ratio is a fraction in [0, 1]")
    return args


def config_of(args, model):
    keep = ("url", "endpoint", "num_requests", "request_rate", "arrival", "concurrency",
            "prompt_words", "image_dir", "synthetic_images", "image_size", "image_ratio",
            "max_tokens", "max_tokens_dist", "temperature", "extra_body", "warmup", "seed",
            "timeout", "no_keep_alive",
            "goodput", "label")
    cfg = {k: getattr(args, k) for k in keep}
    cfg["request_rate"] = "inf" if args.request_rate == math.inf else args.request_rate
    cfg["model"] = model
    return cfg


def main(argv=None):
    args = parse_args(argv)
    if args.self_test:
        res = asyncio.run(self_test(args))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"self_test": res}, f, indent=1)
        return 0 if res["ok"] else 1
    ep = Endpoint(args.url, args.api_key, keep_alive=not args.no_keep_alive)
    model, recs, s = asyncio.run(benchmark(args, ep))
    if not args.quiet:
        print_summary(s)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": config_of(args, model), "summary": s, "requests": recs}, f)
    return 0 if s["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
