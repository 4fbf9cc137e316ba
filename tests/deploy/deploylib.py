"""Helpers of the deployment tests (stdlib only): starting build/cogvlm-server with the
tiny test model on a loopback port, HTTP, Prometheus text parsing, process cleanup. What
the three Python suites share lives in tests/lib/cvlmtest.py; the names the tests use from
it are re-exported here.

Environment (the same names as tests/api): COGVLM_SERVER_BIN (default build/cogvlm-server),
COGVLM_SHARED_DATA (default ../shared/data), COGVLM_TEST_MODEL, COGVLM_TEST_TOKENIZER,
COGVLM_DEPLOY_TEST_LOGS (copy the daemons' logs there).
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
import cvlmtest  # noqa: E402
from cvlmtest import HOST, REPO, SERVER_BIN, SHARED, free_port  # noqa: E402,F401

MODEL_ID = "tiny"  # every test server gets --served-model-name tiny


def model_args():
    """--model/--tokenizer of the test model: COGVLM_TEST_MODEL, else the trained default
    model when it exists, else the random-weight golden model."""
    m = os.environ.get("COGVLM_TEST_MODEL")
    if m:
        args = ["--model", m]
        t = os.environ.get("COGVLM_TEST_TOKENIZER")
        return args + (["--tokenizer", t] if t else [])
    if (REPO / "models" / "cogvlm-tiny-shapes" / "config.json").exists():
        return ["--model", str(REPO / "models" / "cogvlm-tiny-shapes")]
    return ["--model", str(SHARED / "golden-tiny" / "model-bf16"),
            "--tokenizer", str(SHARED / "llama2-tokenizer.model")]


class Failures:
    """Collects failed checks; report() prints them and gives the exit status."""

    def __init__(self, name):
        self.name = name
        self.items = []
        self.checks = 0

    def check(self, cond, what):
        self.checks += 1
        if not cond:
            self.items.append(what)
            print(f"{self.name}: FAIL: {what}", file=sys.stderr, flush=True)
        return cond

    def report(self):
        if self.items:
            print(f"{self.name}: {len(self.items)} of {self.checks} checks failed",
                  file=sys.stderr)
            return 1
        print(f"{self.name}: ok ({self.checks} checks)")
        return 0


class Server(cvlmtest.ServerProcess):
    """One cogvlm-server process on 127.0.0.1, port 0 (the kernel picks; read back from
    the 'listening on' log line). Its own process group so that cleanup reaches it."""

    def __init__(self, workdir, name, extra_args=(), env=None):
        self.name = name
        self.log_path = Path(workdir) / f"{name}.log"
        self.log = open(self.log_path, "wb")
        e = cvlmtest.server_env(env, drop=("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"))
        args = [str(SERVER_BIN), "--host", HOST, "--port", "0", "--served-model-name",
                MODEL_ID, "--threads", "1", "--kv-memory", "32M", "--drain-timeout", "20",
                "--request-timeout", "60", "--log-level", "info"] + model_args()
        self.proc = subprocess.Popen(args + list(extra_args), stdout=self.log,
                                     stderr=subprocess.STDOUT, env=e,
                                     start_new_session=True)
        self.pid = self.proc.pid
        self.port = None

    def wait_listening(self, timeout=30):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.port = cvlmtest.listening_port(self.log_text())
            if self.port:
                return self.port
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start listening:\n{self.log_text()[-3000:]}")

    def wait_ready(self, timeout=60):
        if self.port is None:
            self.wait_listening(timeout)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                r = request(self.port, "GET", "/health", timeout=2)
                if r[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready:\n{self.log_text()[-3000:]}")

    def signal(self, sig):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        """Ends this server and anything it started (its own process group)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self.log.close()
        keep = os.environ.get("COGVLM_DEPLOY_TEST_LOGS")
        if keep:
            os.makedirs(keep, exist_ok=True)
            shutil.copy(self.log_path, Path(keep) / self.log_path.name)


def request(port, method, path, body=None, headers=None, timeout=30):
    """One request on a fresh connection: (status, headers dict lower-case, body bytes)."""
    r = cvlmtest.http_request(port, method, path, body, headers, timeout)
    return r.status, r.headers, r.body


def parse_metrics(text):
    """Prometheus text -> {(name, frozenset(labels.items())): value} (bad lines skipped)."""
    return {(name, frozenset(labels.items())): value
            for name, labels, value in cvlmtest.metric_samples(text, strict=False)}


def metric_sum(metrics, name, **labels):
    """Sum of the samples of name whose labels include every given label."""
    want = set(labels.items())
    return sum(v for (n, ls), v in metrics.items() if n == name and want <= set(ls))


def tempdir(prefix):
    return tempfile.mkdtemp(prefix=prefix)


def install_sigterm_exit(deadline_s=None):
    """Turns SIGTERM/SIGHUP/SIGINT (and SIGALRM after deadline_s, a hard bound on the whole
    test) into SystemExit so that finally: blocks still stop every process started."""
    def h(signum, frame):
        if signum == signal.SIGALRM:
            print(f"{os.path.basename(sys.argv[0])}: FAIL: still running after {deadline_s} s",
                  file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGALRM):
        signal.signal(s, h)
    if deadline_s:
        signal.alarm(int(deadline_s))


# ------------------------------------------------------------------------------ nginx
NGINX_CONF = REPO / "deploy" / "nginx" / "cogvlm.conf"


def find_nginx():
    for p in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if p and os.access(p, os.X_OK):
            return p
    return None


def apt_install(who, pkgs):
    """apt-get install the first of pkgs that installs (apt-get update once if needed)."""
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for update in (False, True):
        if update:
            print(f"{who}: apt-get update", flush=True)
            subprocess.run(sudo + ["apt-get", "update", "-qq"], env=env, check=False,
                           stdout=subprocess.DEVNULL)
        for pkg in pkgs:
            r = subprocess.run(sudo + ["apt-get", "install", "-y", "-qq",
                                       "--no-install-recommends", pkg],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if r.returncode == 0:
                return True
    return False


def ensure_nginx(who):
    """nginx's path; installs Debian's nginx-light (or nginx) with apt-get if missing."""
    p = find_nginx()
    if not p:
        print(f"{who}: nginx not found, installing it with apt-get", flush=True)
        apt_install(who, ("nginx-light", "nginx"))
        p = find_nginx()
    return p


def compiled_temp_paths(nginx):
    """The *_temp_path directives this nginx knows (modules may be compiled out)."""
    v = subprocess.run([nginx, "-V"], capture_output=True, text=True).stderr
    out = ["client_body_temp_path", "proxy_temp_path"]
    for m in ("fastcgi", "uwsgi", "scgi"):
        if f"--without-http_{m}_module" not in v:
            out.append(f"{m}_temp_path")
    return out


def write_nginx_conf(work, nginx, port, backends):
    """work/nginx.conf + work/cogvlm.conf: the shipped deploy/nginx/cogvlm.conf with its
    replicas, listen port and log path replaced, inside a main config that keeps the pid,
    logs and temp files under work/. Returns a list of problems (empty: fine)."""
    problems = []
    text = NGINX_CONF.read_text()
    ups = re.findall(r"^(\s*)server\s+\S+:\d+(\s[^;]*)?;", text, re.M)
    if len(ups) < 2:
        problems.append(f"{NGINX_CONF}: no upstream `server HOST:PORT ...;` lines")
        ups = [("    ", "")]
    indent, params = ups[0][0], ups[0][1] or ""
    lines = "".join(f"{indent}server {HOST}:{p}{params};\n" for p in backends)
    text = re.sub(r"^\s*server\s+\S+:\d+(\s[^;]*)?;\n", "", text, flags=re.M)
    text, m = re.subn(r"^\s*least_conn;\n", lambda mo: mo.group(0) + lines, text,
                      count=1, flags=re.M)
    if m != 1:
        problems.append(f"{NGINX_CONF}: no least_conn; in the upstream block")
    text, m = re.subn(r"^(\s*)listen\s+80;", rf"\1listen {HOST}:{port};", text, flags=re.M)
    if m != 1:
        problems.append(f"{NGINX_CONF}: no `listen 80;` to rewrite")
    text = text.replace("/var/log/nginx/", f"{work}/")
    (Path(work) / "cogvlm.conf").write_text(text)
    temps = "".join(f"    {d} {work}/{d.split('_temp')[0]};\n"
                    for d in compiled_temp_paths(nginx))
    user = ""
    if os.geteuid() == 0:  # workers would otherwise run as nobody, outside work/
        import grp
        import pwd
        user = (f"user {pwd.getpwuid(os.geteuid()).pw_name} "
                f"{grp.getgrgid(os.getegid()).gr_name};\n")
    (Path(work) / "nginx.conf").write_text(
        f"{user}daemon off;\nmaster_process on;\nworker_processes 2;\n"
        f"pid {work}/nginx.pid;\nerror_log {work}/error.log info;\n"
        f"events {{ worker_connections 512; }}\n"
        f"http {{\n    default_type application/octet-stream;\n{temps}"
        f"    include {work}/cogvlm.conf;\n}}\n")
    return problems


def nginx_args(nginx, work):
    return [nginx, "-p", str(work) + "/", "-c", f"{work}/nginx.conf", "-e", f"{work}/error.log"]
