"""http(s) image URLs (server/fetch.c): fetched only when enabled, only from allowed hosts,
never from loopback/private/link-local/metadata addresses, within size, time and redirect
limits, and every refusal a 400 naming its reason.

The images come from an HTTP server in this test process (a thread on 127.0.0.1), which
records every request and when each connection closed. Loopback is forbidden to the
daemon like every other non-public address; the daemons here run with the test-only
COGVLM_TEST_ALLOW_LOOPBACK_MEDIA=<that server's port> (docs/SECURITY.md), which lets
them reach loopback on that one port and nothing else: a second local server on another
port stands for "loopback, not allowed"."""
import http.server
import select
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse

import pytest

from apiutil import (HOST, SERVER_BIN, Server, chat_body, check_error, data_url, jpeg_bytes,
                     png_bytes, run_in_thread, validate)
import cvlmtest

CHAT = "/v1/chat/completions"
MAX_IMAGE = 1024 * 1024       # --max-image-bytes of the daemons here
MEDIA_TIMEOUT = 6             # --media-timeout (s)
BIG = 3 * 1024 * 1024         # bodies over the limit


# ------------------------------------------------------------------------- image server
class ImageHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):  # quiet
        pass

    def record(self, event):
        self.server.events.append((time.monotonic(), self.path, event))

    def head(self, code=200, ctype="image/png", length=None, extra=()):
        self.send_response(code)
        if ctype:
            self.send_header("Content-Type", ctype)
        if length is not None:
            self.send_header("Content-Length", str(length))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()

    def send_bytes(self, data, ctype="image/png", code=200):
        self.head(code, ctype, len(data))
        self.wfile.write(data)

    def wait_closed(self, limit=30):
        """Blocks until the peer (the daemon's fetch) closes the connection; records it."""
        sock = self.connection
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            r, _, _ = select.select([sock], [], [], 0.05)
            if r:
                try:
                    if sock.recv(1, socket.MSG_PEEK) == b"":
                        self.record("closed")
                        return
                except OSError:
                    self.record("closed")
                    return
        self.record("still open")

    def stream(self, total, chunked=False):
        """PNG signature, then zeros, up to total bytes; stops when the peer cuts."""
        piece = b"\x00" * 65536
        sent = 0
        try:
            first = cvlmtest.PNG_MAGIC
            while sent < total:
                data = first or piece
                first = b""
                if chunked:
                    self.wfile.write(b"%x\r\n" % len(data) + data + b"\r\n")
                else:
                    self.wfile.write(data)
                sent += len(data)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
            self.record(f"sent all {sent}")
        except OSError:
            self.record(f"cut after {sent}")
        self.close_connection = True

    def do_GET(self):  # noqa: C901 - one branch per scenario
        u = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(u.query))
        self.record("request")
        files = self.server.files
        if u.path in files:
            data, ctype = files[u.path]
            return self.send_bytes(data, ctype)
        if u.path == "/redirect":
            return self.head(int(q.get("code", 302)), None, 0, [("Location", q["to"])])
        if u.path == "/loop":
            return self.head(302, None, 0, [("Location", "/loop")])
        if u.path == "/chain":  # n redirects in all, the last one to the image
            n = int(q["n"])
            loc = f"/chain?n={n - 1}&img={q['img']}" if n > 1 else q["img"]
            return self.head(301, "text/html", 0, [("Location", loc)])
        if u.path == "/hang":  # headers never come
            self.record("hanging")
            return self.wait_closed()
        if u.path == "/slow-body":  # headers, 8 bytes, then nothing
            self.head(200, "image/png", 5000)
            self.wfile.write(cvlmtest.PNG_MAGIC)
            self.wfile.flush()
            self.record("hanging")
            return self.wait_closed()
        if u.path == "/big-declared":  # Content-Length over the limit, no body
            self.head(200, "image/png", BIG)
            self.wfile.flush()
            return self.wait_closed(10)
        size = int(q.get("mb", 0)) * 1024 * 1024 or BIG
        if u.path == "/big-close":  # no length: read until close, more than the limit
            self.head(200, "image/png", None, [("Connection", "close")])
            return self.stream(size)
        if u.path == "/big-chunked":
            self.head(200, "image/png", None, [("Transfer-Encoding", "chunked")])
            return self.stream(size, chunked=True)
        if u.path == "/lying":  # announces 2000 bytes, sends megabytes
            self.head(200, "image/png", 2000, [("Connection", "close")])
            return self.stream(BIG)
        if u.path == "/truncated":  # announces 5000 bytes, sends 100, closes
            self.head(200, "image/png", 5000, [("Connection", "close")])
            self.wfile.write(self.server.files["/img.png"][0][:100])
            self.close_connection = True
            return None
        if u.path == "/status":
            return self.send_bytes(b"nope", "text/plain", int(q["code"]))
        return self.send_bytes(b"not found", "text/plain", 404)


class ImageServer:
    def __init__(self):
        self.httpd = http.server.ThreadingHTTPServer((HOST, 0), ImageHandler)
        self.httpd.daemon_threads = True
        self.httpd.events = []
        self.httpd.files = {}
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path, host=HOST):
        return f"http://{host}:{self.port}{path}"

    def add(self, path, data, ctype="image/png"):
        self.httpd.files[path] = (data, ctype)

    def events(self, prefix=None):
        return [(t, p, e) for t, p, e in list(self.httpd.events)
                if prefix is None or p.startswith(prefix)]

    def wait_event(self, prefix, event, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, p, e in self.events(prefix):
                if e.startswith(event):
                    return t
            time.sleep(0.02)
        raise AssertionError(f"the image server saw no {event!r} for {prefix}: {self.events()}")

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


PNG = png_bytes(40, 30, (30, 90, 200))
JPEG = jpeg_bytes(64, 48)


@pytest.fixture(scope="module")
def images():
    srv = ImageServer()
    srv.add("/img.png", PNG)
    srv.add("/img.jpg", JPEG, "image/jpeg")
    srv.add("/chain.png", png_bytes(24, 24, (250, 250, 10)))
    srv.add("/no-type.png", png_bytes(20, 20, (5, 5, 5)), None)
    srv.add("/octet.png", png_bytes(22, 20, (9, 9, 9)), "application/octet-stream")
    srv.add("/wrong-type.png", PNG, "text/html; charset=utf-8")
    srv.add("/page.html", b"<!doctype html><html><body>hello</body></html>" * 4, "image/png")
    srv.add("/short.png", PNG[:60])  # a whole answer, but not a whole PNG
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def other_local():
    """A second local server, on a port the daemons may NOT reach (loopback stays
    forbidden there): any request it sees is a failure."""
    srv = ImageServer()
    srv.add("/img.png", PNG)
    yield srv
    srv.close()


def fetch_args(**more):
    a = {"--max-image-bytes": str(MAX_IMAGE), "--media-timeout": str(MEDIA_TIMEOUT),
         "--media-connect-timeout": "3"}
    a.update(more)
    return a


def start(logs_dir, name, images, args):
    return Server(logs_dir, name, args=args,
                  env={"COGVLM_TEST_ALLOW_LOOPBACK_MEDIA": str(images.port)}).start()


@pytest.fixture(scope="module")
def fsrv(logs_dir, images):
    """Fetches from 127.0.0.1 only (the allow-list)."""
    s = start(logs_dir, "fetch-list", images, fetch_args(**{"--allowed-media-domains": HOST}))
    yield s
    assert s.stop() == 0, s.log_tail()


@pytest.fixture(scope="module")
def asrv(logs_dir, images):
    """Fetches from any host (--allow-any-media-domain): only the address rules apply."""
    s = start(logs_dir, "fetch-any", images, fetch_args(**{"--allow-any-media-domain": "true"}))
    yield s
    assert s.stop() == 0, s.log_tail()


def ask(server, url, max_tokens=6, timeout=60):
    return server.post(CHAT, chat_body(server.model_id, "What is in the picture?", image_url=url,
                                       max_tokens=max_tokens, temperature=0), timeout=timeout)


def refused(resp, reason, code):
    """A 400 invalid_request_error naming reason, code and the image_url's place."""
    err = check_error(resp, 400, param="messages", code=code, etype="invalid_request_error")
    assert err["param"] == "messages[0].content[1].image_url.url", err
    assert reason in err["message"], err
    return err


# ------------------------------------------------------------------------- enabled or not
def test_disabled_by_default(server, images):
    """Without --allowed-media-domains / --allow-any-media-domain: a 400 saying how to
    enable it, and nothing fetched."""
    n = len(images.events())
    for url in (images.url("/img.png"), "https://example.com/cat.png"):
        err = refused(ask(server, url), "does not fetch", "remote_images_disabled")
        assert "--allowed-media-domains" in err["message"] and "data:" in err["message"]
    assert len(images.events()) == n


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/img.png", "file:///etc/passwd",
                                 "gopher://127.0.0.1:70/", "javascript:alert(1)"])
def test_bad_scheme(fsrv, server, url):
    refused(ask(fsrv, url), "bad scheme", "image_url_bad_scheme")
    refused(ask(server, url), "bad scheme", "image_url_bad_scheme")  # disabled: the same


def test_bad_option_values_refused_at_start():
    for args, env in ((["--allowed-media-domains", "http://example.com"], {}),
                      (["--allowed-media-domains", "example.com:8080"], {})):
        r = subprocess.run([str(SERVER_BIN)] + args, capture_output=True, text=True, timeout=20,
                           env=cvlmtest.server_env(env))
        assert r.returncode == 2, r
        assert "allowed_media_domains" in r.stderr and "not a host name" in r.stderr, r.stderr


# ------------------------------------------------------------------------- good images
@pytest.mark.parametrize("path,mime,data", [("/img.png", "image/png", PNG),
                                            ("/img.jpg", "image/jpeg", JPEG)],
                         ids=["png", "jpeg"])
def test_fetched_equals_data_url(fsrv, images, path, mime, data):
    """The same picture gives the same answer fetched as sent inline (temperature 0), and
    has the same content hash: the second request does not run the vision tower again
    (the prefix or the vision cache has it)."""
    r1 = ask(fsrv, images.url(path))
    assert r1.status == 200, r1
    tower = fsrv.metric("cogvlm_vision_tower_seconds_count")
    r2 = ask(fsrv, data_url(data, mime))
    assert r2.status == 200, r2
    a, b = validate("chat", r1.json()), validate("chat", r2.json())
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    assert a["usage"] == b["usage"]
    assert fsrv.metric("cogvlm_vision_tower_seconds_count") == tower


@pytest.mark.parametrize("path", ["/no-type.png", "/octet.png"])
def test_generic_or_missing_content_type_accepted(fsrv, images, path):
    r = ask(fsrv, images.url(path), max_tokens=2)
    assert r.status == 200, r


def test_redirects_up_to_three(fsrv, images):
    r = ask(fsrv, images.url("/chain?n=3&img=/chain.png"), max_tokens=2)
    assert r.status == 200, r
    refused(ask(fsrv, images.url("/chain?n=4&img=/chain.png")), "too many redirects",
            "image_too_many_redirects")


def test_streaming(fsrv, images):
    r = fsrv.post(CHAT, chat_body(fsrv.model_id, "Hi", image_url=images.url("/img.png"),
                                  max_tokens=3, stream=True))
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream"), r
    assert cvlmtest.sse_events(r.body)[-1] == "[DONE]"


def test_one_image_per_conversation(fsrv, images):
    """An image URL counts like a data URL: two images are a 400, and nothing is fetched."""
    n = len(images.events())
    body = chat_body(fsrv.model_id, "Two?", image_url=images.url("/img.png"), max_tokens=2)
    body["messages"][0]["content"].append({"type": "image_url",
                                           "image_url": {"url": data_url(PNG)}})
    check_error(fsrv.post(CHAT, body), 400, param="messages")
    body["messages"][0]["content"][2]["image_url"]["url"] = images.url("/img.jpg")
    check_error(fsrv.post(CHAT, body), 400, param="messages")
    assert len(images.events()) == n


# ------------------------------------------------------------------------- refusals
def test_domain_not_allowed(fsrv, images):
    """localhost is 127.0.0.1 too, but not on the list (names are compared, not
    addresses): refused before any connection."""
    n = len(images.events())
    refused(ask(fsrv, images.url("/img.png", host="localhost")), "domain not allowed",
            "image_domain_not_allowed")
    refused(ask(fsrv, "https://example.com/img.png"), "domain not allowed",
            "image_domain_not_allowed")
    # a redirect to a host off the list
    refused(ask(fsrv, images.url("/redirect?to=" + urllib.parse.quote(
        images.url("/img.png", host="localhost")))), "domain not allowed",
        "image_domain_not_allowed")
    assert [e for e in images.events()[n:] if not e[1].startswith("/redirect")] == []


def test_redirect_loop(fsrv, images):
    refused(ask(fsrv, images.url("/loop")), "too many redirects", "image_too_many_redirects")


@pytest.mark.parametrize("target", [
    "http://10.0.0.1/img.png",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::ffff:10.0.0.1]/img.png",
    "http://[::ffff:169.254.169.254]/",
    "http://[fd00:ec2::254]/",
    "http://[::1]/img.png",
    "http://0.0.0.0/img.png",
    "http://100.64.0.1/img.png",
    "http://192.168.1.1/img.png",
    "http://[fe80::1]/img.png",
    "http://224.0.0.1/img.png",
    "http://2130706433/img.png",   # 127.0.0.1 spelt as one number
    "http://0x7f.0.0.1/img.png",   # ... in hex
    "http://127.1/img.png",        # ... shortened
    "http://[::ffff:7f00:1]/img.png",
])
def test_redirect_to_forbidden_address(asrv, images, target):
    """Whatever the host list says (any host here), a hop to a non-public address is
    refused before connecting: fast (no connect timeout to wait for)."""
    t0 = time.monotonic()
    err = refused(ask(asrv, images.url("/redirect?to=" + urllib.parse.quote(target))),
                  "forbidden address", "image_forbidden_address")
    assert time.monotonic() - t0 < 2, "refused only after trying to connect"
    assert "redirect 1" in err["message"], err
    refused(ask(asrv, target), "forbidden address", "image_forbidden_address")


def test_redirect_to_loopback_not_allowed(asrv, fsrv, images, other_local):
    """Loopback on another port than the test switch names is forbidden: as an address
    literal (checked with the URL), and as a name (localhost) that only the connect-time
    check sees."""
    to_ip = images.url("/redirect?to=" + urllib.parse.quote(other_local.url("/img.png")))
    direct = other_local.url("/img.png", host="localhost")
    to_name = images.url("/redirect?to=" + urllib.parse.quote(direct))
    for s, url in ((fsrv, to_ip), (asrv, to_ip), (asrv, to_name), (asrv, direct)):
        t0 = time.monotonic()
        err = refused(ask(s, url), "forbidden address", "image_forbidden_address")
        assert time.monotonic() - t0 < 2
        assert ("redirect" in err["message"]) == (url != direct), err
    assert other_local.events() == [], "a forbidden address was connected to"


def test_loopback_forbidden_without_test_switch(make_server, images):
    s = make_server("fetch-noswitch", args=fetch_args(**{"--allow-any-media-domain": "true"}))
    n = len(images.events())
    for host in (HOST, "localhost"):
        refused(ask(s, images.url("/img.png", host=host)), "forbidden address",
                "image_forbidden_address")
    assert len(images.events()) == n


@pytest.mark.parametrize("path,reason,code", [
    ("/wrong-type.png", "not an image", "invalid_image"),   # PNG bytes, Content-Type text/html
    ("/page.html", "not an image", "invalid_image"),        # HTML sent as image/png
    ("/status?code=404", "HTTP 404", "image_unreachable"),
    ("/status?code=500", "HTTP 500", "image_unreachable"),
    ("/truncated", "truncated", "image_fetch_truncated"),
    ("/big-declared", "too large", "image_fetch_too_large"),
    ("/big-close", "too large", "image_fetch_too_large"),
    ("/big-chunked", "too large", "image_fetch_too_large"),
])
def test_refused_answers(fsrv, images, path, reason, code):
    t0 = time.monotonic()
    refused(ask(fsrv, images.url(path)), reason, code)
    assert time.monotonic() - t0 < MEDIA_TIMEOUT - 1, "refused only at the timeout"
    fsrv.assert_healthy()


def test_too_large_body_is_cut(fsrv, images):
    """A body over the limit is cut as soon as it passes it, not read to its end: of 64 MiB
    (more than the socket buffers hold) the image server could send only a part."""
    for path in ("/big-close?mb=64", "/big-chunked?mb=64"):
        refused(ask(fsrv, images.url(path)), "too large", "image_fetch_too_large")
        images.wait_event(path, "cut after")


def test_lying_content_length(fsrv, images):
    """Content-Length says 2000 and megabytes follow: only the announced bytes are read
    (a truncated PNG: not a decodable image), never more than the limit."""
    err = check_error(ask(fsrv, images.url("/lying")), 400, param="messages")
    assert err["code"] in ("invalid_image", "image_fetch_too_large"), err


def test_truncated_image_does_not_decode(fsrv, images):
    err = check_error(ask(fsrv, images.url("/short.png")), 400, code="invalid_image")
    assert err["param"] == "messages[0].content[1].image_url.url", err


def test_unknown_host(asrv):
    refused(ask(asrv, "http://no-such-host.invalid/img.png"), "unreachable", "image_unreachable")


@pytest.mark.skipif(not shutil.which("openssl"), reason="openssl not installed")
def test_https_certificate_verified(tmp_path, logs_dir):
    """https: a self-signed certificate is refused (TLS is verified), as unreachable."""
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={HOST}",
                    "-addext", f"subjectAltName=IP:{HOST}"], check=True, capture_output=True)
    tls = ImageServer()
    tls.add("/img.png", PNG)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    tls.httpd.socket = ctx.wrap_socket(tls.httpd.socket, server_side=True)
    s = Server(logs_dir, "fetch-tls", args=fetch_args(**{"--allowed-media-domains": HOST}),
               env={"COGVLM_TEST_ALLOW_LOOPBACK_MEDIA": str(tls.port)}).start()
    try:
        err = refused(ask(s, f"https://{HOST}:{tls.port}/img.png"), "unreachable",
                      "image_unreachable")
        assert "certificate" in err["message"].lower() or "ssl" in err["message"].lower(), err
    finally:
        assert s.stop() == 0, s.log_tail()
        tls.close()


# ------------------------------------------------------------------------- time, clients
def test_slow_server_times_out_while_daemon_serves_others(fsrv, images):
    """A fetch whose body stalls ends in a 400 'timed out' at --media-timeout; meanwhile the
    loop is free: another request (with an image URL too) is answered at once."""
    t0 = time.monotonic()
    th, res = run_in_thread(ask, fsrv, images.url("/slow-body"))
    images.wait_event("/slow-body", "hanging")
    t1 = time.monotonic()
    r = ask(fsrv, images.url("/img.jpg"), max_tokens=2)
    other = time.monotonic() - t1
    assert r.status == 200, r
    assert fsrv.get("/health").status == 200
    th.join(MEDIA_TIMEOUT + 20)
    took = time.monotonic() - t0
    assert "error" not in res, res
    refused(res["value"], "timed out", "image_fetch_timeout")
    assert other < 3 and other < took - 1, (other, took)
    assert MEDIA_TIMEOUT - 1 < took < MEDIA_TIMEOUT + 5, took
    images.wait_event("/slow-body", "closed")  # and the daemon closed that connection


def test_headers_never_come(fsrv, images):
    t0 = time.monotonic()
    refused(ask(fsrv, images.url("/hang")), "timed out", "image_fetch_timeout")
    assert time.monotonic() - t0 < MEDIA_TIMEOUT + 5


def test_client_disconnect_cancels_fetch(fsrv, images):
    """The client hangs up while its image is being fetched: the fetch stops (the image
    server sees its connection closed long before the media timeout), the log says so, and
    the daemon serves the next request."""
    path = f"/hang?tag={time.monotonic_ns()}"
    body = chat_body(fsrv.model_id, "Hi", image_url=images.url(path), max_tokens=2)
    sock = socket.create_connection((HOST, fsrv.port), timeout=10)
    sock.sendall(cvlmtest.request_bytes("POST", CHAT, body, port=fsrv.port))
    images.wait_event(path, "hanging")
    t_close = time.monotonic()
    sock.close()
    t_seen = images.wait_event(path, "closed", timeout=MEDIA_TIMEOUT + 5)
    assert t_seen - t_close < 2.5, f"the fetch ran {t_seen - t_close:.1f} s after the client left"
    deadline = time.monotonic() + 5
    while "image_url was fetched: fetch cancelled" not in fsrv.log_text():
        assert time.monotonic() < deadline, fsrv.log_tail()
        time.sleep(0.05)
    r = ask(fsrv, images.url("/img.png"), max_tokens=2)
    assert r.status == 200, r


def test_drain_cancels_fetch(make_server, images):
    """SIGTERM while an image is being fetched: the fetch stops at once (503, nothing was
    begun), the image server sees the connection closed, the daemon exits 0."""
    s = make_server("fetch-drain", args=fetch_args(**{"--allowed-media-domains": HOST}),
                    env={"COGVLM_TEST_ALLOW_LOOPBACK_MEDIA": str(images.port)})
    path = f"/hang?tag={time.monotonic_ns()}"
    th, res = run_in_thread(ask, s, images.url(path))
    images.wait_event(path, "hanging")
    t0 = time.monotonic()
    s.signal(signal.SIGTERM)
    th.join(20)
    assert "error" not in res, res
    check_error(res["value"], 503)
    assert time.monotonic() - t0 < 3
    images.wait_event(path, "closed", timeout=5)
    assert s.proc.wait(20) == 0, s.log_tail()
