"""The official `openai` Python client against the daemon: chat (text and images),
streaming, completions, models, logprobs, stop strings, n > 1, seeds. Every
non-streamed body is also validated against OpenAI's official schema and ours."""
import json

import openai
import pytest

from apiutil import (data_url, jpeg_bytes, png_bytes, shared_image, validate)

pytestmark = pytest.mark.usefixtures("healthy_after")

PROMPT = "Tell me about the weather today."


def raw_body(raw):
    resp = getattr(raw, "http_response", raw)
    return json.loads(resp.content)


def chat(client, **kw):
    """A non-streamed chat completion; returns (parsed object, raw JSON) after validating
    the raw JSON against both specs."""
    raw = client.chat.completions.with_raw_response.create(**kw)
    body = validate("chat", raw_body(raw))
    return raw.parse(), body


def completion(client, **kw):
    raw = client.completions.with_raw_response.create(**kw)
    body = validate("completion", raw_body(raw))
    return raw.parse(), body


def user(content):
    return [{"role": "user", "content": content}]


def check_usage(usage, max_tokens=None, finish_reason=None, n=1):
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens >= 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if max_tokens is not None:
        assert usage.completion_tokens <= max_tokens * n
        if finish_reason == "length" and n == 1:
            assert usage.completion_tokens == max_tokens


# ----------------------------------------------------------------------------- chat
def test_chat_text(client, model):
    r, body = chat(client, model=model, messages=user(PROMPT), max_tokens=12, temperature=0)
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.model == model
    assert isinstance(r.created, int) and r.created > 1_600_000_000
    assert len(r.choices) == 1
    ch = r.choices[0]
    assert ch.index == 0
    assert ch.message.role == "assistant"
    assert isinstance(ch.message.content, str)
    assert ch.finish_reason in ("stop", "length")
    assert ch.logprobs is None
    check_usage(r.usage, 12, ch.finish_reason)
    assert "system_fingerprint" in body


def test_chat_greedy_is_deterministic(client, model):
    a, _ = chat(client, model=model, messages=user(PROMPT), max_tokens=16, temperature=0)
    b, _ = chat(client, model=model, messages=user(PROMPT), max_tokens=16, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.id != b.id


def _images():
    out = [("generated.png", png_bytes(), "image/png"),
           ("generated.jpg", jpeg_bytes(), "image/jpeg")]
    for name, mime in (("pear.png", "image/png"), ("demo.jpg", "image/jpeg")):
        data = shared_image(name)
        if data is not None:
            out.append((name, data, mime))
    return out


@pytest.mark.parametrize("name,data,mime", _images(), ids=[i[0] for i in _images()])
def test_chat_with_image(client, model, server, name, data, mime):
    vision_before = (server.metric("cogvlm_vision_tower_seconds_count")
                     + server.metric("cogvlm_vision_cache_hits_total"))
    content = [{"type": "text", "text": "What is in this image?"},
               {"type": "image_url", "image_url": {"url": data_url(data, mime)}}]
    r, _ = chat(client, model=model, messages=user(content), max_tokens=10, temperature=0)
    ch = r.choices[0]
    assert ch.message.role == "assistant" and isinstance(ch.message.content, str)
    assert ch.finish_reason in ("stop", "length")
    check_usage(r.usage, 10, ch.finish_reason)
    # the image went through the vision tower (or its cache)
    vision_after = (server.metric("cogvlm_vision_tower_seconds_count")
                    + server.metric("cogvlm_vision_cache_hits_total"))
    assert vision_after >= vision_before + 1
    # same image, same greedy answer
    r2, _ = chat(client, model=model, messages=user(content), max_tokens=10, temperature=0)
    assert r2.choices[0].message.content == ch.message.content


def test_chat_image_first_then_text_and_detail_ignored(client, model):
    content = [{"type": "image_url", "image_url": {"url": data_url(png_bytes(), "image/png"),
                                                   "detail": "low"}},
               {"type": "text", "text": "Describe"}, {"type": "text", "text": " it briefly."}]
    r, _ = chat(client, model=model, messages=user(content), max_tokens=6, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_chat_multi_turn_with_system(client, model):
    msgs = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": data_url(jpeg_bytes(), "image/jpeg")}}]},
            {"role": "assistant", "content": "A yellow circle on blue."},
            {"role": "user", "content": "What colour is the circle?"}]
    r, _ = chat(client, model=model, messages=msgs, max_tokens=8, temperature=0)
    assert r.choices[0].message.role == "assistant"
    check_usage(r.usage, 8, r.choices[0].finish_reason)


def test_chat_max_completion_tokens(client, model):
    r, _ = chat(client, model=model, messages=user(PROMPT), max_completion_tokens=5, temperature=0)
    check_usage(r.usage, 5, r.choices[0].finish_reason)


def test_chat_sampling_fields_accepted(client, model):
    r, _ = chat(client, model=model, messages=user(PROMPT), max_tokens=8, temperature=0.7,
                top_p=0.9, presence_penalty=0.5, frequency_penalty=0.3, seed=3, user="user-1",
                extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1})
    check_usage(r.usage, 8, r.choices[0].finish_reason)


def test_chat_top_k_1_is_greedy(client, model):
    greedy, _ = chat(client, model=model, messages=user(PROMPT), max_tokens=16, temperature=0)
    topk1, _ = chat(client, model=model, messages=user(PROMPT), max_tokens=16, temperature=1.0,
                    seed=99, extra_body={"top_k": 1})
    assert topk1.choices[0].message.content == greedy.choices[0].message.content


# ----------------------------------------------------------------------------- streaming
def collect_stream(stream):
    chunks = list(stream)
    assert chunks, "empty stream"
    return chunks


def test_chat_stream_matches_non_stream(client, model):
    ref, _ = chat(client, model=model, messages=user(PROMPT), max_tokens=24, temperature=0, seed=5)
    chunks = collect_stream(client.chat.completions.create(
        model=model, messages=user(PROMPT), max_tokens=24, temperature=0, seed=5, stream=True))
    ids = {c.id for c in chunks}
    assert len(ids) == 1 and next(iter(ids)).startswith("chatcmpl-")
    assert len({c.created for c in chunks}) == 1
    assert {c.model for c in chunks} == {model}
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    first = chunks[0]
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].finish_reason is None
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
    assert len(finals) == 1 and finals[0] is chunks[-1]
    assert finals[0].choices[0].finish_reason == ref.choices[0].finish_reason
    assert all(getattr(c, "usage", None) is None for c in chunks)


def test_chat_stream_include_usage(client, model):
    ref, _ = chat(client, model=model, messages=user(PROMPT), max_tokens=10, temperature=0)
    chunks = collect_stream(client.chat.completions.create(
        model=model, messages=user(PROMPT), max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.prompt_tokens == ref.usage.prompt_tokens
    assert last.usage.completion_tokens == ref.usage.completion_tokens
    assert last.usage.total_tokens == ref.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == ref.choices[0].finish_reason


def test_chat_stream_with_image(client, model):
    content = [{"type": "text", "text": "What is in this image?"},
               {"type": "image_url", "image_url": {"url": data_url(png_bytes(), "image/png")}}]
    ref, _ = chat(client, model=model, messages=user(content), max_tokens=12, temperature=0)
    chunks = collect_stream(client.chat.completions.create(
        model=model, messages=user(content), max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        ref.choices[0].message.content


# ----------------------------------------------------------------------------- completions
def test_completion_plain(client, model):
    r, body = completion(client, model=model, prompt="The quick brown fox", max_tokens=10,
                         temperature=0)
    assert r.object == "text_completion"
    assert r.id.startswith("cmpl-")
    assert r.model == model
    assert len(r.choices) == 1
    ch = r.choices[0]
    assert ch.index == 0 and isinstance(ch.text, str)
    assert ch.finish_reason in ("stop", "length")
    assert ch.logprobs is None
    check_usage(r.usage, 10, ch.finish_reason)


def test_completion_default_max_tokens_is_16(client, model):
    r, _ = completion(client, model=model, prompt="Once upon a time", temperature=0)
    check_usage(r.usage, 16, r.choices[0].finish_reason)


def test_completion_prompt_list_of_one(client, model):
    a, _ = completion(client, model=model, prompt="Hello world", max_tokens=8, temperature=0)
    b, _ = completion(client, model=model, prompt=["Hello world"], max_tokens=8, temperature=0)
    assert a.choices[0].text == b.choices[0].text


def test_completion_stream_matches_non_stream(client, model):
    ref, _ = completion(client, model=model, prompt="In the beginning", max_tokens=20, temperature=0)
    chunks = collect_stream(client.completions.create(
        model=model, prompt="In the beginning", max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "text_completion" for c in chunks)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref.choices[0].text
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == ref.usage.completion_tokens
    assert last.usage.prompt_tokens == ref.usage.prompt_tokens
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == ref.choices[0].finish_reason


# ----------------------------------------------------------------------------- models
def test_models_list_and_retrieve(client, model):
    raw = client.models.with_raw_response.list()
    body = validate("models", raw_body(raw))
    assert [m["id"] for m in body["data"]] == [model]
    page = raw.parse()
    assert [m.id for m in page.data] == [model]
    m = client.models.with_raw_response.retrieve(model)
    mb = validate("model", raw_body(m))
    assert mb["id"] == model and mb["object"] == "model"


def test_models_retrieve_unknown(client):
    with pytest.raises(openai.NotFoundError) as ei:
        client.models.retrieve("no-such-model")
    validate("error", ei.value.response.json())


def test_chat_unknown_model_via_client(client):
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="gpt-nonexistent", messages=user("hi"), max_tokens=2)
    body = validate("error", ei.value.response.json())
    assert body["error"]["code"] == "model_not_found"


# ----------------------------------------------------------------------------- logprobs
def test_chat_logprobs(client, model):
    r, body = chat(client, model=model, messages=user(PROMPT), max_tokens=12, temperature=0,
                   logprobs=True, top_logprobs=3)
    ch = r.choices[0]
    lp = ch.logprobs.content
    assert len(lp) == r.usage.completion_tokens
    assert body["choices"][0]["logprobs"]["refusal"] is None
    for t in lp:
        assert isinstance(t.token, str)
        assert t.logprob <= 0.0
        assert t.bytes is not None and all(0 <= b <= 255 for b in t.bytes)
        assert len(t.top_logprobs) == 3
        vals = [a.logprob for a in t.top_logprobs]
        assert vals == sorted(vals, reverse=True)
        # greedy: the chosen token is the most likely one
        assert t.top_logprobs[0].token == t.token
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-4
    joined = b"".join(bytes(t.bytes) for t in lp).decode("utf-8", errors="replace")
    content = ch.message.content
    if ch.finish_reason == "length":
        # SentencePiece: the first token's word-boundary space may be dropped from content
        assert content in (joined, joined[1:] if joined.startswith(" ") else joined), (content, joined)


def test_chat_logprobs_zero_alternatives(client, model):
    r, _ = chat(client, model=model, messages=user(PROMPT), max_tokens=4, temperature=0,
                logprobs=True, top_logprobs=0)
    assert all(t.top_logprobs == [] for t in r.choices[0].logprobs.content)
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens


def test_completion_logprobs(client, model):
    r, body = completion(client, model=model, prompt="The capital of France", max_tokens=8,
                         temperature=0, logprobs=2)
    lp = body["choices"][0]["logprobs"]
    n = r.usage.completion_tokens
    assert len(lp["tokens"]) == n
    assert len(lp["token_logprobs"]) == n
    assert len(lp["top_logprobs"]) == n
    assert len(lp["text_offset"]) == n
    assert lp["text_offset"] == sorted(lp["text_offset"])
    for tok, val, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert val <= 0.0
        assert 1 <= len(top) <= 3
        assert abs(max(top.values()) - val) < 1e-4  # greedy picks the most likely
    text = r.choices[0].text
    if "\ufffd" not in text and not any("\ufffd" in t for t in lp["tokens"]):
        assert "".join(lp["tokens"]) == text


# ----------------------------------------------------------------------------- stop strings
def _stop_candidate(text):
    """A stop string taken from the middle of text, and where its first match begins."""
    for start in range(max(1, len(text) // 3), len(text) - 3):
        s = text[start:start + 3]
        if s.strip() and "\ufffd" not in s:
            i = text.find(s)
            if i > 0:
                return s, i
    return None, None


def test_chat_stop_string(client, model):
    ref, _ = chat(client, model=model, messages=user(PROMPT), max_tokens=40, temperature=0)
    full = ref.choices[0].message.content
    stop, i = _stop_candidate(full)
    if stop is None:
        pytest.fail(f"greedy answer too short to pick a stop string from: {full!r}")
    r, _ = chat(client, model=model, messages=user(PROMPT), max_tokens=40, temperature=0,
                stop=[stop, "\u2603never\u2603"])
    assert r.choices[0].message.content == full[:i]
    assert r.choices[0].finish_reason == "stop"
    # streamed: the held-back text must not leak the stop string
    chunks = collect_stream(client.chat.completions.create(
        model=model, messages=user(PROMPT), max_tokens=40, temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full[:i]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completion_stop_string(client, model):
    ref, _ = completion(client, model=model, prompt="Lorem ipsum", max_tokens=30, temperature=0)
    full = ref.choices[0].text
    stop, i = _stop_candidate(full)
    if stop is None:
        pytest.fail(f"greedy completion too short to pick a stop string from: {full!r}")
    r, _ = completion(client, model=model, prompt="Lorem ipsum", max_tokens=30, temperature=0,
                      stop=stop)
    assert r.choices[0].text == full[:i]
    assert r.choices[0].finish_reason == "stop"


# ----------------------------------------------------------------------------- n > 1, seeds
def test_chat_n_choices(client, model):
    r, _ = chat(client, model=model, messages=user(PROMPT), max_tokens=16, temperature=1.0,
                seed=42, n=3, logprobs=True)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
    check_usage(r.usage, 16, n=3)
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1, f"3 sampled choices are identical: {texts}"


def test_chat_n_greedy_choices_identical(client, model):
    r, _ = chat(client, model=model, messages=user(PROMPT), max_tokens=10, temperature=0, n=2)
    assert len(r.choices) == 2
    assert r.choices[0].message.content == r.choices[1].message.content


def test_chat_n_stream_matches_non_stream(client, model):
    kw = dict(model=model, messages=user(PROMPT), max_tokens=12, temperature=0.8, seed=11, n=2)
    ref, _ = chat(client, **kw)
    chunks = collect_stream(client.chat.completions.create(stream=True, **kw))
    texts = {0: "", 1: ""}
    roles, finishes = {}, {}
    for c in chunks:
        for ch in c.choices:
            if ch.index not in roles:
                roles[ch.index] = ch.delta.role
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason is not None:
                assert ch.index not in finishes, "two finish chunks for one choice"
                finishes[ch.index] = ch.finish_reason
    assert roles == {0: "assistant", 1: "assistant"}
    by_index = {c.index: c for c in ref.choices}
    for i in (0, 1):
        assert texts[i] == by_index[i].message.content
        assert finishes[i] == by_index[i].finish_reason


def test_chat_seed_determinism(client, model):
    kw = dict(model=model, messages=user(PROMPT), max_tokens=32, temperature=0.9)
    a, _ = chat(client, seed=1234, **kw)
    b, _ = chat(client, seed=1234, **kw)
    c, _ = chat(client, seed=4321, **kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.content != c.choices[0].message.content


def test_completion_seed_determinism(client, model):
    kw = dict(model=model, prompt="Random words:", max_tokens=24, temperature=1.0, n=2)
    a, _ = completion(client, seed=77, **kw)
    b, _ = completion(client, seed=77, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
