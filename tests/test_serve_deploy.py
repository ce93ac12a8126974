"""deploy/kubernetes.yaml agrees with the server: the container's command line parses with
`kvtrace serve`'s own options, the probes, scrape annotations and Service point at the port it
listens on and at routes it serves, and the pod's grace period outlasts the server's --grace.
Then the manifest's command line (artifact, host and port swapped for local ones) runs, and the
probe and scrape paths answer."""
from __future__ import annotations

from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml (the 'test' extra) is not installed")
pytest.importorskip("starlette", reason="the 'serve' extra is not installed")

from tests import serve_util as su  # noqa: E402
from tests.runtime_toy import build_toy  # noqa: E402

MANIFEST = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes.yaml"


def _docs():
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    return {d["kind"]: d for d in docs}


def test_manifest_matches_the_server(tmp_path):
    from kvtrace.cli import parser
    from kvtrace.runtime.serve import ServerState, build_app

    docs = _docs()
    dep, svc = docs["Deployment"], docs["Service"]
    pod = dep["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    assert c["command"][:2] == ["kvtrace", "serve"]
    ap, _ = parser("serve")
    args = ap.parse_args(c["command"][1:])  # exits (SystemExit) on an option `kvtrace serve` lacks
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == args.port and args.host == "0.0.0.0"
    routes = {r.path for r in build_app(ServerState(args)).routes}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] in routes and get["path"] == "/health"
        assert ports.get(get["port"], get["port"]) == args.port
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] in routes
    assert int(ann["prometheus.io/port"]) == args.port
    pre = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > args.grace + pre
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] in ports


def test_manifest_command_runs_and_probes_answer(tmp_path):
    (c,) = _docs()["Deployment"]["spec"]["template"]["spec"]["containers"]
    cmd = list(c["command"][2:])
    cmd[0] = str(build_toy(tmp_path / "artifact"))  # the /models/artifact volume
    cmd[cmd.index("--host") + 1] = "127.0.0.1"
    i = cmd.index("--port")
    del cmd[i:i + 2]  # serve_util.Server listens on a free port
    with su.Server(Path(cmd[0]), *cmd[1:]) as s:
        ann = _docs()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
        assert s.request("GET", c["readinessProbe"]["httpGet"]["path"])[0] == 200
        st, h, body = s.request("GET", ann["prometheus.io/path"])
        assert st == 200 and h["content-type"].startswith("text/plain") and b"kvtrace_active_slots" in body
        rc, err = s.stop()
        assert rc == 0, err
