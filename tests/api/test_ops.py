"""Operational routes and options: /health, /metrics, /v1/models over raw HTTP, --help,
configuration through COGVLM_* variables."""
import json
import subprocess

from apiutil import (MODEL_DIR, SERVER_BIN, chat_body, data_url, parse_metrics, png_bytes,
                     validate)

GAUGES = ["cogvlm_requests_running", "cogvlm_requests_waiting", "cogvlm_kv_blocks_used",
          "cogvlm_kv_blocks_total", "cogvlm_kv_usage_ratio"]
COUNTERS = ["cogvlm_prompt_tokens", "cogvlm_generation_tokens", "cogvlm_prefix_cache_hit_tokens",
            "cogvlm_prefix_cache_query_tokens", "cogvlm_vision_cache_hits",
            "cogvlm_vision_cache_misses", "cogvlm_preemptions", "cogvlm_requests",
            "cogvlm_http_requests"]  # family names without the _total suffix
HISTOGRAMS = ["cogvlm_time_to_first_token_seconds", "cogvlm_inter_token_latency_seconds",
              "cogvlm_request_duration_seconds", "cogvlm_vision_tower_seconds"]


def test_health(server):
    r = server.get("/health")
    assert r.status == 200, r
    assert r.headers.get("content-type", "").startswith("application/json")
    assert validate("health", r.json()) == {"status": "ok"}


def test_health_while_starting(server):
    """Every /health answer seen while the daemon started was 503 {"status":"loading"}
    (the tiny model may load before the first poll: then there is none) until the 200."""
    assert server.early_health and server.early_health[-1][0] == 200
    for status, body in server.early_health[:-1]:
        assert status == 503, (status, body)
        assert json.loads(body) == {"status": "loading"}, body


def test_config_file(make_server, tmp_path):
    cfg = tmp_path / "cogvlm.conf"
    cfg.write_text("# test configuration\nserved_model_name = from-config\napi_key = cfg-key\n")
    s = make_server("config", args={"--config": str(cfg)})
    r = s.get("/v1/models", headers={"Authorization": "Bearer cfg-key"})
    assert r.status == 200, r
    assert [m["id"] for m in r.json()["data"]] == ["from-config"]
    assert s.get("/v1/models").status == 401


def test_models_raw(server):
    r = server.get("/v1/models")
    assert r.status == 200, r
    body = validate("models", r.json())
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [server.model_id]
    assert server.model_id == MODEL_DIR.name  # default: the model directory's basename
    r = server.get(f"/v1/models/{server.model_id}")
    assert r.status == 200, r
    assert validate("model", r.json()) == body["data"][0]
    r = server.get("/v1/models/unknown-model")
    assert r.status == 404, r
    validate("error", r.json())


def test_metrics_families(server):
    # traffic first, so every family has something to show
    r = server.post("/v1/chat/completions", chat_body(
        server.model_id, "hello", image_url=data_url(png_bytes(17, 23), "image/png"),
        max_tokens=5, temperature=0))
    assert r.status == 200, r
    assert server.get("/no/such/route").status == 404
    r = server.get("/metrics")
    assert r.status == 200, r
    assert r.headers.get("content-type", "").startswith("text/plain"), r.headers
    text = r.body.decode()
    fams = parse_metrics(text)  # strict exposition-format parse
    for name in GAUGES:
        assert name in fams, f"missing gauge {name}"
        assert fams[name].type == "gauge", (name, fams[name].type)
    for name in COUNTERS:
        assert name in fams, f"missing counter {name}_total"
        assert fams[name].type == "counter", (name, fams[name].type)
    for name in HISTOGRAMS:
        assert name in fams, f"missing histogram {name}"
        fam = fams[name]
        assert fam.type == "histogram", (name, fam.type)
        names = {s.name for s in fam.samples}
        assert {name + "_bucket", name + "_sum", name + "_count"} <= names, names
        inf = [s for s in fam.samples if s.name == name + "_bucket" and s.labels.get("le") == "+Inf"]
        count = [s for s in fam.samples if s.name == name + "_count"]
        assert inf and count and inf[0].value == count[0].value
    vals = {s.name: s.value for f in fams.values() for s in f.samples if not s.labels}
    assert vals["cogvlm_kv_blocks_total"] > 0
    assert 0 <= vals["cogvlm_kv_usage_ratio"] <= 1
    assert vals["cogvlm_prompt_tokens_total"] > 0
    assert vals["cogvlm_generation_tokens_total"] > 0
    assert vals["cogvlm_time_to_first_token_seconds_count"] > 0
    assert vals["cogvlm_request_duration_seconds_count"] > 0
    assert vals["cogvlm_vision_tower_seconds_count"] + vals["cogvlm_vision_cache_hits_total"] > 0
    req = {s.labels.get("status"): s.value for s in fams["cogvlm_requests"].samples}
    assert req.get("finished", 0) > 0, req
    http = [(s.labels.get("route", ""), s.labels.get("status"), s.value)
            for s in fams["cogvlm_http_requests"].samples]
    assert any("chat/completions" in rt and st == "200" and v > 0 for rt, st, v in http), http
    assert any(st == "404" and v > 0 for rt, st, v in http), http


def test_http_requests_counter_increments(server):
    def count():
        t = server.metrics_text()
        return sum(s.value for s in parse_metrics(t)["cogvlm_http_requests"].samples
                   if "models" in s.labels.get("route", "") and s.labels.get("status") == "200")
    before = count()
    for _ in range(3):
        assert server.get("/v1/models").status == 200
    assert count() >= before + 3


def test_token_counters_increment(server):
    pt = server.metric("cogvlm_prompt_tokens_total")
    gt = server.metric("cogvlm_generation_tokens_total")
    r = server.post("/v1/completions", {"model": server.model_id, "prompt": "count these tokens",
                                        "max_tokens": 7, "temperature": 0})
    assert r.status == 200, r
    u = r.json()["usage"]
    assert server.metric("cogvlm_prompt_tokens_total") >= pt + u["prompt_tokens"] - \
        server.metric("cogvlm_prefix_cache_hit_tokens_total")
    assert server.metric("cogvlm_generation_tokens_total") >= gt + u["completion_tokens"]


def test_help_lists_options():
    r = subprocess.run([str(SERVER_BIN), "--help"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    for opt in ["--host", "--port", "--model", "--tokenizer", "--served-model-name", "--threads",
                "--kv-memory", "--max-batched-tokens", "--max-seqs", "--queue-limit",
                "--max-body-bytes", "--max-image-pixels", "--request-timeout", "--drain-timeout",
                "--api-key", "--api-key-file", "--log-level", "--log-format", "--max-n", "--config"]:
        assert opt in out, f"--help does not mention {opt}"


def test_unknown_option_fails():
    r = subprocess.run([str(SERVER_BIN), "--no-such-option", "1"], capture_output=True, text=True,
                       timeout=10)
    assert r.returncode != 0


def test_served_model_name_from_env_and_listening_line(make_server):
    s = make_server("envname", env={"COGVLM_SERVED_MODEL_NAME": "cogvlm-env-name"})
    r = s.get("/v1/models")
    assert r.status == 200, r
    assert [m["id"] for m in r.json()["data"]] == ["cogvlm-env-name"]
    r = s.post("/v1/completions", {"model": "cogvlm-env-name", "prompt": "x", "max_tokens": 2})
    assert r.status == 200, r
    r = s.post("/v1/completions", {"model": MODEL_DIR.name, "prompt": "x", "max_tokens": 2})
    assert r.status == 404, r
    assert f"listening on http://127.0.0.1:{s.port}" in s.log_text()


def test_json_logs(make_server):
    import json
    s = make_server("jsonlog", args={"--log-format": "json", "--served-model-name": "jl"})
    assert s.get("/v1/models").status == 200
    assert s.stop() == 0
    lines = [ln for ln in s.log_text().splitlines() if ln.strip()]
    assert lines
    for ln in lines:
        json.loads(ln)  # every log line is one JSON object


def test_kv_cache_dtype_blocks(server, make_server):
    """--kv-cache-dtype f16 / int8 (CPU): the daemon starts, answers an image chat, and the
    same --kv-memory holds twice the f32 blocks at f16, and at int8 the int8 K / V plus one
    f32 scale per token and KV head for each (4 hd / (hd + 4) times: 3.2x at golden-tiny's
    head_dim 16); /metrics and the ready line of the log show the count."""
    f32 = server.metric("cogvlm_kv_blocks_total")
    assert f32 > 0
    for dtype in ("f16", "int8"):
        s = make_server(f"kv-{dtype}", args={"--kv-cache-dtype": dtype})
        blocks = s.metric("cogvlm_kv_blocks_total")
        if dtype == "f16":
            assert blocks == 2 * f32, (blocks, f32)
        else:
            assert 3 * f32 < blocks < 4 * f32, (blocks, f32)
        assert f"{int(blocks)} KV blocks of" in s.log_path.read_text()
        r = s.post("/v1/chat/completions",
                   chat_body(s.model_id, "What is in the picture?",
                             image_url=data_url(png_bytes()), max_tokens=6, temperature=0))
        assert r.status == 200, r
        body = validate("chat", r.json())
        assert 1 <= body["usage"]["completion_tokens"] <= 6
        s.assert_healthy()
