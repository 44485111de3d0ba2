"""The team stack's files, offline: compose.yaml against the compose spec, the Kubernetes
base job template's placeholders and variables, prefect.yaml against what is installed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
INFRA = REPO_ROOT / "infra"

pytestmark = pytest.mark.timeout(120)


def test_compose_file_is_valid_compose_spec():
    checker = Path(sys.executable).parent / "check-jsonschema"
    done = subprocess.run([str(checker), "--builtin-schema", "vendor.compose-spec", str(INFRA / "compose.yaml")],
                          capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_has_every_service_and_no_secret_in_it():
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "create-bucket", "mlflow", "prefect-server", "prefect-worker",
            "dask-scheduler", "dask-worker"} <= set(services)
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["mlflow"]
    assert services["create-bucket"]["restart"] == "no"
    mlflow = " ".join(services["mlflow"]["command"])
    for flag in ("--artifacts-destination", "--serve-artifacts", "--workers"):
        assert flag in mlflow
    # the database URI holds the password: MLflow reads it from its environment, never argv (`ps`)
    assert "--backend-store-uri" not in mlflow and "BACKEND_STORE_URI" not in mlflow
    assert "${POSTGRES_PASSWORD}" in services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    for name, service in services.items():
        command = json.dumps(service.get("command", "")) + json.dumps(service.get("entrypoint", ""))
        assert "PASSWORD" not in command and "S3_SECRET" not in command, name
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_MIGRATE_ON_START"] == "true"
    assert services["prefect-worker"]["build"]["dockerfile"] == "infra/Dockerfile"
    assert services["dask-scheduler"]["command"][:2] == ["dask", "scheduler"]
    assert services["dask-worker"]["command"][:2] == ["dask", "worker"]
    # every secret is a required variable of infra/.env, and .env.example names them all
    text = (INFRA / "compose.yaml").read_text()
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    example = {line.split("=", 1)[0] for line in (INFRA / ".env.example").read_text().splitlines()
               if line and not line.startswith("#")}
    assert used <= example, used - example
    for secret in ("POSTGRES_PASSWORD", "S3_SECRET_KEY"):
        assert f"${{{secret}:?" in text
    for port in re.findall(r'"([\d.]*):\$\{[A-Z_]+:-\d+\}:\d+"', text):
        assert port == "127.0.0.1"  # published on the loopback only


def test_dockerfile_installs_torch_first_with_a_cuda_build_arg():
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert "ARG TORCH_VERSION=2.13.0" in dockerfile and "ARG TORCH_INDEX_URL=" in dockerfile
    assert dockerfile.index('"torch==${TORCH_VERSION}"') < dockerfile.index("pip install -e .")


def test_kubernetes_job_template_placeholders_match_its_variables():
    """No Kubernetes schema ships offline with check-jsonschema: instead the variables must be
    a valid JSON Schema, every placeholder a declared variable, and Prefect's own templating
    must render a Job whose container requests the GPUs asked for."""
    from jsonschema import Draft7Validator
    from prefect.utilities.templating import apply_values, find_placeholders

    template = json.loads((INFRA / "k8s" / "base-job-template.json").read_text())
    variables = template["variables"]
    Draft7Validator.check_schema(variables)
    declared = set(variables["properties"])
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    assert used <= declared, used - declared
    assert variables["properties"]["gpu_count"] == {**variables["properties"]["gpu_count"], "type": "integer",
                                                    "default": 0}

    values = {k: v["default"] for k, v in variables["properties"].items() if "default" in v}
    rendered = apply_values(template["job_configuration"], {**values, "gpu_count": 2, "name": "run"})
    job = rendered["job_manifest"]
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert job["spec"]["completions"] == 1 and job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 2}
    assert container["image"] == variables["properties"]["image"]["default"]
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_prefect_yaml_names_installed_prefect_and_installs_like_make_setup():
    import prefect

    config = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    assert config["prefect-version"] == prefect.__version__
    torch_version = re.search(r"^TORCH_VERSION \?= (\S+)", (REPO_ROOT / "Makefile").read_text(), re.M).group(1)
    script = config["pull"][1]["prefect.deployments.steps.run_shell_script"]["script"].splitlines()
    assert script == [f"python -m pip install -q torch=={torch_version}", "python -m pip install -q -e ."]
