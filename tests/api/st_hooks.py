"""schemathesis hooks (loaded through SCHEMATHESIS_HOOKS by test_schemathesis.py).

Generated bodies name random models, which would all be 404s and never reach the
generation code: a `model` that is a string is replaced with the served model id (type
mutations such as a number stay). Generation lengths are capped so that the run stays
short: a valid max_tokens within the context becomes at most 32, and a chat request
without one gets 32 (values beyond the context are kept: they must be 400s)."""
import os

import schemathesis

MODEL = os.environ.get("COGVLM_ST_MODEL", "model-bf16")
CONTEXT = int(os.environ.get("COGVLM_TEST_CONTEXT", "2048"))
CAP = 32


def _cap(body, key):
    v = body.get(key)
    if isinstance(v, int) and not isinstance(v, bool) and CAP < v <= CONTEXT:
        body[key] = CAP


@schemathesis.hook
def map_body(context, body):
    if not isinstance(body, dict):
        return body
    body = dict(body)
    if isinstance(body.get("model"), str):
        body["model"] = MODEL
    _cap(body, "max_tokens")
    _cap(body, "max_completion_tokens")
    if "messages" in body and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = CAP
    return body
