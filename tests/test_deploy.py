"""The docker compose deployment (deploy/, Dockerfile), checked statically: no Docker engine
runs on the CI machine or here, so nothing is built or started; these tests keep the pieces
consistent with each other and with the metrics the server really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_compose_builds_the_repositorys_cpu_image_and_wires_the_services():
    services = compose()["services"]
    assert set(services) == {"server", "prometheus", "grafana"}
    build = services["server"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile"
    assert re.search(rf"^FROM \S+ AS {build['target']}$", dockerfile(), re.MULTILINE)
    # the API port the image listens on is the one published
    port = re.search(r"MSN_PORT=(\d+)", dockerfile()).group(1)
    assert f"EXPOSE {port}" in dockerfile()
    assert any(p.endswith(f":{port}") for p in services["server"]["ports"])
    # every file or folder mounted from deploy/ exists
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            assert (DEPLOY / source).exists(), volume
    # Prometheus scrapes the server service on that port, at /metrics
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    job = prom["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"server:{port}"]


def test_image_serves_on_all_interfaces_and_checks_readiness():
    text = dockerfile()
    assert "MSN_HOST=0.0.0.0" in text
    assert re.search(r"^CMD \[\"msn\", \"serve\"\]$", text, re.MULTILINE)
    assert "/ready" in re.search(r"^HEALTHCHECK .*(?:\n\s+.*)*", text, re.MULTILINE).group(0)
    assert re.search(r"^USER (?!root)\w+", text, re.MULTILINE)  # not root at run time
    # the install is the Makefile's (what CI runs); the models are prepared at build time
    assert "make install" in text and "models prepare --model all" in text
    assert re.search(r"^install:", (ROOT / "Makefile").read_text(), re.MULTILINE)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def exported_series() -> set[str]:
    """Every series name /metrics can show: the app's registry, with the TR-Jacobi worker's
    counters filled in (they appear once the vLLM engine's worker has reported)."""
    from server.metrics import Metrics

    metrics = Metrics()
    metrics.trjacobi.update({
        "tree_steps": 1, "compactions": 1, "verified_drafts": 1, "accepted_tokens": 1,
        "undrafted_steps": 1, "proposals": 1, "feedback_proposals": 1, "shadow_outcomes": 1,
        "idle_steps": 1, "corpus": {"tokens": 1, "docs": 1, "lookups": 1, "drafts": 1},
        "rungs": {"none": 1}, "probes": 1, "draft_seconds": 0.1,
        "propose_seconds": {"plan": 0.1},
        "paths": {"plain": {"steps": 1, "tokens": 1, "seconds": 0.1}}})
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                "gauge": [""]}
    return {family.name + suffix for family in metrics.registry.collect()
            for suffix in suffixes[family.type]}


def test_dashboard_queries_only_series_the_server_exports():
    dashboard = json.loads((DEPLOY / "grafana/dashboards/msn-serve.json").read_text())
    series = exported_series()
    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    used = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\bmsn_[a-z0-9_]+", target["expr"]))
            assert names, target["expr"]
            assert names <= series, (panel["title"], names - series)
            used |= names
    # the panels cover the serving, speculation and TR-Jacobi families
    for prefix in ("msn_http_", "msn_time_to_first_token", "msn_spec_decode_",
                   "msn_trjacobi_rung", "msn_trjacobi_corpus", "msn_trjacobi_proposer"):
        assert any(n.startswith(prefix) for n in used), prefix
    # Grafana loads it from where the compose file mounts the dashboards
    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/msn-serve.yml").read_text())
    mount = next(v for v in compose()["services"]["grafana"]["volumes"]
                 if v.startswith("./grafana/dashboards"))
    assert provider["providers"][0]["options"]["path"] == mount.split(":")[1]
