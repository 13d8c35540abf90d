"""The deployment files cannot be exercised here (no container engine): check that they parse
and agree with the package and the config they carry."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml

from singleton.app import load
from singleton.server import parse_listen

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def manifest(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "kubernetes" / name).read_text())
    return loaded


def sidecar() -> dict[str, Any]:
    spec = manifest("deployment.yaml")["spec"]["template"]["spec"]
    [container] = [c for c in spec["initContainers"] if c["name"] == "singleton"]
    return container


def carried_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(manifest("configmap.yaml")["data"]["config.yaml"])
    return path


def test_the_sidecar_is_a_native_sidecar_started_before_the_app() -> None:
    assert sidecar()["restartPolicy"] == "Always"


def test_the_probes_use_the_endpoint_paths_and_port(tmp_path: Path) -> None:
    container = sidecar()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["port"] == "singleton"
    settings = load(carried_config(tmp_path)).settings
    assert settings.server.listen is not None
    host, port = parse_listen(settings.server.listen)
    assert (host, port) == ("0.0.0.0", ports["singleton"])


def test_the_carried_config_is_valid(tmp_path: Path) -> None:
    assert list(load(carried_config(tmp_path)).jobs) == ["invoice-run"]


def test_the_grace_period_outlasts_the_shutdown(tmp_path: Path) -> None:
    settings = load(carried_config(tmp_path)).settings
    grace = manifest("deployment.yaml")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.shutdown_grace + settings.kill_grace


def test_the_replica_id_comes_from_the_pod_name() -> None:
    [env] = [e for e in sidecar()["env"] if e["name"] == "SINGLETON_REPLICA_ID"]
    assert env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_the_scrape_annotations_name_the_metrics_endpoint() -> None:
    annotations = manifest("deployment.yaml")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == sidecar()["ports"][0]["containerPort"]


def test_the_image_runs_the_packaged_command_on_the_mounted_config() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    scripts = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert 'ENTRYPOINT ["singleton"]' in dockerfile and "singleton" in scripts
    mount = sidecar()["volumeMounts"][0]["mountPath"]
    assert f'CMD ["run", "{mount}/config.yaml"]' in dockerfile
    assert sidecar()["args"] == ["run", f"{mount}/config.yaml"]
    assert "USER 10001" in dockerfile
