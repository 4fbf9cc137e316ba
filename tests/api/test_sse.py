"""Raw HTTP streaming: Server-Sent Events framing and every chunk against the schemas."""
import json

import pytest

from apiutil import chat_body, data_url, png_bytes, sse_events, validate

pytestmark = pytest.mark.usefixtures("healthy_after")


def stream_chat(server, body):
    r = server.post("/v1/chat/completions", body)
    assert r.status == 200, r
    assert r.headers.get("content-type", "").startswith("text/event-stream"), r.headers
    events = sse_events(r.body)
    chunks = [validate("chat_chunk", json.loads(e)) for e in events[:-1]]
    return r, chunks


def check_chat_stream(chunks, n=1, include_usage=False):
    assert len({c["id"] for c in chunks}) == 1
    assert len({c["created"] for c in chunks}) == 1
    seen_role, finished, texts = {}, {}, {i: "" for i in range(n)}
    body_chunks = chunks[:-1] if include_usage else chunks
    for c in body_chunks:
        assert c["object"] == "chat.completion.chunk"
        assert c.get("usage") is None
        assert c["choices"], f"chunk without choices before the end: {c}"
        for ch in c["choices"]:
            i = ch["index"]
            assert 0 <= i < n
            assert i not in finished, f"chunk for choice {i} after its finish chunk: {c}"
            delta = ch["delta"]
            if i not in seen_role:
                assert delta == {"role": "assistant", "content": ""}, f"first delta: {delta}"
                assert ch["finish_reason"] is None
                seen_role[i] = True
                continue
            assert "role" not in delta or delta["role"] is None, delta
            if ch["finish_reason"] is not None:
                assert ch["finish_reason"] in ("stop", "length")
                assert delta == {} or not delta.get("content"), f"final delta not empty: {delta}"
                finished[i] = ch["finish_reason"]
            else:
                content = delta.get("content")
                assert isinstance(content, str), delta
                content.encode("utf-8")  # no lone surrogates: whole characters only
                texts[i] += content
    assert sorted(finished) == list(range(n)), f"choices without a finish chunk: {finished}"
    if include_usage:
        last = chunks[-1]
        assert last["choices"] == []
        u = last["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    return texts, finished


def test_sse_chat_framing_and_schema(server):
    body = chat_body(server.model_id, "Write a poem about the sea.", max_tokens=30, temperature=0)
    ref = server.post("/v1/chat/completions", body)
    assert ref.status == 200, ref
    ref = validate("chat", ref.json())
    r, chunks = stream_chat(server, dict(body, stream=True))
    assert "no-cache" in r.headers.get("cache-control", "no-cache")
    texts, finished = check_chat_stream(chunks)
    assert texts[0] == ref["choices"][0]["message"]["content"]
    assert finished[0] == ref["choices"][0]["finish_reason"]


def test_sse_chat_n2_usage_image(server):
    body = chat_body(server.model_id, "Describe.", image_url=data_url(png_bytes(), "image/png"),
                     max_tokens=8, temperature=0, n=2, stream=True,
                     stream_options={"include_usage": True})
    _, chunks = stream_chat(server, body)
    texts, _ = check_chat_stream(chunks, n=2, include_usage=True)
    assert texts[0] == texts[1]  # greedy
    assert chunks[-1]["usage"]["completion_tokens"] <= 16


def test_sse_completion_framing_and_schema(server):
    body = {"model": server.model_id, "prompt": "Hello, my name is", "max_tokens": 12,
            "temperature": 0}
    ref = server.post("/v1/completions", body)
    assert ref.status == 200, ref
    ref = validate("completion", ref.json())
    r = server.post("/v1/completions", dict(body, stream=True, stream_options={"include_usage": True}))
    assert r.status == 200, r
    assert r.headers.get("content-type", "").startswith("text/event-stream"), r.headers
    events = sse_events(r.body)
    chunks = [validate("completion_chunk", json.loads(e)) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    text = ""
    finishes = []
    for c in chunks[:-1]:
        assert c["object"] == "text_completion"
        assert len(c["choices"]) == 1
        ch = c["choices"][0]
        ch["text"].encode("utf-8")
        text += ch["text"]
        if ch["finish_reason"] is not None:
            finishes.append(ch["finish_reason"])
    assert text == ref["choices"][0]["text"]
    assert finishes == [ref["choices"][0]["finish_reason"]]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == ref["usage"]["completion_tokens"]


def test_sse_long_stream_utf8(server):
    """A long sampled stream (more chances of multi-byte characters and byte-fallback
    tokens): every delta is whole UTF-8 and the deltas add up to the non-streamed text."""
    body = chat_body(server.model_id, "Schreib etwas auf Deutsch, 日本語, русский.", max_tokens=200,
                     temperature=1.0, seed=2024)
    ref = server.post("/v1/chat/completions", body)
    assert ref.status == 200, ref
    ref = validate("chat", ref.json())
    _, chunks = stream_chat(server, dict(body, stream=True))
    texts, _ = check_chat_stream(chunks)
    assert texts[0] == ref["choices"][0]["message"]["content"]
