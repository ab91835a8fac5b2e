"""The Helm chart (deploy/helm/minigemini), offline: rendered by Helm's own Go library (helm-python-sdk, no cluster),
linted, every manifest validated with kubernetes-validate --strict against Kubernetes 1.29 (the chart's oldest) and
1.37, and the rendered YAML checked for what production needs (probes, drain, resources, secrets, selectors, network
policy). Scenarios: the defaults and the values files in deploy/examples (tiny CPU, 7B on one GPU, 34B with TP=4,
KEDA on top of 7B)."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python as helm  # helm-python-sdk (dev extra)
import kubernetes_validate as kv
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "minigemini"
EXAMPLES = ROOT / "deploy" / "examples"
NS = "ai"
RELEASE = "mgm"
KUBE_VERSIONS = ("1.29.0", "1.37.0")
CRD_KINDS = {"ScaledObject", "ServiceMonitor"}  # no schema ships with kubernetes-validate: checked field by field


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``helm -f a.yaml -f b.yaml``: later files win, maps merge, lists replace."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _values(*files: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for f in files:
        merged = _merge(merged, yaml.safe_load((EXAMPLES / f).read_text()))
    return merged


SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "tiny-cpu": _values("tiny-cpu.yaml"),
    "7b": _values("mgm-7b.yaml"),
    "34b-tp4": _values("mgm-34b-tp4.yaml"),
    "7b-keda": _values("mgm-7b.yaml", "keda.yaml"),
}


class Rendered:
    def __init__(self, files: dict[str, str]) -> None:
        self.files = files
        self.notes = next((v for k, v in files.items() if k.endswith("NOTES.txt")), "")
        self.docs = [d for k, v in sorted(files.items()) if not k.endswith("NOTES.txt")
                     for d in yaml.safe_load_all(v) if d]

    def kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, component: str) -> dict[str, Any]:
        (doc,) = [d for d in self.kind(kind) if d["metadata"]["labels"]["app.kubernetes.io/component"] == component]
        return doc


def render(values: dict[str, Any]) -> Rendered:
    with helm.Chart.load(str(CHART)) as chart:
        return Rendered(chart.render(values, name=RELEASE, namespace=NS, is_install=True))


@pytest.fixture(scope="module")
def rendered() -> dict[str, Rendered]:
    return {name: render(values) for name, values in SCENARIOS.items()}


def _container(deploy: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = deploy["spec"]["template"]["spec"]["containers"]
    return containers[0] if name is None else next(c for c in containers if c["name"] == name)


def _pod_specs(r: Rendered) -> list[dict[str, Any]]:
    specs = [d["spec"]["template"]["spec"] for d in r.kind("Deployment") + r.kind("Job")]
    return specs + [d["spec"] for d in r.kind("Pod")]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _selected(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- the chart as Helm sees it ---------------------------------------------------------------------------------------


def test_chart_lints_clean() -> None:
    report = helm.lint(str(CHART), strict=True, kube_version="v1.35.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report["messages"]


def test_versions_are_pinned_to_the_project() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert chart["appVersion"] == project == values["image"]["tag"]
    for name, vals in SCENARIOS.items():
        tag = _merge(values, vals)["image"]["tag"]
        assert tag.startswith(project) and tag != "latest", name


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_manifest_is_valid_kubernetes(rendered: dict[str, Rendered], scenario: str) -> None:
    r = rendered[scenario]
    assert r.docs
    for doc in r.docs:
        if doc["kind"] in CRD_KINDS:
            continue
        for version in KUBE_VERSIONS:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} invalid for {version}: "
                            f"{'.'.join(map(str, exc.path))}: {exc.message}")


def test_strict_validation_catches_a_typo(rendered: dict[str, Rendered]) -> None:
    """The validator is not a rubber stamp: one misspelt field in a rendered Deployment fails it."""
    deploy = copy.deepcopy(rendered["default"].get("Deployment", "engine"))
    _container(deploy)["readinesProbe"] = _container(deploy).pop("readinessProbe")
    with pytest.raises(kv.ValidationError):
        kv.validate(deploy, KUBE_VERSIONS[-1], strict=True)


def test_kubernetes_validate_cli_strict(tmp_path: Path, rendered: dict[str, Rendered]) -> None:
    """The command-line tool the README mentions, on the 34B render (CRD-free), exits 0."""
    out = tmp_path / "34b.yaml"
    out.write_text(yaml.safe_dump_all(rendered["34b-tp4"].docs))
    proc = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBE_VERSIONS[-1],
                           "--quiet", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- labels, selectors, names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_selectors_match_their_pods(rendered: dict[str, Rendered], scenario: str) -> None:
    r = rendered[scenario]
    deployments = {d["metadata"]["name"]: d for d in r.kind("Deployment")}
    pod_labels = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deployments.items()}
    for name, d in deployments.items():
        assert _selected(d["spec"]["selector"]["matchLabels"], pod_labels[name]), name
    for doc in r.docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE and labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/name"] == "minigemini" and "helm.sh/chart" in labels
    for svc in r.kind("Service"):  # each Service selects exactly the pods of its own component
        hits = [n for n, labels in pod_labels.items() if _selected(svc["spec"]["selector"], labels)]
        assert hits == [svc["metadata"]["name"]], (svc["metadata"]["name"], hits)
        port = svc["spec"]["ports"][0]  # a named container port (http; redis for the image store)
        assert port["targetPort"] == port["name"] and port["name"] in ("http", "redis")
        assert any(p["name"] == port["name"] for p in _container(deployments[hits[0]])["ports"])
    for pdb in r.kind("PodDisruptionBudget"):
        hits = [n for n, labels in pod_labels.items() if _selected(pdb["spec"]["selector"]["matchLabels"], labels)]
        assert hits == [pdb["metadata"]["name"]]
    for np in r.kind("NetworkPolicy"):
        selector = np["spec"]["podSelector"]["matchLabels"]
        component = selector["app.kubernetes.io/component"]
        if component != "model-download":
            assert [n for n, lab in pod_labels.items() if _selected(selector, lab)] == [np["metadata"]["name"]]
    for scaler in r.kind("HorizontalPodAutoscaler") + r.kind("ScaledObject"):
        target = scaler["spec"]["scaleTargetRef"]
        assert target["name"] in deployments and target.get("kind", "Deployment") == "Deployment"
        assert "replicas" not in deployments[target["name"]]["spec"]  # the autoscaler owns the count


# --- probes, drain ---------------------------------------------------------------------------------------------------

#: The flag through which each role gets its drainSeconds.
DRAIN_FLAGS = {"gateway": "--drain-timeout", "engine": "--shutdown-timeout", "sdxl-worker": "--shutdown-timeout"}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_probes_and_drain(rendered: dict[str, Rendered], scenario: str) -> None:
    r = rendered[scenario]
    expected_ready = {"gateway": "/ready", "engine": "/health", "sdxl-worker": "/ready"}
    for d in r.kind("Deployment"):
        component = d["metadata"]["labels"]["app.kubernetes.io/component"]
        c = _container(d)
        startup, ready, live = c["startupProbe"], c["readinessProbe"], c["livenessProbe"]
        if component == "image-store":  # Redis: ready when it answers PING; nothing to drain (no persistence)
            assert ready["exec"]["command"] == ["redis-cli", "ping"] and live["tcpSocket"]["port"] == "redis"
            continue
        assert ready["httpGet"]["path"] == expected_ready[component]
        assert live["httpGet"]["path"] == "/health"
        assert all(p["httpGet"]["port"] == "http" for p in (startup, ready, live))
        # readiness reacts fast; liveness is the patient one (a busy pod leaves rotation long before it is killed)
        assert (ready["periodSeconds"] * ready["failureThreshold"]) < (live["periodSeconds"] * live["failureThreshold"])
        if component == "engine":  # model load: at least 20 minutes before the kubelet gives up
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 1200
        pod = d["spec"]["template"]["spec"]
        sleep = c["lifecycle"]["preStop"]["exec"]["command"]
        assert sleep[0] == "sleep" and int(sleep[1]) > 0
        drain_s = float(c["args"][c["args"].index(DRAIN_FLAGS[component]) + 1])
        assert pod["terminationGracePeriodSeconds"] > int(sleep[1]) + drain_s, component


def test_drain_seconds_drive_each_role() -> None:
    """`<role>.drainSeconds` reaches the process that drains (vLLM's --shutdown-timeout for the engines)."""
    values = {key: {"drainSeconds": 7} for key in ("gateway", "engine", "sdxlWorker")}
    values["sdxlWorker"]["enabled"] = True
    values["imageStore"] = {"redis": {"enabled": True}}  # images behind several gateways need a shared store
    r = render(values)
    for component, flag in DRAIN_FLAGS.items():
        args = _container(r.get("Deployment", component))["args"]
        assert args[args.index(flag) + 1] == "7", component


def test_34b_engine_gets_a_longer_startup(rendered: dict[str, Rendered]) -> None:
    probe = _container(rendered["34b-tp4"].get("Deployment", "engine"))["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] == 3600


# --- resources, GPUs, volumes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("scenario", "gpus"), [("default", 1), ("7b", 1), ("34b-tp4", 4), ("tiny-cpu", 0)])
def test_engine_resources(rendered: dict[str, Rendered], scenario: str, gpus: int) -> None:
    d = rendered[scenario].get("Deployment", "engine")
    pod, c = d["spec"]["template"]["spec"], _container(d)
    limits = c["resources"]["limits"]
    args = c["args"]
    if gpus:
        assert limits["nvidia.com/gpu"] == gpus
        assert args[args.index("--tensor-parallel-size") + 1] == str(gpus)
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert _env(c)["MGM_ENGINE_DEVICE"] == "gpu"
    else:
        assert "nvidia.com/gpu" not in limits and "--tensor-parallel-size" not in args
        assert _env(c)["MGM_ENGINE_DEVICE"] == "cpu" and _env(c)["MGM_KV_CACHE_GIB"] == "1"
    assert c["resources"]["requests"]["memory"] and limits["memory"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert _env(c)["HF_HOME"] == "/models/huggingface" and _env(c)["HF_HUB_OFFLINE"] == "1"
    if scenario == "tiny-cpu":
        assert volumes["models"] == {"name": "models", "emptyDir": {}}
    else:
        claim = volumes["models"]["persistentVolumeClaim"]["claimName"]
        (pvc,) = rendered[scenario].kind("PersistentVolumeClaim")
        assert pvc["metadata"]["name"] == claim
        assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_gpu_scheduling_details(rendered: dict[str, Rendered]) -> None:
    pod = rendered["7b"].get("Deployment", "engine")["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"
    sdxl = rendered["7b"].get("Deployment", "sdxl-worker")
    assert _container(sdxl)["resources"]["limits"]["nvidia.com/gpu"] == 1
    big = rendered["34b-tp4"]
    assert big.get("Deployment", "engine")["spec"]["replicas"] == 2
    (pvc,) = big.kind("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["storageClassName"] == "nfs-client"
    shm = {v["name"]: v for v in big.get("Deployment", "engine")["spec"]["template"]["spec"]["volumes"]}["dshm"]
    assert shm["emptyDir"]["sizeLimit"] == "32Gi"
    # GPU pods are replaced without a surge pod that would wait for a free GPU
    strategy = big.get("Deployment", "engine")["spec"]["strategy"]
    assert strategy["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_gateway_autoscales_on_cpu(rendered: dict[str, Rendered]) -> None:
    r = rendered["default"]
    hpa = r.get("HorizontalPodAutoscaler", "gateway")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["averageUtilization"] == 70
    assert _container(r.get("Deployment", "gateway"))["resources"]["requests"]["cpu"]
    tiny = rendered["tiny-cpu"]
    assert not tiny.kind("HorizontalPodAutoscaler") and tiny.get("Deployment", "gateway")["spec"]["replicas"] == 1


# --- security ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_security_contexts(rendered: dict[str, Rendered], scenario: str) -> None:
    r = rendered[scenario]
    for pod in _pod_specs(r):
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
            assert sc["allowPrivilegeEscalation"] is False and sc["runAsNonRoot"] is True
            image = c["image"]
            assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+(-cpu)?", image), image  # pinned tag, never latest
    assert _container(r.get("Deployment", "gateway"))["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("scenario", ["default", "7b", "34b-tp4"])
def test_api_keys_only_from_an_existing_secret(rendered: dict[str, Rendered], scenario: str) -> None:
    r = rendered[scenario]
    gateway = _container(r.get("Deployment", "gateway"))
    secret = SCENARIOS[scenario].get("apiKeys", {}).get("existingSecret")
    assert not r.kind("Secret")  # the chart never creates (or inlines) keys
    test_pod = r.kind("Pod")[0]["spec"]["containers"][0]
    for c in (gateway, test_pod):
        if secret:
            assert _env(c)["MGM_API_KEYS"] == {"secretKeyRef": {"name": secret, "key": "api-keys"}}
        else:
            assert "MGM_API_KEYS" not in _env(c)
    if secret:
        assert "WARNING: no API keys" not in r.notes
    else:
        assert "WARNING: no API keys" in r.notes
    assert "--api-key" not in gateway["args"]


def test_engines_and_workers_cannot_reach_out(rendered: dict[str, Rendered]) -> None:
    r = rendered["7b"]
    for component in ("engine", "sdxl-worker"):
        np = r.get("NetworkPolicy", component)
        assert np["spec"]["policyTypes"] == ["Ingress", "Egress"] and np["spec"]["egress"] == []
        (rule,) = np["spec"]["ingress"]
        sources = [p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")
                   for p in rule["from"]]
        assert sources[0] == "gateway" and rule["from"][1]["namespaceSelector"]  # + the monitoring namespace
    gw = r.get("NetworkPolicy", "gateway")["spec"]["egress"]
    public = [p["ipBlock"] for rule in gw for p in rule["to"] if "ipBlock" in p]
    assert public == [{"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                                       "100.64.0.0/10", "169.254.0.0/16", "127.0.0.0/8"]}]
    # the download Job is the only pod with internet egress, and only to public addresses on 443
    dl = r.get("NetworkPolicy", "model-download")["spec"]
    assert dl["ingress"] == [] and dl["egress"][1]["ports"] == [{"port": 443, "protocol": "TCP"}]


def test_gateways_share_the_image_store(rendered: dict[str, Rendered]) -> None:
    from server.store import check_store_url

    r = rendered["7b"]  # HPA (2+ gateways) with image generation: the in-chart Redis
    url = _env(_container(r.get("Deployment", "gateway")))["MGM_IMAGE_STORE"]
    assert url == f"redis://mgm-minigemini-image-store.{NS}.svc.cluster.local:6379/0" and check_store_url(url)
    redis = _container(r.get("Deployment", "image-store"))
    assert redis["args"][:4] == ["--save", "", "--appendonly", "no"] and "volatile-lru" in redis["args"]
    assert r.get("Service", "image-store")["spec"]["ports"][0]["port"] == 6379
    egress = r.get("NetworkPolicy", "gateway")["spec"]["egress"]
    assert any(p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "image-store"
               for rule in egress for p in rule["to"])
    store_np = r.get("NetworkPolicy", "image-store")["spec"]
    assert store_np["egress"] == [] and store_np["ingress"][0]["from"][0]["podSelector"]["matchLabels"][
        "app.kubernetes.io/component"] == "gateway"
    tiny = rendered["tiny-cpu"]  # one gateway: memory is enough, no Redis
    assert _env(_container(tiny.get("Deployment", "gateway")))["MGM_IMAGE_STORE"] == "memory://"
    assert not [d for d in tiny.kind("Deployment") if d["metadata"]["labels"]["app.kubernetes.io/component"]
                == "image-store"]
    secret = render({**SCENARIOS["7b"], "imageStore": {"existingSecret": "store", "redis": {"enabled": False}}})
    assert _env(_container(secret.get("Deployment", "gateway")))["MGM_IMAGE_STORE"] == {
        "secretKeyRef": {"name": "store", "key": "url"}}
    shared = render({**SCENARIOS["7b"], "imageStore": {"url": "file:///images", "existingClaim": "rwx"}})
    gateway = shared.get("Deployment", "gateway")["spec"]["template"]["spec"]
    assert {"name": "image-store", "mountPath": "/images"} in _container(shared.get("Deployment", "gateway"))[
        "volumeMounts"]
    assert {"name": "image-store", "persistentVolumeClaim": {"claimName": "rwx"}} in gateway["volumes"]


# --- what each role is told --------------------------------------------------------------------------------------------


def test_gateway_finds_pods_through_headless_services(rendered: dict[str, Rendered]) -> None:
    from server.cli import build_parser

    r = rendered["7b"]
    args = build_parser().parse_args(_container(r.get("Deployment", "gateway"))["args"])
    engine_svc, sdxl_svc = r.get("Service", "engine"), r.get("Service", "sdxl-worker")
    assert engine_svc["spec"]["clusterIP"] == "None" and sdxl_svc["spec"]["clusterIP"] == "None"
    assert engine_svc["spec"]["publishNotReadyAddresses"] is False  # only ready pods are in DNS
    assert args.engine == [f"http://mgm-minigemini-engine.{NS}.svc.cluster.local:8000"]
    assert args.sdxl_worker == [f"http://mgm-minigemini-sdxl-worker.{NS}.svc.cluster.local:8100"]
    assert args.discover_interval == 5 and args.host == "0.0.0.0" and args.port == 8000
    assert args.image_model_name == "sdxl"
    assert r.get("Service", "gateway")["spec"].get("clusterIP") != "None"  # clients get one virtual IP


def test_gateway_max_edit_images_follows_the_engines() -> None:
    from server.cli import build_parser
    from server.gateway.config import GatewayConfig

    def parsed(values: dict[str, Any]) -> int:
        return build_parser().parse_args(_container(render(values).get("Deployment", "gateway"))["args"]).max_edit_images

    assert parsed({}) == 1  # engine.imagesPerPrompt's default
    assert parsed(SCENARIOS["7b"]) == 2  # imagesPerPrompt 2
    assert parsed(_merge(SCENARIOS["7b"], {"gateway": {"maxEditImages": 1}})) == 1
    assert parsed(_merge(SCENARIOS["7b"], {"engine": {"imagesPerPrompt": 0}})) == 1  # at least one image to edit
    # engines elsewhere: the chart cannot know their limit, so the gateway's default unless the value is set
    elsewhere = {"engine": {"enabled": False}, "gateway": {"extraArgs": ["--engine", "http://e:8000"]}}
    assert parsed(elsewhere) == GatewayConfig(engines=("http://e",)).max_edit_images
    assert parsed(_merge(elsewhere, {"gateway": {"maxEditImages": 8}})) == 8


def test_sdxl_worker_args_parse(rendered: dict[str, Rendered]) -> None:
    from server.cli import build_parser

    for scenario, device in (("7b", "cuda"), ("tiny-cpu", "cpu")):
        c = _container(rendered[scenario].get("Deployment", "sdxl-worker"))
        args = build_parser().parse_args(c["args"])
        assert args.device == device and args.port == 8100 and args.host == "0.0.0.0"
    assert args.warmup_steps == 1 and args.model_name == "sdxl-tiny"


@pytest.fixture(scope="module")
def vllm_flags() -> set[str]:
    """Every flag of vLLM's OpenAI server (the module `mgm engine` runs), from its own --help."""
    proc = subprocess.run([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--help=all"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"})
    flags = set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", proc.stdout))
    assert "--tensor-parallel-size" in flags, proc.stdout[-2000:] + proc.stderr[-2000:]
    return flags


@pytest.mark.parametrize("scenario", ["default", "tiny-cpu", "34b-tp4"])
def test_engine_args_are_mgm_and_vllm_flags(rendered: dict[str, Rendered], vllm_flags: set[str],
                                            scenario: str) -> None:
    from server.cli import build_parser

    c = _container(rendered[scenario].get("Deployment", "engine"))
    args, passthrough = build_parser().parse_known_args(c["args"])
    assert args.command == "engine" and str(args.model) == SCENARIOS[scenario].get("engine", {}).get(
        "model", {}).get("path", "/models/MGM-7B-HD")
    unknown = {a.split("=")[0] for a in passthrough if a.startswith("--")} - vllm_flags
    assert not unknown, f"not vLLM flags: {unknown}"
    mm = json.loads(passthrough[passthrough.index("--limit-mm-per-prompt") + 1])
    assert mm == {"image": SCENARIOS[scenario].get("engine", {}).get("imagesPerPrompt", 1)}


def test_model_preparation(rendered: dict[str, Rendered]) -> None:
    seven = rendered["7b"]
    (job,) = seven.kind("Job")
    downloads = json.loads(_env(job["spec"]["template"]["spec"]["containers"][0])["MGM_DOWNLOADS"])
    assert downloads == [
        {"repo": "YanweiLi/MGM-7B-HD", "revision": "main", "dir": "/models/MGM-7B-HD"},
        {"repo": "stabilityai/stable-diffusion-xl-base-1.0", "revision": "main", "dir": "/models/sdxl-base-1.0"}]
    init = seven.get("Deployment", "engine")["spec"]["template"]["spec"]["initContainers"][0]
    assert ".mgm-download-complete" in init["args"][0] and "until test -f" in init["args"][0]
    tiny = rendered["tiny-cpu"]
    assert not tiny.kind("Job") and not tiny.kind("PersistentVolumeClaim")
    init = tiny.get("Deployment", "engine")["spec"]["template"]["spec"]["initContainers"][0]
    cmd = shlex.split(init["args"][0].replace('"$MODEL_DIR', '"/models/tiny-mgm'))
    assert cmd[cmd.index("||") + 1:] == ["exec", "mgm", "build-tiny", "/models/tiny-mgm", "--force", "--backbone",
                                         "llama"]
    from server.cli import build_parser

    assert build_parser().parse_args(cmd[cmd.index("||") + 3:]).command == "build-tiny"


# --- KEDA, ServiceMonitor, Ingress, helm test ---------------------------------------------------------------------------


def test_keda_scales_engines_on_the_vllm_queue(rendered: dict[str, Rendered]) -> None:
    r = rendered["7b-keda"]
    (so,) = r.kind("ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert so["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                            "name": "mgm-minigemini-engine"}
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (1, 8)
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metadata"]["threshold"] == "4"
    assert trigger["metadata"]["query"] == ('sum(vllm:num_requests_waiting{namespace="ai",'
                                            'service="mgm-minigemini-engine"})')
    assert "replicas" not in r.get("Deployment", "engine")["spec"]
    assert not rendered["7b"].kind("ScaledObject")


def test_service_monitor_scrapes_every_component(rendered: dict[str, Rendered]) -> None:
    r = rendered["7b-keda"]
    (sm,) = r.kind("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["metadata"]["labels"]["release"] == \
        "kube-prometheus-stack"
    assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]
    sel = sm["spec"]["selector"]
    scraped = [s["metadata"]["name"] for s in r.kind("Service") if _selected(sel["matchLabels"], s["metadata"]["labels"])
               and s["metadata"]["labels"]["app.kubernetes.io/component"] in sel["matchExpressions"][0]["values"]]
    assert sorted(scraped) == ["mgm-minigemini-engine", "mgm-minigemini-gateway", "mgm-minigemini-sdxl-worker"]
    assert not rendered["default"].kind("ServiceMonitor")


def test_ingress_routes_to_the_gateway(rendered: dict[str, Rendered]) -> None:
    (ing,) = rendered["7b"].kind("Ingress")
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "mgm-minigemini-gateway", "port": {"name": "http"}}
    assert ing["spec"]["tls"][0]["secretName"] == "mgm-tls" and ing["spec"]["ingressClassName"] == "nginx"
    assert not rendered["default"].kind("Ingress")


def _routes(ing: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
    return {rule["host"]: [(p["path"], p["pathType"]) for p in rule["http"]["paths"]] for rule in ing["spec"]["rules"]}


def _routed(routes: list[tuple[str, str]], url_path: str) -> bool:
    """Whether an Ingress path list sends ``url_path`` on (Kubernetes semantics: Prefix by whole segments)."""
    for path, kind in routes:
        base = path.rstrip("/")
        if kind == "Exact" and url_path == path:
            return True
        if kind != "Exact" and (base == "" or url_path == base or url_path.startswith(base + "/")):
            return True
    return False


API_PATHS = ("/v1/chat/completions", "/v1/models", "/v1/images/generations", "/v1/files/images/img-1", "/",
             "/playground.css", "/playground.js", "/health", "/openapi.json")


def test_ingress_routes_the_api_and_never_metrics(rendered: dict[str, Rendered]) -> None:
    (ing,) = rendered["7b"].kind("Ingress")
    routes = _routes(ing)
    assert list(routes) == ["mgm.example.com"]
    for path in API_PATHS:
        assert _routed(routes["mgm.example.com"], path), path
    for path in ("/metrics", "/metrics/", "/ready", "/docs", "/anything"):
        assert not _routed(routes["mgm.example.com"], path), path
    # the ingress defaults, on a host of one's own, and a host with its own paths
    r = render({"ingress": {"enabled": True, "hosts": [
        {"host": "a.example.com"}, {"host": "b.example.com", "paths": [{"path": "/v1", "pathType": "Prefix"}]}]}})
    (ing,) = r.kind("Ingress")
    routes = _routes(ing)
    assert all(_routed(routes["a.example.com"], p) for p in API_PATHS)
    assert routes["b.example.com"] == [("/v1", "Prefix")]
    assert not any(_routed(rs, "/metrics") for rs in routes.values())


@pytest.mark.parametrize(("path", "kind"), [
    ("/", "Prefix"), ("/metrics", "Exact"), ("/metrics/", "Prefix"), ("/metrics", "Prefix"),
    ("/", "ImplementationSpecific"), ("/met", "ImplementationSpecific"), ("/(v1|metrics)", "ImplementationSpecific"),
])
def test_ingress_refuses_a_path_that_routes_metrics(path: str, kind: str) -> None:
    hosts = [{"host": "mgm.example.com", "paths": [{"path": "/v1", "pathType": "Prefix"},
                                                  {"path": path, "pathType": kind}]}]
    with pytest.raises(helm.HelmRenderError, match=re.escape(f"ingress path {path} ({kind})") + ".*/metrics"):
        render({"ingress": {"enabled": True, "hosts": hosts}})
    with pytest.raises(helm.HelmRenderError, match="would make /metrics public"):  # through ingress.paths too
        render({"ingress": {"enabled": True, "paths": [{"path": path, "pathType": kind}]}})
    assert not render({"ingress": {"hosts": hosts}}).kind("Ingress")  # only checked when the ingress is on


@pytest.mark.parametrize("scenario", ["default", "tiny-cpu", "34b-tp4"])
def test_helm_test_pod_lists_the_model(rendered: dict[str, Rendered], scenario: str) -> None:
    (pod,) = rendered[scenario].kind("Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    c = pod["spec"]["containers"][0]
    env = _env(c)
    svc = rendered[scenario].get("Service", "gateway")
    assert env["MGM_URL"] == f"http://{svc['metadata']['name']}.{NS}.svc.cluster.local:{svc['spec']['ports'][0]['port']}"
    assert env["MGM_EXPECT"] == {"default": "MGM-7B-HD", "tiny-cpu": "tiny-mgm", "34b-tp4": "MGM-34B-HD"}[scenario]
    assert '"/v1/models"' in c["args"][0] and pod["spec"]["restartPolicy"] == "Never"
    compile(c["args"][0], "helm-test", "exec")  # the script is valid Python


# --- the schema and the render-time checks reject bad values ------------------------------------------------------------

BAD_VALUES = {
    "floating image tag": ("image: {tag: latest}", "/image/tag"),
    "empty image tag": ('image: {tag: ""}', "/image/tag"),
    "inline API keys": ("apiKeys: {keys: [sk-123]}", "/apiKeys"),
    "typo in a component key": ("engine: {replica: 2}", "/engine"),
    "negative replicas": ("engine: {replicas: -1}", "/engine/replicas"),
    "tensor parallel 3": ("engine: {tensorParallelSize: 3}", "/engine/tensorParallelSize"),
    "tensor parallel on CPU": ("engine: {device: cpu, tensorParallelSize: 2, model: {path: /models/t, source: tiny}}",
                               "/engine/tensorParallelSize"),
    "unknown device": ("engine: {device: tpu}", "/engine/device"),
    "relative model path": ("engine: {model: {path: models/x}}", "/engine/model/path"),
    "unknown model source": ("engine: {model: {source: s3}}", "/engine/model/source"),
    "download without a volume": ("modelCache: {enabled: false}", "/modelCache/enabled"),
    "HPA without a CPU request": ("gateway: {resources: {requests: {cpu: null}}}", "/gateway/resources/requests"),
    "bad quantity": ("engine: {resources: {limits: {memory: lots}}}", "/engine/resources/limits/memory"),
    "bad shm size": ("engine: {shmSize: 16GB}", "/engine/shmSize"),
    "KEDA without a URL": ("engine: {keda: {enabled: true, prometheusServerAddress: prometheus:9090}}",
                           "/engine/keda/prometheusServerAddress"),
    "probe without a threshold": ("gateway: {probes: {readiness: {httpGet: {path: /ready, port: http}, "
                                  "periodSeconds: 5, failureThreshold: null}}}", "/gateway/probes/readiness"),
    "root in the pod": ("podSecurityContext: {runAsNonRoot: false}", "/podSecurityContext/runAsNonRoot"),
    "privilege escalation": ("containerSecurityContext: {allowPrivilegeEscalation: true}",
                             "/containerSecurityContext/allowPrivilegeEscalation"),
    "GPU utilisation > 1": ("engine: {gpuMemoryUtilization: 1.5}", "/engine/gpuMemoryUtilization"),
    "KEDA scaling to zero": ("engine: {keda: {enabled: true, minReplicas: 0}}", "/engine/keda/minReplicas"),
    "SDXL worker without a queue": ("sdxlWorker: {maxQueue: 0}", "/sdxlWorker/maxQueue"),
    "no edit image": ("gateway: {maxEditImages: 0}", "/gateway/maxEditImages"),
    "image store with an unknown scheme": ("imageStore: {url: \"s3://bucket\"}", "/imageStore/url"),
    "image store redis with a floating tag": ("imageStore: {redis: {image: \"redis:latest\"}}", "/imageStore/redis/image"),
    "unknown top-level key": ("engines: {replicas: 2}", "engines"),
    "ingress path without a slash": ("ingress: {paths: [{path: v1, pathType: Prefix}]}", "/ingress/paths/0/path"),
    "ingress host path typo": ("ingress: {hosts: [{host: a, paths: [{path: /v1, type: Prefix}]}]}",
                               "/ingress/hosts/0/paths/0"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_schema_rejects_bad_values(case: str) -> None:
    text, where = BAD_VALUES[case]
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmValuesError) as exc:
            chart.validate_schema(yaml.safe_load(text))
    assert where in str(exc.value), str(exc.value)


@pytest.mark.parametrize(("values", "message"), [
    ({"gateway": {"terminationGracePeriodSeconds": 30}}, "gateway.terminationGracePeriodSeconds (30) must exceed"),
    ({"engine": {"preStopSleepSeconds": 60, "drainSeconds": 120}}, "engine.terminationGracePeriodSeconds (180)"),
    ({"engine": {"keda": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}}, "keda.maxReplicas"),
    ({"engine": {"enabled": False}}, "the gateway needs engines elsewhere"),
    ({"sdxlWorker": {"enabled": True}, "imageStore": {"redis": {"enabled": False}}},
     "several gateway pods (gateway.replicas > 1 or gateway.autoscaling.enabled) need a shared image store"),
    # no image generation: stored Responses (previous_response_id) live in the same store
    ({"sdxlWorker": {"enabled": False}, "imageStore": {"redis": {"enabled": False}}},
     "or a stored response (previous_response_id) written by one pod is a 404 on the others"),
    ({"gateway": {"maxEditImages": 2}}, "gateway.maxEditImages (2) must not exceed engine.imagesPerPrompt (1)"),
    ({"gateway": {"maxEditImages": 5}, "engine": {"imagesPerPrompt": 4}},
     "gateway.maxEditImages (5) must not exceed engine.imagesPerPrompt (4)"),
    ({"sdxlWorker": {"enabled": True}, "gateway": {"autoscaling": {"enabled": False}, "replicas": 3},
      "imageStore": {"url": "memory://"}}, "need a shared image store"),
    ({"imageStore": {"url": "file:///images"}}, "set imageStore.existingClaim"),
])
def test_render_refuses_inconsistent_values(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(values)


def test_examples_pass_the_schema() -> None:
    with helm.Chart.load(str(CHART)) as chart:
        for name, values in SCENARIOS.items():
            chart.validate_schema(values)  # raises on a problem


# --- yamllint ---------------------------------------------------------------------------------------------------------

YAMLLINT_CONFIG = """
extends: default
rules:
  line-length: {max: 120}
  document-start: disable
  truthy: {check-keys: false}
  braces: {max-spaces-inside: 1}
  brackets: {max-spaces-inside: 1}
  comments: {min-spaces-from-content: 1}
  indentation: {spaces: 2, indent-sequences: whatever}
"""


def test_yamllint_chart_values_and_examples() -> None:
    from yamllint import config, linter

    conf = config.YamlLintConfig(YAMLLINT_CONFIG)
    files = [CHART / "Chart.yaml", CHART / "values.yaml", *sorted(EXAMPLES.glob("*.yaml"))]
    problems = [f"{f.relative_to(ROOT)}:{p.line}: {p.desc} ({p.rule})" for f in files
                for p in linter.run(f.read_text(), conf, str(f))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_yamllint_rendered_templates(rendered: dict[str, Rendered], scenario: str) -> None:
    """Templates are Go text, not YAML: what they render is linted (structure, duplicate keys, trailing spaces)."""
    from yamllint import config, linter

    # long lines there are data (a JSON env value, a shell command), not formatting
    # template directives leave one blank line at the top of a file
    conf = config.YamlLintConfig(YAMLLINT_CONFIG.replace("line-length: {max: 120}", "line-length: disable")
                                 + "  empty-lines: {max: 1, max-start: 1, max-end: 1}\n")
    problems = []
    for path, text in rendered[scenario].files.items():
        if path.endswith(".yaml") and text.strip():
            problems += [f"{path}:{p.line}: {p.desc} ({p.rule})" for p in linter.run(text, conf, path)]
    assert not problems, "\n".join(problems)
