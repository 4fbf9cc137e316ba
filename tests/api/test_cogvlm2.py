"""The daemon serves a CogVLM2-layout checkpoint: the tiny random model of
shared/data/golden-cogvlm2-tiny (grouped-query attention, vision-expert QKV bias, the 2x2
conv after the ViT, LLaMA-3 tokenizer with EOS ids [128001, 128009]) answers chat requests
with and without an image over HTTP, streamed or not. The model is random, so only the
shape of the answers is checked; its numerics are held to the reference by
`cogvlm golden` (tests/unit/test_golden.c)."""
import pytest

import apiutil
from apiutil import Server, chat_body, data_url, sse_events, validate

FIXTURE = apiutil.SHARED / "golden-cogvlm2-tiny"
NAME = "cogvlm2-tiny"


@pytest.fixture(scope="module", params=["model", "model-bf16"])
def cogvlm2(request, logs_dir):
    model, tok = FIXTURE / request.param, apiutil.SHARED / "llama3-tokenizer"
    if not (model / "config.json").exists() or not (tok / "tokenizer.json").exists():
        pytest.fail(f"{model} or {tok} is missing")
    s = Server(logs_dir, f"cogvlm2-{request.param}",
               args={"--model": str(model), "--tokenizer": str(tok),
                     "--served-model-name": NAME}).start()
    yield s
    assert s.stop() == 0


def image_url():
    return data_url((FIXTURE / "image.png").read_bytes())


def answer(resp):
    assert resp.status == 200, resp
    body = resp.json()
    validate("chat", body)
    choice = body["choices"][0]
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] in ("length", "stop")
    return body


def test_chat_text_only(cogvlm2):
    body = answer(cogvlm2.post("/v1/chat/completions",
                               chat_body(NAME, "What is the capital of France?", max_tokens=6,
                                         temperature=0)))
    # BOS + "Question: What is the capital of France? Answer:" (manifest: 12 tokens)
    assert body["usage"]["prompt_tokens"] == 12


def test_chat_with_image(cogvlm2):
    body = answer(cogvlm2.post("/v1/chat/completions",
                               chat_body(NAME, "What is in this image?", image_url=image_url(),
                                         max_tokens=6, temperature=0)))
    # BOS + 6 image slots (boi, 2x2 conv tokens, eoi) + 10 text tokens (manifest: 17)
    assert body["usage"]["prompt_tokens"] == 17
    assert body["usage"]["completion_tokens"] >= 1


def test_chat_with_image_streamed(cogvlm2):
    resp = cogvlm2.post("/v1/chat/completions",
                        chat_body(NAME, "What is in this image?", image_url=image_url(),
                                  max_tokens=4, temperature=0, stream=True))
    assert resp.status == 200, resp
    events = sse_events(resp.body)
    assert events and events[-1] == "[DONE]"


def test_structured_output_with_the_byte_level_tokenizer(cogvlm2):
    """response_format json_schema over the LLaMA-3 vocabulary (128k byte-level tokens, two
    EOS ids): the random model's sampled answers are documents of the schema."""
    import json

    import jsonschema
    from test_structured import BOUNDED, BOUNDED_MAX_TOKENS, rf_schema
    for seed in range(3):
        body = answer(cogvlm2.post("/v1/chat/completions", chat_body(
            NAME, "Describe it as JSON.", image_url=image_url(), max_tokens=BOUNDED_MAX_TOKENS,
            temperature=1.2, seed=seed, response_format=rf_schema(BOUNDED))))
        choice = body["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), BOUNDED)
