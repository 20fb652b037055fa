"""The deployment files agree with each other and with the code: the compose stack validates
(`docker compose config`), the worker image, the compose worker and deploy/prefect.yaml name the
same pool, scratch folder and version, and the docker and kubernetes work pools' templates,
rendered the way a Prefect worker renders them, request the GPUs. Deploying prefect.yaml for
real, on a real server, is tests/test_stack.py."""

import json
import shutil
import subprocess
import sys
import zoneinfo
from pathlib import Path

import pytest
import yaml

import moe

ROOT = Path(__file__).resolve().parent.parent
POOLS = ROOT / "deploy" / "work-pools"


def _compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.fixture(scope="module")
def compose() -> dict:
    command = _compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed: the compose file cannot be validated here")
    done = subprocess.run(
        [*command, "-f", "docker/compose.yaml", "--env-file", "docker/.env.example", "config"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())


def test_compose_validates_with_every_service(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "minio", "minio-buckets", "prefect-server", "mlflow", "deploy", "worker"}
    for name in ("postgres", "minio", "prefect-server", "mlflow"):
        assert services[name]["healthcheck"]["test"], name
    assert set(compose["volumes"]) == {"postgres-data", "minio-data", "worker-cache"}  # nothing lost on restart
    mlflow = services["mlflow"]["command"]
    assert "--serve-artifacts" in mlflow and any(c.startswith("--backend-store-uri=postgresql://") for c in mlflow)
    assert any(c.startswith("--artifacts-destination=s3://") for c in mlflow)
    assert any(c.startswith("--allowed-hosts=") and "mlflow:5000" in c for c in mlflow)  # the worker's Host header
    assert "mc mb --ignore-existing" in services["minio-buckets"]["command"][0]


def test_the_worker_runs_what_the_deployments_expect(compose, prefect_yaml):
    worker = compose["services"]["worker"]
    pool = prefect_yaml["definitions"]["work_pool"]["name"]
    assert worker["command"][:2] == ["--pool", pool]
    env = worker["environment"]
    assert env["LORA_MOE_WORK_DIR"] == "/cache" and any(v.endswith(":/cache:rw") for v in worker["volumes"])
    assert env["LORA_MOE_ARTIFACT_ROOT"].startswith("s3://") and env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD"] == "true" and env["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    [gpus] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert gpus["capabilities"] == ["gpu"] and gpus["driver"] == "nvidia"
    deploy = compose["services"]["deploy"]
    assert "prefect --no-prompt deploy --all --prefect-file deploy/prefect.yaml" in deploy["command"][0]
    assert worker["depends_on"]["deploy"]["condition"] == "service_completed_successfully"
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "ENV PYTHONDONTWRITEBYTECODE=1" in dockerfile and "LORA_MOE_WORK_DIR=/cache" in dockerfile
    assert f'CMD ["--pool", "{pool}", "--type", "process"]' in dockerfile
    assert "\nUSER moe\n" in dockerfile and 'ENTRYPOINT ["tini", "--", "prefect", "worker", "start"]' in dockerfile
    base = next(line for line in dockerfile.splitlines() if line.startswith("FROM "))
    assert ":" in base and "latest" not in base  # a pinned CUDA PyTorch base


def test_prefect_yaml(prefect_yaml):
    from prefect.utilities.importtools import import_object

    from flows.pipeline import lora_moe_pipeline

    [pull] = prefect_yaml["pull"]
    assert pull == {"flows.worker_steps.check_installed": {"package_version": moe.__version__}}
    deployments = {d["name"]: d for d in prefect_yaml["deployments"]}
    assert set(deployments) == {"manual", "nightly-retrain", "export-champion"}
    for deployment in (deployments["manual"], deployments["nightly-retrain"]):
        assert import_object(deployment["entrypoint"]) is lora_moe_pipeline  # a module path: no file of this machine
        assert deployment["enforce_parameter_schema"] is True and deployment["concurrency_limit"] == 1
        lora_moe_pipeline.validate_parameters(deployment["parameters"])
    export = deployments["export-champion"]  # its trigger: tests/test_promotion_event.py
    assert import_object(export["entrypoint"]).name == "export-champion" and export["work_pool"]["name"] == pool_name(prefect_yaml)
    [schedule] = deployments["nightly-retrain"]["schedules"]
    assert schedule["cron"] == "0 2 * * *" and zoneinfo.ZoneInfo(schedule["timezone"])
    assert deployments["nightly-retrain"]["parameters"] == {"only_new_data": True} and not deployments["manual"].get("schedules")


def pool_name(prefect_yaml: dict) -> str:
    return prefect_yaml["definitions"]["work_pool"]["name"]


def _render(template: dict, job_variables: dict) -> dict:
    """A base job template filled in as a Prefect worker does (BaseJobConfiguration:
    variable defaults, then the deployment's job variables, then `apply_values`)."""
    import jsonschema
    from prefect.utilities.templating import apply_values
    from prefect.workers.base import BaseJobConfiguration

    jsonschema.validate(job_variables, template["variables"])  # what the server checks for a deployment
    values = BaseJobConfiguration._get_base_config_defaults(template["variables"]["properties"]) | job_variables
    return apply_values(template["job_configuration"], values)


def test_the_docker_pool_requests_the_gpus():
    import docker.types

    template = json.loads((POOLS / "docker.json").read_text())
    rendered = _render(template, {})
    assert rendered["image"] == "wan-lora-moe-worker:0.1.0" and rendered["volumes"] == ["lora-moe-cache:/cache"]
    assert rendered["env"]["LORA_MOE_WORK_DIR"] == "/cache"
    kwargs = rendered["container_create_kwargs"]
    host = docker.types.HostConfig(version="1.44", device_requests=kwargs["device_requests"], shm_size=kwargs["shm_size"])
    assert host["DeviceRequests"] == [{"Driver": "nvidia", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}]
    assert host["ShmSize"] == 16 << 30
    two = _render(
        template,
        {
            "image": "registry.example/wan-lora-moe-worker:0.2.0",
            "container_create_kwargs": {"device_requests": [{"driver": "nvidia", "count": 2, "capabilities": [["gpu"]]}]},
        },
    )
    assert two["image"] == "registry.example/wan-lora-moe-worker:0.2.0"
    assert two["container_create_kwargs"]["device_requests"][0]["count"] == 2


def test_the_kubernetes_pool_adds_a_gpu_limit():
    import jsonschema

    template = json.loads((POOLS / "kubernetes.json").read_text())
    pod = _render(template, {})["job_manifest"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 and container["image"] == "wan-lora-moe-worker:0.1.0"
    assert {"name": "cache", "mountPath": "/cache"} in container["volumeMounts"]
    assert pod["volumes"][0] == {"name": "cache", "persistentVolumeClaim": {"claimName": "lora-moe-cache"}}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    four = _render(template, {"gpus": 4, "image": "registry.example/worker:0.1.0", "env": {"LORA_MOE_GPUS": "4"}})
    [container] = four["job_manifest"]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4 and container["image"] == "registry.example/worker:0.1.0"
    assert four["env"] == {"LORA_MOE_GPUS": "4"}
    with pytest.raises(jsonschema.ValidationError):
        _render(template, {"gpus": -1})


def test_work_pools_script_fails_in_one_line_without_a_server(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PREFECT_API_URL": "http://127.0.0.1:9/api", "PREFECT_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "deploy/work_pools.py", "--pools", "process"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )
    assert done.returncode == 2 and done.stderr.startswith("error: cannot create the work pools: ")
    assert len(done.stderr.strip().splitlines()) == 1
