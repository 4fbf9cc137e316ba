"""API keys: with --api-key-file (or COGVLM_API_KEY) every /v1 route needs
`Authorization: Bearer KEY`; /health and /metrics stay open."""
import openai
import pytest

from apiutil import chat_body, check_error

KEY = "sk-test-0123456789abcdef"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, logs_dir):
    from apiutil import Server
    d = tmp_path_factory.mktemp("auth")
    keyfile = d / "api-key"
    keyfile.write_text(KEY + "\n")
    s = Server(logs_dir, "auth", args={"--api-key-file": str(keyfile),
                                       "--served-model-name": "keyed-model"}).start()
    yield s
    assert s.stop() == 0, s.log_tail()


ROUTES = [("POST", "/v1/chat/completions", chat_body("keyed-model", "hi", max_tokens=2)),
          ("POST", "/v1/completions", {"model": "keyed-model", "prompt": "hi", "max_tokens": 2}),
          ("GET", "/v1/models", None),
          ("GET", "/v1/models/keyed-model", None)]


@pytest.mark.parametrize("method,path,body", ROUTES, ids=[r[1] for r in ROUTES])
@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", "Bearer " + KEY[:-1],
                                  "Bearer " + KEY + "x", "Basic " + KEY, KEY, "Bearer "],
                         ids=["none", "wrong", "prefix", "longer", "basic", "no-scheme", "empty"])
def test_bad_or_missing_key(keyed, method, path, body, auth):
    headers = {"Authorization": auth} if auth is not None else {}
    r = keyed.request(method, path, body, headers)
    check_error(r, 401, etype="authentication_error")
    keyed.assert_healthy()


@pytest.mark.parametrize("method,path,body", ROUTES, ids=[r[1] for r in ROUTES])
def test_good_key(keyed, method, path, body):
    r = keyed.request(method, path, body, {"Authorization": "Bearer " + KEY})
    assert r.status == 200, r


def test_health_and_metrics_open(keyed):
    assert keyed.get("/health").status == 200
    r = keyed.get("/metrics")
    assert r.status == 200 and b"cogvlm_" in r.body
    # a wrong key on the open routes does not hurt either
    assert keyed.get("/health", headers={"Authorization": "Bearer nope"}).status == 200


def test_unknown_route_with_key_is_404(keyed):
    r = keyed.get("/v1/nothing-here", headers={"Authorization": "Bearer " + KEY})
    check_error(r, 404)


def test_openai_client_with_key(keyed):
    good = openai.OpenAI(base_url=keyed.base_url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    r = good.chat.completions.create(model="keyed-model", messages=[{"role": "user", "content": "hi"}],
                                     max_tokens=3, temperature=0)
    assert r.choices[0].message.role == "assistant"
    bad = openai.OpenAI(base_url=keyed.base_url + "/v1", api_key="sk-wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_api_key_from_env(make_server):
    s = make_server("envkey", env={"COGVLM_API_KEY": "env-secret"})
    check_error(s.get("/v1/models"), 401)
    assert s.get("/v1/models", headers={"Authorization": "Bearer env-secret"}).status == 200
    assert s.get("/health").status == 200


def test_api_key_option(make_server):
    s = make_server("optkey", args={"--api-key": "opt-secret"})
    check_error(s.get("/v1/models", headers={"Authorization": "Bearer env-secret"}), 401)
    assert s.get("/v1/models", headers={"Authorization": "Bearer opt-secret"}).status == 200
