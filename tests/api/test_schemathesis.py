"""schemathesis against openapi.yaml, for a bounded number of generated examples per
operation (plus its coverage phase): no 5xx, every status, header and content type
documented, every JSON body and every SSE event matching the documented schema, values
outside the schema rejected, 405s for undocumented methods. st_hooks.py points generated
requests at the served model and caps generation lengths."""
import os
import subprocess
import sys
from pathlib import Path

from apiutil import OUR_SPEC

HERE = Path(__file__).resolve().parent

MAX_EXAMPLES = os.environ.get("COGVLM_SCHEMATHESIS_EXAMPLES", "50")
CHECKS = ",".join([
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "unsupported_method",
])


def test_schemathesis(make_server, tmp_path):
    s = make_server("schemathesis")
    st = Path(sys.executable).with_name("st")
    cmd = [str(st), "run", str(OUR_SPEC), "--url", s.base_url,
           "--checks", CHECKS, "--max-examples", MAX_EXAMPLES, "--phases", "examples,coverage,fuzzing",
           "--generation-deterministic", "--continue-on-failure",
           "--workers", "1", "--request-timeout", "30", "--no-color"]
    env = dict(os.environ, NO_COLOR="1", SCHEMATHESIS_HOOKS="st_hooks", COGVLM_ST_MODEL=s.model_id,
               PYTHONPATH=os.pathsep.join([str(HERE)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=140, env=env)
    out = r.stdout + r.stderr
    i = out.find("FAILURES")
    tail = out[i:][:15000] if i >= 0 else "\n".join(out.splitlines()[-120:])
    assert r.returncode == 0, f"schemathesis failed (rc={r.returncode}):\n{tail}\n--- server log:\n{s.log_tail(30)}"
    s.assert_healthy()
