"""docker-compose.yml and Dockerfile, structurally (no Docker engine here): services, health
checks, volumes, settings names, and versions consistent with delf-es services (delf_es/services/) / pyproject."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from delf_es.settings import Settings

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def services_script_version() -> str:
    from delf_es.services.config import ES_VERSION

    return ES_VERSION


def test_every_service_is_there_with_a_health_check(compose):
    services = compose["services"]
    assert {"elasticsearch", "kibana", "redis", "worker", "gpu-worker", "beat", "cli"} <= set(services)
    for name, service in services.items():
        check = service.get("healthcheck", {}).get("test")
        assert check and check[0] in ("CMD", "CMD-SHELL"), f"{name} has no health check"


def test_versions_match_the_servers_the_tests_run_against(compose):
    version = services_script_version()
    assert compose["services"]["elasticsearch"]["image"].endswith(f":{version}")
    assert compose["services"]["kibana"]["image"].endswith(f":{version}")
    assert compose["services"]["redis"]["image"].startswith("redis:7")
    es_env = compose["services"]["elasticsearch"]["environment"]
    assert es_env["xpack.security.enabled"] == "false" and es_env["discovery.type"] == "single-node"


def test_environment_variables_are_settings_fields(compose):
    fields = set(Settings.model_fields)
    seen = 0
    for name, service in compose["services"].items():
        for key in service.get("environment", {}):
            if key.startswith("DELF_ES_"):
                assert key[len("DELF_ES_"):].lower() in fields, f"{name}: {key} is not a Settings field"
                seen += 1
    assert seen >= 10
    worker_env = compose["services"]["worker"]["environment"]
    assert worker_env["DELF_ES_ES_URL"] == "http://elasticsearch:9200"
    assert worker_env["DELF_ES_REDIS_URL"].startswith("redis://redis:6379/")


def test_dependencies_wait_for_healthy_services_and_volumes_are_declared(compose):
    services, volumes = compose["services"], set(compose["volumes"])
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services and condition["condition"] == "service_healthy", name
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if not source.startswith(("/", ".", "$")):
                assert source in volumes, f"{name}: volume {source} not declared"
    assert "es-data" in volumes and "redis-data" in volumes


def test_workers_consume_the_queues_and_the_gpu_worker_reserves_a_gpu(compose):
    worker, gpu = compose["services"]["worker"], compose["services"]["gpu-worker"]
    assert worker["command"][:3] == ["worker", "--queues", "extract,index"]
    assert gpu["command"][:3] == ["worker", "--queues", "extract"]
    assert "gpu" in gpu["profiles"] and gpu["environment"]["DELF_ES_DEVICE"] == "cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert "gpu" in device["capabilities"]
    assert "beat" in compose["services"]["beat"]["entrypoint"]


def test_dockerfile_installs_the_pinned_torch_and_ships_the_mappings():
    dockerfile = (ROOT / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    for package, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")):
        pinned = re.search(rf'"{package}==([^"]+)"', pyproject).group(1)
        assert f"ARG {arg}={pinned}" in dockerfile
    assert re.search(r"^FROM python:3\.11", dockerfile, re.M)
    for folder in ("delf_es", "mappings"):
        assert f"COPY {folder} ./{folder}" in dockerfile
    # a regular install: the wheel carries the mappings (tests/unit/test_packaging.py)
    assert re.search(r"^RUN pip install --no-cache-dir \.$", dockerfile, re.M) and "-e ." not in dockerfile
    assert 'ENTRYPOINT ["delf-es"]' in dockerfile


def test_the_api_service_serves_with_a_token_on_loopback_and_shares_the_upload_folder(compose):
    api, worker = compose["services"]["api"], compose["services"]["worker"]
    assert api["command"][:1] == ["serve"] and "--host" in api["command"]
    assert api["environment"]["DELF_ES_API_TOKEN"].startswith("${DELF_ES_API_TOKEN:?")  # no token, no start
    assert all(port.startswith("127.0.0.1:") for port in api["ports"])
    assert "/healthz" in api["healthcheck"]["test"][1]
    upload_dir = api["environment"]["DELF_ES_API_UPLOAD_DIR"]
    mounted = {mount.split(":")[1] for mount in worker["volumes"]}
    assert any(upload_dir.startswith(target + "/") for target in mounted)  # the workers read the staged uploads
