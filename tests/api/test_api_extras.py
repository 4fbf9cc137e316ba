"""Small API pieces around the generation routes: GET /v1/models/{id}, the X-Request-Id
header (echoed when safe, generated otherwise, never injected), the `user` field in the
request log line, max_completion_tokens over max_tokens, and the opt-in grounding-box
extension `"cogvlm": {"boxes": "pixels"}` (boxes of the answer in pixels of the client's
image), checked on the embedded tiny model, which answers `Where is the ...?` with boxes."""
import io
import json
import re
import socket
import time
import uuid

import openai
import pytest
from PIL import Image, ImageDraw

import apiutil
from apiutil import (HOST, Server, chat_body, check_error, data_url, png_bytes, sse_events,
                     validate)

pytestmark = pytest.mark.usefixtures("healthy_after")

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
RID = re.compile(r"^[!-~]{1,128}$")  # what an X-Request-Id of ours may hold
OWN_RID = re.compile(r"^[0-9a-f]{24}$")  # the id the server makes up (server/http.c)
TINY = apiutil.REPO / "models" / "cogvlm-tiny-shapes"


# ------------------------------------------------------------------------- /v1/models/{id}
def test_model_retrieve_known_and_unknown(server):
    r = server.get(f"/v1/models/{server.model_id}")
    assert r.status == 200, r
    m = validate("model", r.json())
    assert set(m) == {"id", "object", "created", "owned_by"}
    assert m["id"] == server.model_id and m["object"] == "model"
    assert m == server.get("/v1/models").json()["data"][0]
    for bad in ("no-such-model", server.model_id + "x", "%FF%FEbytes", "a/b"):
        r = server.get(f"/v1/models/{bad}")
        err = check_error(r, 404, code="model_not_found", etype="invalid_request_error")
        assert err["param"] is None, err
        assert r.headers.get("x-request-id"), r.headers


def test_model_retrieve_with_the_openai_client(client, model):
    m = client.models.retrieve(model)
    assert (m.id, m.object, m.owned_by) == (model, "model", "cogvlm-server")
    assert isinstance(m.created, int)
    with pytest.raises(openai.NotFoundError) as ei:
        client.models.retrieve("no-such-model")
    body = validate("error", ei.value.response.json())
    assert body["error"]["code"] == "model_not_found"
    assert body["error"]["type"] == "invalid_request_error"


# ------------------------------------------------------------------------- X-Request-Id
def test_request_id_echoed_on_success_error_and_stream(server):
    rid = "client-" + uuid.uuid4().hex
    h = {"X-Request-Id": rid}
    ok = server.post(CHAT, chat_body(server.model_id, "hi", max_tokens=2), headers=h)
    assert ok.status == 200 and ok.headers.get("x-request-id") == rid, ok.headers
    st = server.post(CHAT, chat_body(server.model_id, "hi", max_tokens=2, stream=True), headers=h)
    assert st.status == 200 and st.headers.get("x-request-id") == rid, st.headers
    sse_events(st.body)
    for r in (server.request("POST", CHAT, b"{", dict(h, **{"Content-Type": "application/json"})),
              server.post(CHAT, chat_body("not-the-model", "hi"), headers=h),
              server.get("/no/such/route", headers=h),
              server.request("DELETE", CHAT, None, h),
              server.get("/health", headers=h), server.get("/v1/models", headers=h),
              server.get("/metrics", headers=h)):
        assert r.headers.get("x-request-id") == rid, (r, r.headers)


def test_request_id_generated_when_absent(server):
    ids = []
    for _ in range(3):
        r = server.post(CHAT, chat_body(server.model_id, "hi", max_tokens=1))
        assert r.status == 200, r
        ids.append(r.headers.get("x-request-id", ""))
    ids.append(server.get("/v1/models").headers.get("x-request-id", ""))
    ids.append(server.post(CHAT, b"{", {"Content-Type": "application/json"})
               .headers.get("x-request-id", ""))
    assert all(RID.match(i) for i in ids), ids
    assert len(set(ids)) == len(ids), ids


def test_request_id_length_bound(server):
    longest = "r" * 128
    assert server.get("/health", {"X-Request-Id": longest}).headers["x-request-id"] == longest
    got = server.get("/health", {"X-Request-Id": "r" * 129}).headers["x-request-id"]
    assert RID.match(got) and "rrrr" not in got, got


def raw_exchange(port, head_lines):
    """Sends a GET /health whose header lines are given as raw bytes; returns (status,
    headers) of the answer, or (None, {}) if the server closed without one."""
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" +
                  b"".join(line + b"\r\n" for line in head_lines) + b"\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            d = s.recv(65536)
            if not d:
                break
            data += d
    if b"\r\n\r\n" not in data:
        return None, {}
    return apiutil.cvlmtest.parse_head(data.split(b"\r\n\r\n", 1)[0])


@pytest.mark.parametrize("value", [
    b"abc\rInjected: yes", b"abc\r\n Injected: yes", b"abc\x01def", b"abc\x7fdef",
    b"caf\xc3\xa9", b"\xff\xfe", b"has space", b"tab\there", b"x" * 129,
], ids=["bare-cr", "obs-fold", "control", "del", "utf8", "latin1", "space", "tab", "long"])
def test_hostile_request_ids_never_echoed(server, value):
    status, headers = raw_exchange(server.port, [b"X-Request-Id: " + value])
    if status is None or status == 400:
        return  # refused by the HTTP parser: nothing echoed either
    assert status == 200, (status, headers)
    got = headers.get("x-request-id", "")
    # refused: the response carries the server's own id (24 hex digits), never any part of
    # the client's value ("abc" can occur in a hex id by chance, so the form is checked)
    assert OWN_RID.match(got), headers
    assert "Injected" not in got, headers
    assert "injected" not in headers, headers


# ------------------------------------------------------------------------- user
def log_line(server, rid, timeout=10):
    """The daemon's request log line of the request with this X-Request-Id (written when
    the connection completes, just after the reply)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ln in server.log_text().splitlines():
            if f" request_id={rid}" in ln:
                return ln
        time.sleep(0.05)
    raise AssertionError(f"no log line with request_id={rid}:\n{server.log_tail()}")


def test_user_logged_not_echoed(server):
    rid = "user-" + uuid.uuid4().hex
    user = "alice-" + uuid.uuid4().hex
    r = server.post(CHAT, chat_body(server.model_id, "hi", max_tokens=2, user=user),
                    headers={"X-Request-Id": rid})
    assert r.status == 200, r
    assert user.encode() not in r.body
    ln = log_line(server, rid)
    assert f'user="{user}"' in ln and "/v1/chat/completions 200" in ln, ln
    # completions take it too; a request without one logs none
    rid2 = "user-" + uuid.uuid4().hex
    r = server.post(COMP, {"model": server.model_id, "prompt": "a", "max_tokens": 1,
                           "user": user}, headers={"X-Request-Id": rid2})
    assert r.status == 200, r
    assert f'user="{user}"' in log_line(server, rid2)
    rid3 = "user-" + uuid.uuid4().hex
    server.post(CHAT, chat_body(server.model_id, "hi", max_tokens=1),
                headers={"X-Request-Id": rid3})
    assert "user=" not in log_line(server, rid3)


def test_user_escaped_in_the_log(server):
    rid = "user-" + uuid.uuid4().hex
    user = 'evil"\nFAKE-LOG-LINE \\ é\x01'
    r = server.post(CHAT, chat_body(server.model_id, "hi", max_tokens=1, user=user),
                    headers={"X-Request-Id": rid})
    assert r.status == 200, r
    ln = log_line(server, rid)
    assert 'user="evil\\"\\x0aFAKE-LOG-LINE \\\\ \\xc3\\xa9\\x01"' in ln, ln
    assert not any(x.startswith("FAKE-LOG-LINE") for x in server.log_text().splitlines())


@pytest.mark.parametrize("value", [5, ["a"], {"a": 1}, "u" * 257])
def test_user_bad_values(server, value):
    body = chat_body(server.model_id, "hi", max_tokens=1, user=value)
    check_error(server.post(CHAT, body), 400, param="user")


def test_user_length_counts_characters(server):
    body = chat_body(server.model_id, "hi", max_tokens=1, user="é" * 256)  # 512 bytes
    assert server.post(CHAT, body).status == 200


# ------------------------------------------------------------------------- max_completion_tokens
@pytest.mark.parametrize("mt,mct", [(2, 5), (5, 2), (None, 3)])
def test_max_completion_tokens_wins(server, mt, mct):
    """The test model runs to max_tokens (random weights: no EOS), so the count shows
    which limit applied."""
    body = chat_body(server.model_id, "hi", temperature=0, max_completion_tokens=mct,
                     logit_bias={"2": -100})
    if mt is not None:
        body["max_tokens"] = mt
    r = server.post(CHAT, body)
    assert r.status == 200, r
    b = validate("chat", r.json())
    assert b["usage"]["completion_tokens"] == mct, b
    assert b["choices"][0]["finish_reason"] == "length"


# ------------------------------------------------------------------------- boxes: requests
@pytest.mark.parametrize("ext,param", [
    ("pixels", "cogvlm"), (["boxes"], "cogvlm"), (5, "cogvlm"),
    ({"boxes": "grid"}, "cogvlm.boxes"), ({"boxes": "PIXELS"}, "cogvlm.boxes"),
    ({"boxes": True}, "cogvlm.boxes"), ({"boxes": None}, "cogvlm.boxes"),
    ({"boxes": ["pixels"]}, "cogvlm.boxes"),
    ({"unknown": 1}, "cogvlm.unknown"), ({"boxes": "pixels", "extra": "x"}, "cogvlm.extra"),
])
def test_boxes_bad_extension_values(server, ext, param):
    body = chat_body(server.model_id, "hi", max_tokens=1, cogvlm=ext)
    err = check_error(server.post(CHAT, body), 400, etype="invalid_request_error")
    assert err["param"] == param, err


def test_boxes_refused_on_completions(server):
    body = {"model": server.model_id, "prompt": "a", "max_tokens": 1,
            "cogvlm": {"boxes": "pixels"}}
    err = check_error(server.post(COMP, body), 400)
    assert err["param"] == "cogvlm.boxes", err


@pytest.mark.parametrize("ext", [None, {}])
def test_boxes_absent_without_the_extension(server, ext):
    body = chat_body(server.model_id, "hi", max_tokens=3,
                     image_url=data_url(png_bytes(40, 30)), cogvlm=ext)
    r = server.post(CHAT, body)
    assert r.status == 200, r
    assert "boxes" not in validate("chat", r.json())["choices"][0]["message"]
    r = server.post(CHAT, dict(body, stream=True))
    assert b'"boxes"' not in r.body, r.body[-300:]


def test_boxes_empty_without_an_image(server):
    body = chat_body(server.model_id, "hi", max_tokens=3, cogvlm={"boxes": "pixels"})
    r = server.post(CHAT, body)
    assert r.status == 200, r
    assert validate("chat", r.json())["choices"][0]["message"]["boxes"] == []
    r = server.post(CHAT, dict(body, stream=True))
    chunks = [validate("chat_chunk", json.loads(e)) for e in sse_events(r.body)[:-1]]
    last = [c for c in chunks if c["choices"][0]["finish_reason"]]
    assert len(last) == 1 and last[0]["choices"][0]["delta"]["boxes"] == [], last


# ------------------------------------------------------------------------- boxes: the tiny model
QUAD = r"\d{3},\d{3},\d{3},\d{3}"
INNER = r"\[%s(?:;%s)*\]" % (QUAD, QUAD)
GROUP = re.compile(r"\[(%s(?:;%s)*)\]" % (INNER, INNER))
BOX = re.compile(r"(\d{3}),(\d{3}),(\d{3}),(\d{3})")


def expected_boxes(text, w, h):
    """The documented conversion, applied to the boxes read from the text."""
    def px(v, size):
        return min(size, max(0, (2 * v * size + 1000) // 2000))

    out = []
    for g in GROUP.finditer(text):
        for b in BOX.finditer(text, g.start(1), g.end(1)):
            v = [int(x) for x in b.groups()]
            out.append({"x0": px(v[0], w), "y0": px(v[1], h), "x1": px(v[2], w),
                        "y1": px(v[3], h), "text_offset": b.start()})
    return out


def scene_png(w, h, colour, kind, x, y, s):
    """One shape drawn as the tiny model's task draws it on 224 x 224, then stretched to
    w x h: the server resizes it back to the model's size, so the model sees its task."""
    rgb = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 160, 50)}[colour]
    im = Image.new("RGB", (224, 224), (230, 225, 210))
    d = ImageDraw.Draw(im)
    if kind == "square":
        d.rectangle([x, y, x + s - 1, y + s - 1], fill=rgb)
    else:
        d.ellipse([x, y, x + s - 1, y + s - 1], fill=rgb)
    buf = io.BytesIO()
    im.resize((w, h), Image.BICUBIC).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny(logs_dir):
    if not (TINY / "config.json").exists():
        pytest.fail("models/cogvlm-tiny-shapes is missing")
    s = Server(logs_dir, "tiny-boxes", args={"--model": str(TINY),
                                             "--tokenizer": str(TINY / "tokenizer.model")},
               served_name="cogvlm-tiny-shapes").start()
    yield s
    assert s.stop() == 0


# (width, height, colour, kind, x, y, side on the 224 canvas): non-square sizes, odd ones to
# exercise the rounding
CASES = [(448, 224, "red", "square", 30, 40, 80), (300, 200, "blue", "circle", 120, 60, 70),
         (160, 320, "green", "square", 50, 100, 90), (641, 97, "red", "circle", 10, 20, 60),
         (333, 517, "blue", "square", 140, 130, 60)]


def box_request(w, h, colour, kind, x, y, s, **kw):
    png = scene_png(w, h, colour, kind, x, y, s)
    return chat_body("cogvlm-tiny-shapes", f"Where is the {colour} {kind}?",
                     image_url=data_url(png), temperature=0, max_tokens=32,
                     cogvlm={"boxes": "pixels"}, **kw)


def check_boxes(boxes, text, w, h):
    want = expected_boxes(text, w, h)
    assert want, f"the model wrote no box: {text!r}"
    assert boxes == want, (text, w, h)
    for b in boxes:
        assert 0 <= b["x0"] <= w and 0 <= b["x1"] <= w and 0 <= b["y0"] <= h and 0 <= b["y1"] <= h
        assert BOX.fullmatch(text[b["text_offset"]:b["text_offset"] + 15]), (text, b)


@pytest.mark.parametrize("w,h,colour,kind,x,y,s", CASES, ids=[f"{c[0]}x{c[1]}" for c in CASES])
def test_boxes_in_pixels(tiny, w, h, colour, kind, x, y, s):
    r = tiny.post(CHAT, box_request(w, h, colour, kind, x, y, s))
    assert r.status == 200, r
    msg = validate("chat", r.json())["choices"][0]["message"]
    check_boxes(msg["boxes"], msg["content"], w, h)
    # the text is the model's own: the same answer without the extension
    plain = box_request(w, h, colour, kind, x, y, s)
    del plain["cogvlm"]
    r2 = tiny.post(CHAT, plain)
    assert r2.json()["choices"][0]["message"]["content"] == msg["content"]
    assert "boxes" not in r2.json()["choices"][0]["message"]


@pytest.mark.parametrize("w,h,colour,kind,x,y,s", CASES[:3],
                         ids=[f"{c[0]}x{c[1]}" for c in CASES[:3]])
def test_boxes_in_the_final_chunk_of_each_choice(tiny, w, h, colour, kind, x, y, s):
    r = tiny.post(CHAT, box_request(w, h, colour, kind, x, y, s, stream=True, n=2))
    assert r.status == 200, r
    chunks = [validate("chat_chunk", json.loads(e)) for e in sse_events(r.body)[:-1]]
    text, finals = {0: "", 1: ""}, {}
    for c in chunks:
        for ch in c["choices"]:
            d = ch["delta"]
            text[ch["index"]] += d.get("content") or ""
            if ch["finish_reason"]:
                finals[ch["index"]] = d
            else:
                assert "boxes" not in d, c
    assert sorted(finals) == [0, 1], chunks[-3:]
    for i in (0, 1):
        check_boxes(finals[i]["boxes"], text[i], w, h)
    # streaming and not agree (greedy)
    r = tiny.post(CHAT, box_request(w, h, colour, kind, x, y, s))
    assert r.json()["choices"][0]["message"]["boxes"] == finals[0]["boxes"]
