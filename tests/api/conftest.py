"""Fixtures of the black-box API suite. The daemon under test is the real
build/cogvlm-server (override with COGVLM_SERVER_BIN), serving the test model on a free
127.0.0.1 port; see apiutil.py for the paths and options."""
import os
import shlex

import pytest

# Everything goes to 127.0.0.1 directly: never through a proxy named in the environment
# (the openai client and schemathesis would otherwise honour it).
for _k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
    os.environ.pop(_k, None)
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

import apiutil
from apiutil import Server

# COGVLM_SERVER_EXTRA_ARGS="--backend cuda": options added to every daemon the suite
# starts (tests/gpu/run.sh runs the accuracy test on the GPU this way). Server.start
# passes no COGVLM_* variable on, so the daemon never sees this one itself.
_extra = shlex.split(os.environ.get("COGVLM_SERVER_EXTRA_ARGS", ""))
apiutil.BASE_ARGS.update(zip(_extra[0::2], _extra[1::2]))


def pytest_report_header(config):
    return [f"cogvlm-server: {apiutil.SERVER_BIN}",
            f"model: {apiutil.MODEL_DIR}  tokenizer: {apiutil.TOKENIZER}",
            f"OpenAI spec: {apiutil.OPENAI_SPEC}"]


def pytest_sessionstart(session):
    missing = [str(p) for p in (apiutil.MODEL_DIR, apiutil.TOKENIZER, apiutil.OPENAI_SPEC)
               if not p.exists()]
    if missing:
        raise pytest.UsageError("test data missing (set COGVLM_SHARED_DATA?): " + ", ".join(missing))


@pytest.fixture(scope="session", autouse=True)
def schemas_loaded():
    """Loads both specs once, up front (a few seconds on a busy machine), so that the
    first validation never delays a timing-sensitive test."""
    for kind in apiutil.KINDS:
        theirs, ours = apiutil.KINDS[kind]
        if theirs:
            apiutil.openai_validator(theirs)
        apiutil.our_validator(ours)
    apiutil.openai_completion_chunk_validator()


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory):
    d = os.environ.get("COGVLM_API_TEST_LOGS")
    if d:
        os.makedirs(d, exist_ok=True)
        from pathlib import Path
        return Path(d)
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="session")
def server(logs_dir):
    """The shared daemon most tests use (no API key, default model name)."""
    s = Server(logs_dir, "main").start()
    yield s
    rc = s.stop()
    assert rc == 0, f"main server exited with {rc} after SIGTERM\n{s.log_tail()}"


@pytest.fixture
def make_server(logs_dir):
    """Factory for dedicated daemons with their own options; all stopped at the end."""
    started = []

    def make(name, args=None, env=None, start=True):
        s = Server(logs_dir, name, args=args, env=env)
        started.append(s)
        return s.start() if start else s

    yield make
    for s in started:
        if s.alive():
            s.stop()


@pytest.fixture
def model(server):
    return server.model_id


@pytest.fixture
def client(server):
    from openai import OpenAI
    c = OpenAI(base_url=server.base_url + "/v1", api_key="sk-unused", max_retries=0, timeout=60)
    yield c
    c.close()


@pytest.fixture
def healthy_after(server):
    """Checks that the shared server still answers /health 200 after the test."""
    yield
    server.assert_healthy()
