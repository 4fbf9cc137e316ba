#!/usr/bin/env python3
"""Lints the deployment files under deploy/ with the real tools where they exist.

- nginx: `nginx -t` on deploy/nginx/cogvlm.conf (inside a minimal main config), and the
  settings SSE needs (proxy_buffering off, a read timeout above request_timeout,
  least_conn, passive health checks, upstream keepalive).
- Prometheus: `promtool check config` (prometheus.yml; when this promtool was built
  without Kubernetes discovery, as Debian's is, the kubernetes_sd jobs are checked by
  structure and the rest by promtool), `promtool check rules`, `promtool test rules`
  (cogvlm-alerts.test.yml: every alert fires on its condition and not below it).
  promtool comes from PATH, else from Debian's prometheus package, downloaded and
  unpacked (not installed) into build/deploy-tools/.
- Grafana: the dashboard is JSON with unique panel ids, non-overlapping panels, and every
  PromQL expression parses (promtool check rules on them as recording rules).
- Metric names: every cogvlm_* name used by the alerts, the dashboard and the HPA exists in
  a live server's GET /metrics.
- Kubernetes: `kubectl kustomize deploy/k8s` renders (when kubectl exists) and every
  object validates strictly against the Kubernetes 1.28 and 1.37 schemas
  (kubernetes-validate); probes on /health, GPU resources, preStop, grace period > preStop
  + drain_timeout + 5 s, a PDB, an HPA on cogvlm_requests_waiting.
- Dockerfiles: multi-stage, the runtime base images, a non-root USER, HEALTHCHECK on
  /health, COPY --from of existing stages; the Debian runtime package list provides every
  shared library build/cogvlm-server links (ldd + dpkg), and the Ubuntu one is the same
  list with Ubuntu's names.

Run by test_configs.sh (which provides a virtualenv with PyYAML and kubernetes-validate).
Exit 0 when everything holds; prints each failure otherwise.
"""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploylib as dl  # noqa: E402

F = dl.Failures("test_configs")
D = dl.REPO / "deploy"
TOOLS = dl.REPO / "build" / "deploy-tools"


def run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, **kw)


def conf_default(key):
    m = re.search(rf"^#?{key}\s*=\s*(\S+)", (dl.REPO / "config" / "cogvlm.conf").read_text(),
                  re.M)
    return m.group(1) if m else None


def secs(v):
    m = re.fullmatch(r"(\d+)(s|m|min|h)?", str(v))
    if not m:
        return None
    return int(m.group(1)) * {"s": 1, None: 1, "m": 60, "min": 60, "h": 3600}[m.group(2)]


# ------------------------------------------------------------------------------ nginx
def check_nginx():
    nginx = dl.ensure_nginx("test_configs")
    if not F.check(nginx, "nginx is missing and apt-get could not install it"):
        return
    work = tempfile.mkdtemp(prefix="cogvlm-nginx-t-")
    try:
        os.chmod(work, 0o755)
        for p in dl.write_nginx_conf(work, nginx, dl.free_port(), [8000, 8001]):
            F.check(False, p)
        r = run(dl.nginx_args(nginx, work) + ["-t"])
        F.check(r.returncode == 0, f"nginx -t: {r.stderr.strip()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = dl.NGINX_CONF.read_text()
    body = re.sub(r"#.*", "", text)
    for d in ("least_conn;", "zone cogvlm_upstream", "proxy_buffering off;", "proxy_http_version 1.1;",
              'proxy_set_header Connection "";', "proxy_request_buffering on;"):
        F.check(d in body, f"nginx: `{d}` missing")
    F.check(re.search(r"max_fails=\d+ fail_timeout=\d+s", body),
            "nginx: no passive health check (max_fails/fail_timeout) on the replicas")
    F.check(re.search(r"^\s*keepalive \d+;", body, re.M), "nginx: no upstream keepalive")
    m = re.search(r"proxy_read_timeout (\d+)s;", body)
    rt = int(conf_default("request_timeout") or 600)
    F.check(m and int(m.group(1)) > rt,
            f"nginx: proxy_read_timeout must exceed request_timeout ({rt} s)")
    m = re.search(r"keepalive_timeout (\d+)s;", body)
    ct = int(conf_default("connection_timeout") or 30)
    F.check(m and int(m.group(1)) < ct,
            f"nginx: upstream keepalive_timeout must be below connection_timeout ({ct} s)")
    m = re.search(r"client_max_body_size (\d+)m;", body)
    F.check(m and int(m.group(1)) >= 20, "nginx: client_max_body_size below max_body_bytes")


# ------------------------------------------------------------------------------ prometheus
def find_promtool():
    p = shutil.which("promtool")
    if p:
        return p
    cached = TOOLS / "promtool"
    if cached.exists():
        return str(cached)
    # Debian's prometheus package, downloaded and unpacked (not installed: no daemon).
    tmp = tempfile.mkdtemp(prefix="cogvlm-promtool-")
    try:
        print("test_configs: fetching promtool from Debian's prometheus package", flush=True)
        r = run(["apt-get", "download", "prometheus"], cwd=tmp)
        if r.returncode != 0 and os.geteuid() == 0:
            run(["apt-get", "update", "-qq"])
            r = run(["apt-get", "download", "prometheus"], cwd=tmp)
        debs = glob.glob(f"{tmp}/prometheus_*.deb")
        if r.returncode != 0 or not debs:
            return None
        if run(["dpkg-deb", "-x", debs[0], f"{tmp}/x"]).returncode != 0:
            return None
        TOOLS.mkdir(parents=True, exist_ok=True)
        shutil.copy(f"{tmp}/x/usr/bin/promtool", cached)
        return str(cached)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_prometheus(promtool, metric_names):
    P = D / "prometheus"
    cfg = yaml.safe_load((P / "prometheus.yml").read_text())
    rules = yaml.safe_load((P / "cogvlm-alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    alerts = [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]
    for want in ("CogvlmHighErrorRate", "CogvlmQueueBacklog", "CogvlmKVCacheSaturated",
                 "CogvlmSlowTimeToFirstToken", "CogvlmReplicaDown"):
        F.check(want in alerts, f"prometheus: alert {want} missing")
    F.check(any("histogram_quantile(0.95" in e and "time_to_first_token_seconds_bucket" in e
                for e in exprs), "prometheus: no TTFT p95 from the histogram")
    check_metric_names("cogvlm-alerts.yml", exprs, metric_names)
    jobs = [j["job_name"] for j in cfg["scrape_configs"]]
    F.check("cogvlm" in jobs, "prometheus.yml: no cogvlm scrape job")
    for j in cfg["scrape_configs"]:
        F.check(j.get("metrics_path", "/metrics") == "/metrics",
                f"prometheus.yml: job {j['job_name']} does not scrape /metrics")
    if not F.check(promtool, "promtool not found and Debian's prometheus package not available"):
        return
    with tempfile.TemporaryDirectory(prefix="cogvlm-prom-") as t:
        for f in ("prometheus.yml", "cogvlm-alerts.yml", "cogvlm-alerts.test.yml"):
            shutil.copy(P / f, t)
        r = run([promtool, "check", "config", "prometheus.yml"], cwd=t)
        if r.returncode != 0 and "kubernetes_sd_configs not found" in r.stdout + r.stderr:
            # a promtool without Kubernetes discovery (Debian's): check the rest with it
            k8s = [j for j in cfg["scrape_configs"] if "kubernetes_sd_configs" in j]
            for j in k8s:
                for rc in j.get("relabel_configs", []):
                    F.check(set(rc) <= {"source_labels", "separator", "regex", "modulus",
                                        "target_label", "replacement", "action"},
                            f"prometheus.yml: job {j['job_name']}: bad relabel_config {rc}")
                F.check(any(rc.get("target_label") == "pod" for rc in j["relabel_configs"]),
                        f"prometheus.yml: job {j['job_name']} sets no pod label (HPA)")
            rest = dict(cfg, scrape_configs=[j for j in cfg["scrape_configs"] if j not in k8s])
            Path(t, "prometheus.yml").write_text(yaml.safe_dump(rest))
            r = run([promtool, "check", "config", "prometheus.yml"], cwd=t)
        F.check(r.returncode == 0, f"promtool check config: {r.stdout}{r.stderr}")
        r = run([promtool, "check", "rules", "cogvlm-alerts.yml"], cwd=t)
        F.check(r.returncode == 0, f"promtool check rules: {r.stdout}{r.stderr}")
        r = run([promtool, "test", "rules", "cogvlm-alerts.test.yml"], cwd=t)
        F.check(r.returncode == 0, f"promtool test rules: {r.stdout}{r.stderr}")


# ------------------------------------------------------------------------------ grafana
def check_grafana(promtool, metric_names):
    path = D / "grafana" / "cogvlm-dashboard.json"
    try:
        dash = json.loads(path.read_text())
    except ValueError as e:
        F.check(False, f"{path}: not JSON: {e}")
        return
    panels = [p for p in dash.get("panels", []) if p.get("type") != "row"]
    ids = [p["id"] for p in dash["panels"]]
    F.check(len(ids) == len(set(ids)), "grafana: duplicate panel ids")
    F.check(dash.get("uid") and dash.get("title"), "grafana: no uid or title")
    boxes = []
    for p in dash["panels"]:
        g = p["gridPos"]
        for (x, y, w, h, t) in boxes:
            if g["x"] < x + w and x < g["x"] + g["w"] and g["y"] < y + h and y < g["y"] + g["h"]:
                F.check(False, f"grafana: panels '{t}' and '{p['title']}' overlap")
        boxes.append((g["x"], g["y"], g["w"], g["h"], p["title"]))
        F.check(g["x"] + g["w"] <= 24, f"grafana: panel '{p['title']}' wider than the grid")
    exprs = []
    for p in panels:
        F.check(p.get("targets"), f"grafana: panel '{p['title']}' has no query")
        for t in p.get("targets", []):
            exprs.append(t["expr"])
    F.check(len(exprs) >= 10, f"grafana: only {len(exprs)} queries")
    check_metric_names("grafana dashboard", exprs, metric_names)
    if not promtool:
        return
    # the expressions parse: as recording rules, with Grafana's variables substituted
    sub = [e.replace("$__rate_interval", "5m").replace("$job", ".*").replace("$instance", ".*")
           for e in exprs]
    doc = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr{i}", "expr": e} for i, e in enumerate(sub)]}]}
    with tempfile.TemporaryDirectory(prefix="cogvlm-graf-") as t:
        Path(t, "d.yml").write_text(yaml.safe_dump(doc))
        r = run([promtool, "check", "rules", "d.yml"], cwd=t)
        F.check(r.returncode == 0, f"grafana: a PromQL expression does not parse: {r.stdout}{r.stderr}")


# ------------------------------------------------------------------------------ metric names
def live_metric_names():
    """Metric names a running server exposes (after one request, so that labelled series
    such as cogvlm_http_requests_total exist)."""
    work = dl.tempdir("cogvlm-metrics-")
    srv = dl.Server(work, "metrics")
    try:
        srv.wait_ready(60)
        dl.request(srv.port, "POST", "/v1/chat/completions", {
            "model": dl.MODEL_ID, "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}]})
        _, _, body = dl.request(srv.port, "GET", "/metrics")
        return {re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", l).group(0)
                for l in body.decode().splitlines() if l and not l.startswith("#")}
    except (RuntimeError, OSError) as e:
        F.check(False, f"cannot read a live server's /metrics: {e}")
        return None
    finally:
        srv.signal(signal.SIGTERM)
        srv.wait(20)
        srv.kill()
        shutil.rmtree(work, ignore_errors=True)


def check_metric_names(where, exprs, names):
    if names is None:
        return
    for e in exprs:
        for m in set(re.findall(r"(?<![:\w])cogvlm_[a-zA-Z0-9_]+(?![:\w])", e)):
            F.check(m in names, f"{where}: {m} is not a metric of the server")


# ------------------------------------------------------------------------------ kubernetes
def k8s_docs():
    out = []
    for f in sorted((D / "k8s").glob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                out.append((f.name, doc))
    return out


def check_k8s(metric_names):
    K = D / "k8s"
    kust = yaml.safe_load((K / "kustomization.yaml").read_text())
    listed = set(kust.get("resources", []))
    present = {f.name for f in K.glob("*.yaml")} - {"kustomization.yaml"}
    F.check(listed == present, f"k8s: kustomization resources {sorted(listed)} != files {sorted(present)}")
    kubectl = shutil.which("kubectl")
    if kubectl:
        r = run([kubectl, "kustomize", str(K)])
        F.check(r.returncode == 0, f"kubectl kustomize deploy/k8s: {r.stderr.strip()}")
    validator = shutil.which("kubernetes-validate", path=os.path.dirname(sys.executable)) or \
        shutil.which("kubernetes-validate")
    if F.check(validator, "kubernetes-validate missing (run through test_configs.sh)"):
        files = [str(K / f) for f in sorted(present)]
        for v in ("1.28.0", None):
            r = run([validator, "--strict", "--quiet"] + (["-k", v] if v else []) + files)
            F.check(r.returncode == 0 and "ERROR" not in r.stdout + r.stderr,
                    f"kubernetes-validate {v or 'latest'}: {r.stdout}{r.stderr}")
    docs = {d["kind"]: d for _, d in k8s_docs()}
    for kind in ("Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
                 "ConfigMap"):
        F.check(kind in docs, f"k8s: no {kind}")
    dep = docs.get("Deployment")
    if dep:
        spec = dep["spec"]["template"]["spec"]
        c = spec["containers"][0]
        for probe in ("readinessProbe", "livenessProbe"):
            F.check(c.get(probe, {}).get("httpGet", {}).get("path") == "/health",
                    f"k8s: {probe} is not an HTTP GET of /health")
        F.check(str(c["resources"]["limits"].get("nvidia.com/gpu")) == "1",
                "k8s: no nvidia.com/gpu limit")
        pre = c.get("lifecycle", {}).get("preStop", {})
        cmd = pre.get("exec", {}).get("command", [])
        pre_s = int(cmd[-1]) if cmd and cmd[0].endswith("sleep") else \
            int(pre.get("sleep", {}).get("seconds", 0))
        F.check(pre_s > 0, "k8s: no preStop sleep")
        conf = yaml.safe_load(docs["ConfigMap"]["data"]["cogvlm.conf"].replace(" = ", ": ")) \
            if "ConfigMap" in docs else {}
        drain = int(conf.get("drain_timeout") or conf_default("drain_timeout") or 30)
        grace = spec.get("terminationGracePeriodSeconds", 30)
        F.check(grace > pre_s + drain + 5,
                f"k8s: terminationGracePeriodSeconds {grace} <= preStop {pre_s} + "
                f"drain_timeout {drain} + 5")
        live = c["livenessProbe"]
        F.check(live.get("periodSeconds", 10) * live.get("failureThreshold", 3) > drain,
                "k8s: the liveness probe would restart a draining server")
        F.check(spec.get("securityContext", {}).get("runAsNonRoot") is True,
                "k8s: pod not runAsNonRoot")
        F.check(conf.get("host") == "0.0.0.0", "k8s: the config does not listen on 0.0.0.0")
    hpa = docs.get("HorizontalPodAutoscaler")
    if hpa:
        names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        F.check("cogvlm_requests_waiting" in names, "k8s: HPA not on cogvlm_requests_waiting")
        check_metric_names("k8s HPA", names, metric_names)
        F.check("prometheus-adapter" in (K / "hpa.yaml").read_text(),
                "k8s: hpa.yaml does not document the prometheus-adapter rule")


# ------------------------------------------------------------------------------ docker
def dockerfile(path):
    """[(stage name, base image, [(instruction, args)])] from a Dockerfile."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages, args = [], {}
    known = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
             "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK",
             "SHELL"}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        ins, _, rest = line.partition(" ")
        F.check(ins.upper() in known and ins == ins.upper(),
                f"{path.name}: unknown instruction {ins}")
        if ins == "ARG" and not stages:
            k, _, v = rest.partition("=")
            args[k.strip()] = v.strip()
        if ins == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?$", rest.strip(), re.I)
            image = re.sub(r"\$\{(\w+)\}", lambda mo: args.get(mo.group(1), ""), m.group(1))
            stages.append((m.group(2), image, []))
        elif stages:
            stages[-1][2].append((ins, rest))
        else:
            F.check(ins == "ARG", f"{path.name}: {ins} before FROM")
    return stages


def runtime_packages(stage):
    pk = []
    for ins, rest in stage[2]:
        if ins == "RUN" and "apt-get install" in rest:
            seg = rest.split("apt-get install", 1)[1].split("&&")[0]
            pk += [w for w in seg.split() if not w.startswith("-")]
    return pk


def check_dockerfile(name, base_build, base_run):
    path = D / name
    stages = dockerfile(path)
    if not F.check(len(stages) >= 2, f"{name}: not multi-stage"):
        return None
    names = {s[0] for s in stages if s[0]}
    F.check(re.fullmatch(base_build, stages[0][1]), f"{name}: build stage base {stages[0][1]}")
    final = stages[-1]
    F.check(re.fullmatch(base_run, final[1]), f"{name}: runtime base {final[1]}")
    ins = {}
    for i, rest in final[2]:
        ins.setdefault(i, []).append(rest)
    for _, _, body in stages:
        for i, rest in body:
            m = re.search(r"--from=(\S+)", rest) if i == "COPY" else None
            if m:
                F.check(m.group(1) in names, f"{name}: COPY --from={m.group(1)}: no such stage")
    user = (ins.get("USER") or ["root"])[-1].split(":")[0]
    F.check(user not in ("root", "0"), f"{name}: runs as {user}")
    F.check(any("/health" in h for h in ins.get("HEALTHCHECK", [])), f"{name}: no HEALTHCHECK on /health")
    F.check("8000" in " ".join(ins.get("EXPOSE", [])), f"{name}: does not EXPOSE 8000")
    F.check(any("cogvlm-server" in e for e in ins.get("ENTRYPOINT", [])), f"{name}: no ENTRYPOINT")
    F.check(any("COGVLM_HOST=0.0.0.0" in e for e in ins.get("ENV", [])),
            f"{name}: the server would listen on 127.0.0.1 only")
    F.check(any("share/cogvlm" in c for c in ins.get("COPY", [])),
            f"{name}: does not copy the embedded model (share/cogvlm)")
    F.check(any("make" in r and "install" in r for _, _, b in stages[:-1] for i, r in b if i == "RUN"),
            f"{name}: the build stage does not run make install")
    return runtime_packages(final)


def dpkg_closure(pkgs):
    """pkgs and everything they depend on, by the local dpkg database."""
    seen, todo = set(), list(pkgs)
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        r = run(["dpkg-query", "-W", "-f=${Depends}, ${Pre-Depends}", p])
        for alt in r.stdout.split(","):
            for d in alt.split("|"):
                d = re.sub(r"\(.*?\)|:any|:\w+$", "", d).strip()
                if d:
                    todo.append(d)
    return seen


def check_docker():
    cpu = check_dockerfile("Dockerfile.cpu", r"debian:12", r"debian:12-slim")
    gpu = check_dockerfile("Dockerfile", r"nvidia/cuda:12\.[\d.]+-devel-ubuntu22\.04",
                           r"nvidia/cuda:12\.[\d.]+-runtime-ubuntu22\.04")
    for f in ("Dockerfile.dockerignore", "Dockerfile.cpu.dockerignore"):
        t = (D / f).read_text() if (D / f).exists() else ""
        F.check(re.search(r"^build$", t, re.M), f"deploy/{f}: does not exclude build/")
    if cpu is None or gpu is None:
        return
    # Ubuntu names the same libraries' packages differently in one case
    ubuntu = {"libjpeg62-turbo": "libjpeg-turbo8"}
    F.check(sorted(ubuntu.get(p, p) for p in cpu) == sorted(gpu),
            f"Dockerfile runtime packages {sorted(gpu)} are not Dockerfile.cpu's "
            f"{sorted(cpu)} with Ubuntu names")
    # the product binary (not a sanitizer build the suite may be exercising)
    product = dl.REPO / "build" / "cogvlm-server"
    if not shutil.which("dpkg") or not product.exists():
        return
    closure = dpkg_closure(cpu + ["libc6"])
    r = run(["ldd", str(product)])
    for line in r.stdout.splitlines():
        m = re.search(r"=> (/\S+)", line)
        if not m:
            continue
        lib = os.path.realpath(m.group(1))
        owner = None
        for cand in (lib, re.sub(r"^/usr", "", lib), m.group(1)):
            o = run(["dpkg", "-S", cand])
            if o.returncode == 0:
                owner = o.stdout.split(":")[0].strip()
                break
        F.check(owner is None or owner in closure,
                f"Dockerfile.cpu: {lib} (package {owner}) is not provided by the runtime "
                f"packages {cpu}")


def main():
    dl.install_sigterm_exit(deadline_s=300)
    names = live_metric_names() if dl.SERVER_BIN.exists() else None
    if names is None:
        print("test_configs: no server binary: metric names not checked", file=sys.stderr)
    promtool = find_promtool()
    check_nginx()
    check_prometheus(promtool, names)
    check_grafana(promtool, names)
    check_k8s(names)
    check_docker()
    for f in sorted(D.rglob("*.y*ml")):
        try:
            list(yaml.safe_load_all(f.read_text()))
        except yaml.YAMLError as e:
            F.check(False, f"{f}: YAML: {e}")
    return F.report()


if __name__ == "__main__":
    sys.exit(main())
