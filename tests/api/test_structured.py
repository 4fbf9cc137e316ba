"""Structured outputs: response_format json_object / json_schema on both routes, through the
official openai client (parse() with pydantic models) and raw HTTP, streamed and not.

The models here do not answer in JSON on their own (the embedded cogvlm-tiny-shapes answers
"red" or "[[120,340,560,780]]"; the golden-tiny and CogVLM2 fixtures are random weights), so
every document below is the constraint's work. Schemas whose every part is bounded (enums,
maxLength, integers, maxItems) end within a known number of bytes, so with max_tokens above
that bound every answer must finish with "stop" and validate; unbounded ones (json_object)
must validate whenever they finish with "stop"."""
import json
import random
from typing import List, Literal, Optional

import jsonschema
import pytest
from pydantic import BaseModel, Field

import apiutil
from apiutil import Server, chat_body, data_url, sse_events

CHAT, COMPL = "/v1/chat/completions", "/v1/completions"
TINY = apiutil.REPO / "models" / "cogvlm-tiny-shapes"

# Every part bounded: at most ~300 bytes of JSON text (strings <= 12 characters, up to 6
# bytes each as JSON; integers <= 17 bytes; whitespace runs <= 13 bytes per gap).
BOUNDED = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue", "yellow", "purple", "orange"]},
        "shape": {"type": "string", "enum": ["circle", "square", "triangle"]},
        "count": {"type": "integer"},
        "visible": {"type": "boolean"},
        "label": {"type": "string", "maxLength": 12},
        "box": {"type": "array", "items": {"type": "integer"}, "minItems": 4, "maxItems": 4},
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "pattern": "^[a-z]{1,8}$"}]},
    },
    "required": ["colour", "shape", "count", "visible", "label", "box", "note"],
    "additionalProperties": False,
}
BOUNDED_MAX_TOKENS = 700  # > the byte bound: every token carries at least one byte


def rf_schema(schema, name="answer", strict=True):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                  "strict": strict}}


def content_of(resp):
    assert resp.status == 200, resp
    body = resp.json()
    return body, [(c["message"]["content"] if "message" in c else c["text"], c["finish_reason"])
                  for c in body["choices"]]


# ----------------------------------------------------------------- the random 32k model
def test_bounded_schema_always_finishes_and_validates(server, model, healthy_after):
    """golden-tiny (random weights, LLaMA-2 vocabulary) at temperature 1.3: whatever it
    samples, the answer is a document of the schema."""
    for seed in range(6):
        body, out = content_of(server.post(CHAT, chat_body(
            model, "Describe the scene as JSON.", max_tokens=BOUNDED_MAX_TOKENS,
            temperature=1.3, seed=seed, n=2, response_format=rf_schema(BOUNDED))))
        apiutil.validate("chat", body)
        for text, finish in out:
            assert finish == "stop", (seed, text)
            jsonschema.validate(json.loads(text), BOUNDED)


def test_json_object_mode_on_both_routes(server, model, healthy_after):
    for seed in range(8):
        for route, body in ((CHAT, chat_body(model, "Give me JSON", max_tokens=96,
                                              temperature=1.0, seed=seed)),
                            (COMPL, {"model": model, "prompt": "JSON:", "max_tokens": 96,
                                     "temperature": 1.0, "seed": seed})):
            body["response_format"] = {"type": "json_object"}
            _, out = content_of(server.post(route, body))
            text, finish = out[0]
            assert text.lstrip(" \n\t")[:1] == "{", text
            if finish == "stop":
                assert isinstance(json.loads(text), dict), text
            else:  # a random model rarely closes an unbounded object in 96 tokens
                assert finish == "length"


def test_schema_on_completions_streamed(server, model, healthy_after):
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 5}
    resp = server.post(COMPL, {"model": model, "prompt": "Numbers:", "max_tokens": 200,
                               "temperature": 1.0, "seed": 7, "stream": True,
                               "response_format": rf_schema(schema)})
    assert resp.status == 200, resp
    text, finish = "", None
    for ev in sse_events(resp.body):
        if ev == "[DONE]":
            break
        ch = json.loads(ev)["choices"][0]
        text += ch.get("text") or ""
        finish = ch.get("finish_reason") or finish
    assert finish == "stop", text
    jsonschema.validate(json.loads(text), schema)


def test_recursive_schema_with_refs(server, model, healthy_after):
    schema = {
        "$defs": {"node": {"type": "object", "properties": {
            "v": {"type": "integer"},
            "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
            "required": ["v", "kids"], "additionalProperties": False}},
        "$ref": "#/$defs/node"}
    for seed in range(4):
        _, out = content_of(server.post(CHAT, chat_body(
            model, "A tree", max_tokens=300, temperature=1.0, seed=seed,
            response_format=rf_schema(schema))))
        text, finish = out[0]
        if finish == "stop":
            jsonschema.validate(json.loads(text), schema)
        else:  # recursion can outgrow max_tokens: still an object's prefix
            assert finish == "length" and text.lstrip()[:1] == "{"


@pytest.mark.parametrize("rf,needle", [
    ({"type": "xml"}, "xml"),
    ({"type": "json_schema"}, "json_schema"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "name"),
    ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, "name"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "strict": "yes", "schema": {}}},
     "strict"),
    (rf_schema({"type": "integer", "maximum": 3}), "maximum"),
    (rf_schema({"type": "string", "format": "hostname"}), "hostname"),
    (rf_schema({"type": "string", "pattern": "(?<=a)b"}), "lookaround"),
    (rf_schema({"properties": {"a": {"$ref": "#/$defs/missing"}}}), "missing"),
    (rf_schema({"type": "string", "pattern": "^(((a{1000}){1000}){1000})$"}), "instructions"),
    (rf_schema({"type": "object", "patternProperties": {"^x": {}}}), "patternProperties"),
])
def test_unsupported_formats_and_keywords_are_400(server, model, rf, needle, healthy_after):
    for route, body in ((CHAT, chat_body(model, "hi", max_tokens=4)),
                        (COMPL, {"model": model, "prompt": "hi", "max_tokens": 4})):
        body["response_format"] = rf
        r = server.post(route, body)
        assert r.status == 400, r
        err = r.json()["error"]
        assert err["param"] == "response_format" and needle in err["message"], err
        apiutil.validate("error", r.json())


# ------------------------------------------------------------ the embedded model, openai
@pytest.fixture(scope="module")
def tiny(logs_dir):
    s = Server(logs_dir, "structured-tiny",
               args={"--model": str(TINY), "--tokenizer": str(TINY / "tokenizer.model"),
                     "--served-model-name": "cogvlm-tiny-shapes"}).start()
    yield s
    assert s.stop() == 0


def shapes_png(seed):
    """A scene of the embedded model's task (one or two flat shapes on white)."""
    import io

    from PIL import Image, ImageDraw
    rnd = random.Random(seed)
    img = Image.new("RGB", (224, 224), "white")
    d = ImageDraw.Draw(img)
    colours = {"red": (230, 25, 25), "green": (25, 180, 25), "blue": (25, 25, 230)}
    name = rnd.choice(sorted(colours))
    x, y, s = rnd.randint(20, 120), rnd.randint(20, 120), rnd.randint(40, 80)
    d.ellipse([x, y, x + s, y + s], fill=colours[name])
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


class Scene(BaseModel):
    colour: Literal["red", "green", "blue", "yellow", "purple", "orange"]
    shape: Literal["circle", "square", "triangle"]
    count: int
    label: str = Field(max_length=10)
    corners: List[int] = Field(min_length=4, max_length=4)
    note: Optional[Literal["small", "large"]]


def test_openai_parse_with_pydantic(tiny):
    from openai import OpenAI
    client = OpenAI(base_url=tiny.base_url + "/v1", api_key="sk-unused", max_retries=0,
                    timeout=120)
    try:
        for seed in range(4):
            completion = client.chat.completions.parse(
                model=tiny.model_id, max_tokens=BOUNDED_MAX_TOKENS, temperature=1.0,
                seed=seed, response_format=Scene,
                messages=[{"role": "user", "content": [
                    {"type": "text", "text": "What color is the circle?"},
                    {"type": "image_url", "image_url": {"url": data_url(shapes_png(seed))}}]}])
            choice = completion.choices[0]
            assert choice.finish_reason == "stop", choice
            assert isinstance(choice.message.parsed, Scene), choice.message
            Scene.model_validate_json(choice.message.content)
    finally:
        client.close()


def test_stream_with_schema_and_greedy_equals_non_stream(tiny):
    """A streamed constrained answer is the same document as the non-streamed one (greedy),
    and it validates; the free answer of the same question is not JSON."""
    schema = Scene.model_json_schema()
    msgs = [{"role": "user", "content": [
        {"type": "text", "text": "What color is the circle?"},
        {"type": "image_url", "image_url": {"url": data_url(shapes_png(11))}}]}]
    free = tiny.post(CHAT, {"model": tiny.model_id, "messages": msgs, "max_tokens": 20,
                            "temperature": 0})
    with pytest.raises(ValueError):
        json.loads(free.json()["choices"][0]["message"]["content"])
    base = {"model": tiny.model_id, "messages": msgs, "max_tokens": BOUNDED_MAX_TOKENS,
            "temperature": 0, "response_format": rf_schema(schema, "Scene")}
    whole = tiny.post(CHAT, base).json()["choices"][0]
    resp = tiny.post(CHAT, dict(base, stream=True))
    assert resp.status == 200, resp
    text, finish = "", None
    for ev in sse_events(resp.body):
        if ev == "[DONE]":
            break
        for ch in json.loads(ev)["choices"]:
            text += ch["delta"].get("content") or ""
            finish = ch.get("finish_reason") or finish
    assert whole["finish_reason"] == finish == "stop"
    assert text == whole["message"]["content"]
    jsonschema.validate(json.loads(text), schema)
