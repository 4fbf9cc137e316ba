"""The catalogue of bad requests: each gets its documented status and an OpenAI-shaped
error body (validated against both specs), and the server stays healthy afterwards."""
import base64
import socket
import time

import pytest

from apiutil import (CONTEXT_LEN, HOST, chat_body, check_error, data_url, jpeg_bytes,
                     png_bytes, png_bomb, png_claiming)

pytestmark = pytest.mark.usefixtures("healthy_after")

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"


def post(server, path, body, **kw):
    return server.post(path, body, **kw)


# ----------------------------------------------------------------------------- malformed bodies
@pytest.mark.parametrize("raw", [
    b"{", b"{\"model\": ", b"not json at all", b"{\"model\": \"x\",}", b"\xff\xfe\x00",
    b"", b"[]", b"\"a string\"", b"42", b"null",
], ids=["open-brace", "truncated", "text", "trailing-comma", "binary", "empty", "array",
        "string", "number", "null"])
@pytest.mark.parametrize("path", [CHAT, COMP])
def test_malformed_json(server, path, raw):
    r = server.request("POST", path, raw, {"Content-Type": "application/json"})
    check_error(r, 400, etype="invalid_request_error")


# ----------------------------------------------------------------------------- wrong types / ranges
CHAT_BAD_FIELDS = [
    ("model", 42), ("messages", "hello"), ("messages", [{"role": "user"}]),
    ("messages", [{"role": "user", "content": 5}]),
    ("max_tokens", "ten"), ("max_tokens", 1.5), ("max_tokens", 0), ("max_tokens", -3),
    ("max_completion_tokens", "x"),
    ("temperature", "hot"), ("temperature", -0.5), ("temperature", 2.5),
    ("top_p", "x"), ("top_p", 1.5), ("top_k", "x"), ("min_p", "x"),
    ("repetition_penalty", "x"), ("presence_penalty", "x"), ("frequency_penalty", "x"),
    ("stop", 5), ("stop", [1, 2]), ("stop", ["s"] * 17),
    ("seed", "x"), ("n", "2"), ("n", 0), ("n", 5),  # server runs with --max-n 4
    ("stream", "yes"), ("stream_options", "x"),
    ("stream_options", {"include_usage": "yes"}, "include_usage"),
    ("logprobs", "x"), ("top_logprobs", "x"), ("top_logprobs", 21), ("top_logprobs", -1),
    ("user", 5),
]


@pytest.mark.parametrize("field,value,named", [(c + (c[0],))[:3] for c in CHAT_BAD_FIELDS],
                         ids=[f"{c[0]}={c[1]!r}"[:40] for c in CHAT_BAD_FIELDS])
def test_chat_bad_field(server, field, value, named):
    body = chat_body(server.model_id, "hi", max_tokens=4, temperature=0)
    body[field] = value
    if field == "stream_options":
        body["stream"] = True
    r = post(server, CHAT, body)
    # a non-string model is a type error too (not a 404)
    check_error(r, 400, param=named, etype="invalid_request_error")


COMP_BAD_FIELDS = [
    ("prompt", 5), ("prompt", ["a", 5]), ("prompt", {"x": 1}),
    ("max_tokens", "x"), ("temperature", "x"), ("temperature", 3), ("n", 0),
    ("logprobs", "x"), ("logprobs", 6), ("logprobs", -1),
    ("echo", True), ("suffix", "tail"), ("stop", 7), ("seed", 1.5), ("stream", 1),
]


@pytest.mark.parametrize("field,value", COMP_BAD_FIELDS,
                         ids=[f"{f}={v!r}"[:40] for f, v in COMP_BAD_FIELDS])
def test_completion_bad_field(server, field, value):
    body = {"model": server.model_id, "prompt": "hi", "max_tokens": 4, "temperature": 0}
    body[field] = value
    r = post(server, COMP, body)
    check_error(r, 400, param=field, etype="invalid_request_error")


@pytest.mark.parametrize("path,body", [
    (CHAT, {"messages": [{"role": "user", "content": "hi"}]}),
    (CHAT, {"model": "M"}),
    (COMP, {"prompt": "hi"}),
    (COMP, {"model": "M"}),
], ids=["chat-no-model", "chat-no-messages", "comp-no-model", "comp-no-prompt"])
def test_missing_required_field(server, path, body):
    body = {k: (server.model_id if v == "M" else v) for k, v in body.items()}
    missing = "model" if "model" not in body else ("messages" if path == CHAT else "prompt")
    check_error(post(server, path, body), 400, param=missing)


@pytest.mark.parametrize("messages,why", [
    ([], "empty"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "last-assistant"),
    ([{"role": "system", "content": "be nice"}], "only-system"),
    ([{"role": "wizard", "content": "hi"}], "unknown-role"),
    ([{"role": "user", "content": [{"type": "video", "video": "x"}]}], "unknown-part"),
    ([{"role": "user", "content": [{"type": "text"}]}], "text-part-no-text"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "image-part-no-url"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 7}}]}], "url-not-string"),
    (["hi"], "message-not-object"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_messages(server, messages, why):
    r = post(server, CHAT, {"model": server.model_id, "messages": messages, "max_tokens": 4})
    check_error(r, 400, etype="invalid_request_error")


def test_unknown_fields_ignored(server):
    body = chat_body(server.model_id, "hi", max_tokens=3, temperature=0)
    body.update({"x_unknown": {"nested": [1, 2]}, "another_unknown_field": None, "logit_bias": {}})
    body["messages"][0]["x_extra"] = 1
    r = post(server, CHAT, body)
    assert r.status == 200, r
    body = {"model": server.model_id, "prompt": "hi", "max_tokens": 3, "whatever": True}
    r = post(server, COMP, body)
    assert r.status == 200, r


# ----------------------------------------------------------------------------- model / route / method
@pytest.mark.parametrize("path", [CHAT, COMP])
def test_unknown_model(server, path):
    body = (chat_body("not-the-model", "hi", max_tokens=2) if path == CHAT
            else {"model": "not-the-model", "prompt": "hi", "max_tokens": 2})
    check_error(post(server, path, body), 404, code="model_not_found")


@pytest.mark.parametrize("method,path", [
    ("GET", "/"), ("GET", "/v1"), ("GET", "/v1/chat"), ("POST", "/v1/embeddings"),
    ("GET", "/v2/models"), ("GET", "/healthz"), ("POST", "/v1/chat/completions/extra"),
    ("GET", "/v1/models/a/b"),
])
def test_unknown_route(server, method, path):
    r = server.request(method, path, b"{}" if method == "POST" else None,
                       {"Content-Type": "application/json"} if method == "POST" else None)
    check_error(r, 404)


@pytest.mark.parametrize("method,path,allowed", [
    ("GET", CHAT, "POST"), ("PUT", CHAT, "POST"), ("DELETE", COMP, "POST"),
    ("GET", COMP, "POST"), ("POST", "/v1/models", "GET"), ("DELETE", "/v1/models/x", "GET"),
    ("POST", "/health", "GET"), ("PUT", "/metrics", "GET"),
])
def test_wrong_method(server, method, path, allowed):
    r = server.request(method, path, b"{}" if method in ("POST", "PUT") else None)
    check_error(r, 405)
    allow = [m.strip() for m in r.headers.get("allow", "").split(",")]
    assert allowed in allow, f"Allow header {r.headers.get('allow')!r} lacks {allowed}"


# ----------------------------------------------------------------------------- images
def image_request(server, url):
    return post(server, CHAT, chat_body(server.model_id, "What is this?", image_url=url,
                                        max_tokens=2, temperature=0))


@pytest.mark.parametrize("url", [
    "data:image/png;base64,@@@not-base64@@@",
    "data:image/png;base64,iVBORw0KGgo=*%$",
    "data:image/png;base64,iVBORw0KGgo",  # bad padding / truncated quantum
    "data:image/png;base64, aGVsbG8=\n",
    "data:image/png;base64,",
    "data:image/png,rawbytes",
    "data:;base64,aGVsbG8=",
    "data:image/png;base64",
], ids=["garbage", "bad-chars", "bad-padding", "whitespace", "empty", "not-base64",
        "no-mime", "no-comma"])
def test_bad_base64(server, url):
    check_error(image_request(server, url), 400)


@pytest.mark.parametrize("data,mime", [
    (b"this is not an image at all" * 10, "image/png"),
    (png_bytes()[:60], "image/png"),                     # truncated PNG
    (jpeg_bytes()[:100], "image/jpeg"),                  # truncated JPEG
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "image/png"),  # signature only
    (png_claiming(0, 0), "image/png"),                   # zero-sized
    (bytes(range(256)) * 4, "image/jpeg"),
], ids=["text", "truncated-png", "truncated-jpeg", "signature-only", "zero-size", "random"])
def test_corrupt_image(server, data, mime):
    check_error(image_request(server, data_url(data, mime)), 400)


def test_remote_image_url_rejected(server):
    # loopback discard port: even a server that fetched would stay on this machine
    check_error(image_request(server, "http://127.0.0.1:9/image.png"), 400)
    check_error(image_request(server, "https://127.0.0.1:9/image.png"), 400)


@pytest.mark.parametrize("w,h", [(100000, 100000), (1, 2**31 - 1), (70000, 70000)])
def test_image_header_claims_huge_size(server, w, h):
    t0 = time.monotonic()
    r = image_request(server, data_url(png_claiming(w, h), "image/png"))
    assert r.status in (400, 413), r
    check_error(r, r.status)
    assert time.monotonic() - t0 < 5


def test_decompression_bomb(server):
    """A valid PNG of 16384 x 16384 pixels (256 MiB decoded) in a few hundred KB: over
    --max-image-pixels (4096*4096 here), refused from its header."""
    bomb = png_bomb()
    assert len(bomb) < 1_000_000
    t0 = time.monotonic()
    r = image_request(server, data_url(bomb, "image/png"))
    assert r.status in (400, 413), r
    check_error(r, r.status)
    assert time.monotonic() - t0 < 5


def test_two_images_in_one_message(server):
    url = data_url(png_bytes(), "image/png")
    content = [{"type": "text", "text": "compare"},
               {"type": "image_url", "image_url": {"url": url}},
               {"type": "image_url", "image_url": {"url": url}}]
    r = post(server, CHAT, {"model": server.model_id, "messages": [{"role": "user", "content": content}],
                            "max_tokens": 2})
    err = check_error(r, 400)
    assert "image" in err["message"].lower()


def test_two_images_across_turns(server):
    url = data_url(png_bytes(), "image/png")

    def img_msg(role):
        return {"role": role, "content": [{"type": "text", "text": "look"},
                                          {"type": "image_url", "image_url": {"url": url}}]}
    msgs = [img_msg("user"), {"role": "assistant", "content": "ok"}, img_msg("user")]
    r = post(server, CHAT, {"model": server.model_id, "messages": msgs, "max_tokens": 2})
    err = check_error(r, 400)
    assert "image" in err["message"].lower()


# ----------------------------------------------------------------------------- context limits
def test_prompt_too_long_chat(server):
    text = "hello " * (CONTEXT_LEN + 500)
    check_error(post(server, CHAT, chat_body(server.model_id, text, max_tokens=4)), 400)


def test_prompt_too_long_completion(server):
    text = "hello " * (CONTEXT_LEN + 500)
    check_error(post(server, COMP, {"model": server.model_id, "prompt": text, "max_tokens": 4}), 400)


def test_max_tokens_beyond_context(server):
    r = post(server, CHAT, chat_body(server.model_id, "hi", max_tokens=CONTEXT_LEN * 2))
    check_error(r, 400, param="max_tokens")
    r = post(server, COMP, {"model": server.model_id, "prompt": "hi", "max_tokens": CONTEXT_LEN + 1})
    check_error(r, 400, param="max_tokens")


# ----------------------------------------------------------------------------- body size
def send_oversized(port, path, total, chunked=False):
    """Sends a body of `total` bytes, stopping as soon as the server answers (or closes);
    returns the raw response bytes."""
    import select
    s = socket.create_connection((HOST, port), timeout=30)
    try:
        head = f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
        head += "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {total}\r\n"
        s.sendall((head + "\r\n").encode())
        pending = b""
        sent = 0
        piece = b"a" * (64 * 1024)
        s.setblocking(False)
        deadline = time.monotonic() + 30
        while sent < total or pending:
            if time.monotonic() > deadline:
                raise AssertionError("oversized body: no answer within 30 s")
            r, w, _ = select.select([s], [s], [], 10)
            if r:
                break  # the server answered (or closed) before the body was complete
            if not w:
                raise AssertionError("server neither reads the body nor answers")
            if not pending:
                n = min(len(piece), total - sent)
                pending = (f"{n:x}\r\n".encode() + piece[:n] + b"\r\n") if chunked else piece[:n]
                sent += n
                if chunked and sent >= total:
                    pending += b"0\r\n\r\n"
            try:
                k = s.send(pending)
            except (BrokenPipeError, ConnectionResetError):
                break
            pending = pending[k:]
        s.setblocking(True)
        s.settimeout(30)
        resp = b""
        try:
            while True:
                d = s.recv(65536)
                if not d:
                    break
                resp += d
                if b"\r\n\r\n" in resp:
                    hdr, rest = resp.split(b"\r\n\r\n", 1)
                    cl = [ln for ln in hdr.split(b"\r\n") if ln.lower().startswith(b"content-length:")]
                    if cl and len(rest) >= int(cl[0].split(b":")[1]):
                        break
        except ConnectionResetError:
            pass
        return resp
    finally:
        s.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversized_body(server, chunked):
    limit = 4 * 1024 * 1024
    resp = send_oversized(server.port, CHAT, limit * 2, chunked=chunked)
    assert resp.startswith(b"HTTP/1.1 413") or resp.startswith(b"HTTP/1.0 413"), resp[:300]
    assert b'"error"' in resp


def test_body_just_under_limit_is_parsed(server):
    pad = "a" * (3 * 1024 * 1024)
    body = chat_body(server.model_id, "hi", max_tokens=2, temperature=0)
    body["padding_field_ignored"] = pad
    r = post(server, CHAT, body)
    assert r.status == 200, r


def test_binary_garbage_base64_of_valid_alphabet(server):
    url = "data:image/jpeg;base64," + base64.b64encode(b"\xff\xd8\xff\xe0" + b"\x00" * 300).decode()
    check_error(image_request(server, url), 400)
