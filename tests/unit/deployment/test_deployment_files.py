"""The shipped Docker, Compose, Kubernetes and nginx files: validated offline, since no
container engine or cluster runs on a test machine. Nothing is built or started here.

- docker-compose.yml: ``docker-compose config`` of Debian's docker-compose package (1.29),
  which parses and validates the file against the Compose schema without a Docker engine.
- kubernetes/*.yaml: kubernetes-validate with strict schemas of Kubernetes KUBERNETES_VERSION.
- kubernetes/vpa.yaml: the VerticalPodAutoscaler is a custom resource that Kubernetes'
  schemas do not contain, so it is validated against kubernetes/schemas/, a JSON Schema of
  the VPA v1 CRD's fields.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from kubernetes_validate.utils import ValidationError as KubernetesValidationError
from kubernetes_validate.utils import validate as validate_kubernetes

from app.core.config import Settings
from app.deployment.nginx import render

REPO_ROOT = Path(__file__).resolve().parents[3]
KUBERNETES_DIR = REPO_ROOT / "kubernetes"
KUBERNETES_VERSION = "1.31.0"
MANIFESTS = ("namespace", "configmap", "secrets", "deployment", "service", "ingress", "hpa", "vpa", "pdb")


def load_documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        pytest.fail("docker-compose is not installed; run scripts/install_test_tools.sh")
    return found


def compose_config(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            docker_compose(),
            "--project-directory",
            str(folder),
            "-f",
            str(folder / "docker-compose.yml"),
            "config",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def compose_folder(tmp_path: Path) -> Path:
    shutil.copy(REPO_ROOT / "docker-compose.yml", tmp_path / "docker-compose.yml")
    shutil.copy(REPO_ROOT / ".env.example", tmp_path / ".env")
    return tmp_path


def test_compose_file_validates(compose_folder: Path) -> None:
    result = compose_config(compose_folder)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert set(resolved["services"]) >= {"app", "worker", "db", "redis", "vector_db", "nginx"}


def test_compose_validator_rejects_bad_file(compose_folder: Path) -> None:
    text = (compose_folder / "docker-compose.yml").read_text()
    (compose_folder / "docker-compose.yml").write_text(
        text.replace("    restart: unless-stopped\n", "    restart_policy_typo: 1\n", 1)
    )
    result = compose_config(compose_folder)
    assert result.returncode != 0
    assert "restart_policy_typo" in result.stderr


def test_compose_services_match_the_deployment_contract() -> None:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    services = compose["services"]

    assert services["db"]["image"] == "postgres:15"
    assert services["redis"]["image"] == "redis:7"
    assert services["vector_db"]["image"].startswith("chromadb/chroma:")
    assert services["app"]["ports"] == ["8000-8002:8000"]
    for name in ("app", "worker"):
        service = services[name]
        assert service["deploy"]["resources"]["limits"] == {"cpus": "2", "memory": "4G"}, name
        assert service["environment"]["TORONTO_AI_ENV"] == "production", name
        # The worker runs the API's image with its own command.
        assert service["image"] == services["app"]["image"], name
    assert services["worker"]["command"] == ["python", "-m", "app.worker.start"]
    assert services["worker"]["depends_on"]["app"] == {"condition": "service_healthy"}
    for name in ("app", "db", "redis", "vector_db"):
        assert "test" in services[name]["healthcheck"], name
    assert services["nginx"]["profiles"] == ["nginx"]

    named_volumes = set(compose["volumes"])
    mounted = {volume.split(":")[0] for service in services.values() for volume in service.get("volumes", [])}
    assert named_volumes <= mounted


def test_compose_and_env_example_hold_no_password() -> None:
    for name in ("docker-compose.yml", ".env.example"):
        for line in (REPO_ROOT / name).read_text().splitlines():
            if line.lstrip().startswith("#"):
                continue
            match = re.match(r"\s*([A-Z_]*(PASSWORD|API_KEY|SECRET)[A-Z_]*)\s*[:=]\s*(\S*)", line)
            if match:
                assert match.group(1).endswith("_FILE"), f"{name}: {line.strip()}"


@pytest.mark.parametrize("name", MANIFESTS)
def test_kubernetes_manifest_validates(name: str) -> None:
    documents = load_documents(KUBERNETES_DIR / f"{name}.yaml")
    assert documents
    for document in documents:
        assert document["metadata"].get("namespace", "toronto-ai") == "toronto-ai"
        if document["kind"] == "VerticalPodAutoscaler":
            schema = json.loads(
                (KUBERNETES_DIR / "schemas" / "verticalpodautoscaler-v1.schema.json").read_text()
            )
            jsonschema.Draft202012Validator(schema).validate(document)
        else:
            validate_kubernetes(document, KUBERNETES_VERSION, strict=True)


def test_kubernetes_validator_rejects_unknown_field() -> None:
    deployment = load_documents(KUBERNETES_DIR / "deployment.yaml")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(KubernetesValidationError):
        validate_kubernetes(deployment, KUBERNETES_VERSION, strict=True)


def test_vpa_schema_rejects_unknown_mode() -> None:
    vpa = load_documents(KUBERNETES_DIR / "vpa.yaml")[0]
    vpa["spec"]["updatePolicy"]["updateMode"] = "Automatic"
    schema = json.loads((KUBERNETES_DIR / "schemas" / "verticalpodautoscaler-v1.schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(vpa)


def test_kubernetes_scaling_settings() -> None:
    hpa = load_documents(KUBERNETES_DIR / "hpa.yaml")[0]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "toronto-ai-team-agent"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 10)
    targets = {metric["resource"]["name"]: metric["resource"]["target"] for metric in hpa["spec"]["metrics"]}
    assert targets == {
        "cpu": {"type": "Utilization", "averageUtilization": 70},
        "memory": {"type": "Utilization", "averageUtilization": 80},
    }

    vpa = load_documents(KUBERNETES_DIR / "vpa.yaml")[0]
    assert vpa["spec"]["updatePolicy"]["updateMode"] == "Auto"
    policy = vpa["spec"]["resourcePolicy"]["containerPolicies"][0]
    assert policy["minAllowed"] == {"cpu": "500m", "memory": "1Gi"}
    assert policy["maxAllowed"] == {"cpu": "4", "memory": "8Gi"}

    budgets = load_documents(KUBERNETES_DIR / "pdb.yaml")
    assert {budget["kind"] for budget in budgets} == {"PodDisruptionBudget"}


def test_kubernetes_deployments_probe_and_drain() -> None:
    config = load_documents(KUBERNETES_DIR / "configmap.yaml")[0]["data"]
    lease_seconds = float(config["TORONTO_AI_WORKER__LEASE_SECONDS"])
    grace_seconds = float(config["TORONTO_AI_WORKER__SHUTDOWN_GRACE_SECONDS"])
    api, worker = load_documents(KUBERNETES_DIR / "deployment.yaml")

    assert api["metadata"]["name"] == "toronto-ai-team-agent"
    container = api["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["resources"]["requests"] and container["resources"]["limits"]

    worker_spec = worker["spec"]["template"]["spec"]
    assert worker_spec["containers"][0]["command"] == ["python", "-m", "app.worker.start"]
    assert worker_spec["containers"][0]["image"] == container["image"]
    assert worker_spec["terminationGracePeriodSeconds"] > max(lease_seconds, grace_seconds)
    assert worker_spec["containers"][0]["resources"]["limits"]


def dockerfile_stages(text: str) -> list[list[tuple[str, str]]]:
    """Split a Dockerfile into stages of (instruction, arguments), joining continued lines."""
    joined = re.sub(r"\\\n", " ", text)
    stages: list[list[tuple[str, str]]] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), arguments))
    return stages


def test_dockerfile_runtime_stage() -> None:
    stages = dockerfile_stages((REPO_ROOT / "Dockerfile").read_text())
    assert len(stages) >= 2, "multi-stage build"
    runtime = stages[-1]
    instructions = [instruction for instruction, _ in runtime]
    runs = " ".join(arguments for instruction, arguments in runtime if instruction == "RUN")

    assert not re.search(r"build-essential|gcc|g\+\+|clang", runs), "no compiler in the final image"
    user = [arguments for instruction, arguments in runtime if instruction == "USER"]
    assert user and not user[-1].startswith(("root", "0")), "non-root user"
    assert "HEALTHCHECK" in instructions
    assert any(instruction == "COPY" and "--from=build" in arguments for instruction, arguments in runtime)
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests", ".env", "secrets"} <= set(ignored)


def test_nginx_file_for_compose_is_current() -> None:
    expected = render(
        ["app:8000"], listen="80", max_body_bytes=Settings().api.max_body_bytes, runtime_dir=None
    )
    assert (REPO_ROOT / "deploy" / "nginx" / "nginx.conf").read_text() == expected, (
        "deploy/nginx/nginx.conf is stale; run python -m app.deployment.nginx --backends app:8000 "
        "--port 80 --container --output deploy/nginx/nginx.conf"
    )


def test_nginx_configuration_passes_nginx_test(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    text = render(
        ["127.0.0.1:18011", "127.0.0.1:18012"],
        listen="127.0.0.1:18010",
        max_body_bytes=2048,
        runtime_dir=tmp_path,
    )
    (tmp_path / "temp").mkdir()
    (tmp_path / "nginx.conf").write_text(text)
    assert "client_max_body_size 2048;" in text
    assert "least_conn;" in text
    result = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
