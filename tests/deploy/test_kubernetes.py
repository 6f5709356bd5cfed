"""Kubernetes manifests, validated offline.

Built-in kinds are validated by the PyPI package kubernetes-validate (bundled OpenAPI
schemas, no network, strict: unknown fields are errors) against Kubernetes 1.30 (the
oldest release the manifests target) and the newest release the package knows.
kubernetes-validate has no schema for the Prometheus Operator's PodMonitor (a CRD), so
podmonitor.yaml is checked against a JSON schema transcribed here from the fields of the
monitoring.coreos.com/v1 PodMonitor CRD that it uses (unknown fields rejected), plus
cross-references. The ConfigMap's config goes through the agent's own config model.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
METRICS_PORT = 10111


def documents() -> list[tuple[str, dict[str, Any]]]:
    docs: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def by_kind(kind: str) -> dict[str, Any]:
    [doc] = [d for _, d in documents() if d["kind"] == kind]
    return doc


BUILTIN = [(name, doc) for name, doc in documents() if doc["apiVersion"] != "monitoring.coreos.com/v1"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("name", "doc"), BUILTIN, ids=[n for n, _ in BUILTIN])
def test_builtin_manifests_validate(name: str, doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def test_all_expected_kinds_present() -> None:
    kinds = sorted(d["kind"] for _, d in documents())
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "Namespace", "PodMonitor",
                     "Service", "ServiceAccount"]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["spec"]["template"]["spec"]["containers"][0]["securityContext"].update(privilegd=True),
        lambda d: d["spec"]["template"]["spec"]["containers"][0].update(ports=[{"containerPort": "metrics"}]),
        lambda d: d["spec"].pop("selector"),
    ],
    ids=["unknown-field", "wrong-type", "missing-required"],
)
def test_validator_rejects_broken_daemonset(mutate: Any) -> None:
    broken = copy.deepcopy(by_kind("DaemonSet"))
    mutate(broken)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


def test_podmonitor_has_no_bundled_schema() -> None:
    """The reason podmonitor.yaml is validated structurally below."""
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(by_kind("PodMonitor"), VERSIONS[0], strict=True)


_RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "action": {"enum": ["replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep",
                            "lowercase", "uppercase", "keepequal", "dropequal",
                            "Replace", "Keep", "Drop", "HashMod", "LabelMap", "LabelDrop", "LabelKeep",
                            "Lowercase", "Uppercase", "KeepEqual", "DropEqual"]},
        "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
        "separator": {"type": "string"},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "modulus": {"type": "integer", "minimum": 0},
        "replacement": {"type": "string"},
    },
}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                                          r"(([0-9]+)s)?(([0-9]+)ms)?)$"}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "required": ["key", "operator"], "additionalProperties": False,
            "properties": {"key": {"type": "string"}, "operator": {"type": "string"},
                           "values": {"type": "array", "items": {"type": "string"}}}}},
    },
}
PODMONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "selector": _LABEL_SELECTOR,
                "namespaceSelector": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"},
                                   "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "sampleLimit": {"type": "integer", "minimum": 0},
                "podMetricsEndpoints": {"type": "array", "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"},
                        "portNumber": {"type": "integer", "minimum": 1, "maximum": 65535},
                        "path": {"type": "string"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": _DURATION,
                        "scrapeTimeout": _DURATION,
                        "honorLabels": {"type": "boolean"},
                        "honorTimestamps": {"type": "boolean"},
                        "relabelings": {"type": "array", "items": _RELABEL},
                        "metricRelabelings": {"type": "array", "items": _RELABEL},
                    },
                }},
            },
        },
    },
}


def test_podmonitor_structure() -> None:
    pm = by_kind("PodMonitor")
    jsonschema.validate(pm, PODMONITOR_SCHEMA)
    ds = by_kind("DaemonSet")
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert pm["metadata"]["namespace"] == ds["metadata"]["namespace"]
    assert pm["spec"]["namespaceSelector"]["matchNames"] == [ds["metadata"]["namespace"]]
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    ports = {p["name"] for c in ds["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    [endpoint] = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    # the alert rules select job="kprobe-exporter": the PodMonitor must produce that job
    relabel = {r["targetLabel"]: r for r in endpoint["relabelings"]}
    assert relabel["job"]["replacement"] == "kprobe-exporter"
    assert relabel["instance"]["sourceLabels"] == ["__meta_kubernetes_pod_node_name"]
    rules = (ROOT / "alerts" / "kprobe-exporter.rules.yml").read_text()
    assert 'job="kprobe-exporter"' in rules


def test_podmonitor_schema_rejects_mistakes() -> None:
    broken = copy.deepcopy(by_kind("PodMonitor"))
    broken["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, PODMONITOR_SCHEMA)
    broken = copy.deepcopy(by_kind("PodMonitor"))
    broken["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, PODMONITOR_SCHEMA)


def test_daemonset_runs_the_agent_as_designed() -> None:
    ds = by_kind("DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    [container] = spec["containers"]
    assert spec["hostPID"] is True and spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    # the token of rbac.yaml's account (test_rbac_grants_what_the_pod_labels_ask_and_no_more)
    assert spec["automountServiceAccountToken"] is True
    assert spec["serviceAccountName"] == by_kind("ServiceAccount")["metadata"]["name"]
    assert container["securityContext"]["privileged"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # never two agents on a node: no surge during updates
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] == 0
    # no preStop cleanup racing the live agent (it runs before SIGTERM)
    assert "preStop" not in container.get("lifecycle", {})
    assert 10 <= spec["terminationGracePeriodSeconds"] <= 120
    # the command line of the contract
    argv = [*container["command"], *container["args"]]
    assert argv[:2] == ["kprobe-exporter", "run"]
    config_path = argv[argv.index("--config") + 1]
    listen = argv[argv.index("--web.listen-address") + 1]
    assert listen.endswith(f":{METRICS_PORT}")
    assert [p["containerPort"] for p in container["ports"]] == [METRICS_PORT]
    # tracefs from the host, config from the ConfigMap
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts["tracefs"]["mountPath"] == "/sys/kernel/tracing"
    assert volumes["tracefs"]["hostPath"]["path"] == "/sys/kernel/tracing"
    cm = by_kind("ConfigMap")
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]
    assert Path(config_path).parent == Path(mounts["config"]["mountPath"])
    assert Path(config_path).name in cm["data"]
    env = {e["name"]: e for e in container["env"]}
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in env
    order = list(env)
    for name, entry in env.items():
        # $(VAR) expands only when VAR is defined earlier in the list
        for var in re.findall(r"\$\((\w+)\)", entry.get("value", "")):
            assert var in env and order.index(var) < order.index(name), (name, var)
    # probes hit the health endpoint of the contract
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthz"
    assert "memory" in container["resources"]["limits"]
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()


def test_service_and_namespace_match_the_daemonset() -> None:
    ds = by_kind("DaemonSet")
    svc = by_kind("Service")
    ns = by_kind("Namespace")
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    [port] = svc["spec"]["ports"]
    assert port["port"] == METRICS_PORT and port["targetPort"] == "metrics"
    assert svc["metadata"]["annotations"]["prometheus.io/port"] == str(METRICS_PORT)
    assert svc["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    for _, doc in documents():
        if doc["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):  # cluster-scoped
            assert doc["metadata"]["namespace"] == ns["metadata"]["name"]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


def test_configmap_config_is_valid_for_the_agent() -> None:
    config_mod = pytest.importorskip("kprobe_exporter.config")
    probes_mod = pytest.importorskip("kprobe_exporter.probes")
    text = by_kind("ConfigMap")["data"]["config.yaml"]
    cfg = config_mod.load_text(text, "configmap config.yaml")
    probe_set = probes_mod.build_probe_set(cfg, "configmap config.yaml", resolve=None)
    names = {e.name for e in probe_set.events}
    assert {"openat", "read", "write"} <= names


def _allows(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    return any(group in r.get("apiGroups", []) and resource in r.get("resources", []) and verb in r.get("verbs", [])
               for r in rules)


def test_rbac_grants_what_the_pod_labels_ask_and_no_more(tmp_path: Path) -> None:
    """The request kube.py makes with the mounted token (its URL, built here from the env the DaemonSet
    gives) is allowed by the ClusterRole bound to the DaemonSet's account; nothing else is granted."""
    kube = pytest.importorskip("kprobe_exporter.kube")
    sa_dir = tmp_path / "serviceaccount"
    sa_dir.mkdir()
    (sa_dir / "token").write_text("t")
    ds, sa = by_kind("DaemonSet"), by_kind("ServiceAccount")
    role, binding = by_kind("ClusterRole"), by_kind("ClusterRoleBinding")
    env = {e["name"] for e in ds["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "NODE_NAME" in env  # the field selector's node; KUBERNETES_SERVICE_* the kubelet always sets
    src = kube.PodSource.from_env(env={"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443",
                                       "NODE_NAME": "node-a"}, sa_dir=sa_dir)
    assert src is not None
    url = urllib.parse.urlsplit(src.url)
    assert url.path == "/api/v1/pods"  # core group, every namespace, a collection GET: verb `list`
    assert urllib.parse.parse_qs(url.query) == {"fieldSelector": ["spec.nodeName=node-a"]}
    assert _allows(role["rules"], "", "pods", "list")
    granted = {(g, res, v) for r in role["rules"] for g in r["apiGroups"] for res in r["resources"] for v in r["verbs"]}
    assert granted <= {("", "pods", v) for v in ("get", "list", "watch")}
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]
    assert sa["metadata"]["namespace"] == ds["metadata"]["namespace"]


def test_kustomize_renders_every_manifest_offline() -> None:
    """`kubectl kustomize` (offline: no cluster needed) renders the set `kubectl apply -k` would send;
    each built-in kind in it passes the schema check. (`kubectl apply --dry-run=client` needs a server.)"""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True)
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted(d["kind"] for d in rendered) == sorted(d["kind"] for _, d in documents())
    for doc in rendered:
        if doc["apiVersion"] != "monitoring.coreos.com/v1":
            kubernetes_validate.validate(doc, VERSIONS[0], strict=True)
