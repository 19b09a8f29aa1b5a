#!/usr/bin/env python3
"""Checks the Helm chart in deploy/helm/taonode-guardian without a cluster.

Run through `bash scripts/check-chart`, which makes the pinned virtualenv this needs
(helm-python-sdk: Helm's own library for lint and render; kubernetes-validate: the
Kubernetes 1.30 OpenAPI schemas). Steps:

1. render the chart with each value set below (Helm's engine, offline) into a temp dir;
2. lint it (Helm lint: errors fail, warnings are printed);
3. validate every rendered object and the chart's CRD with `kubernetes-validate -k 1.30.0
   --strict` (cert-manager Issuer/Certificate have no bundled schema: they are checked
   here in Python instead, and the summary says so);
4. assert the hardening, RBAC (no Role/RoleBinding: failover is the ledger's lock, not a
   Lease), agent, server (standby = true and the rollout strategy by replica count),
   NetworkPolicy and cert-manager rules on the rendered objects, check the generated TOML
   with the real binaries when they are built, and compare crds/taonodes.yaml with
   deploy/crds/taonodes.yaml byte for byte;
5. prove the assertions can fail: known-bad mutations of the rendered objects must each be
   caught, and a known-bad object must fail kubernetes-validate.

Exits 1 naming the object and the rule on any failure.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    sys.exit("check-chart: Python 3.11 or newer is needed (tomllib)")

import yaml
import helm_python
from helm_python import chart as helm_chart
import kubernetes_validate

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy/helm/taonode-guardian"
CRD_SOURCE = ROOT / "deploy/crds/taonodes.yaml"
CRD_COPY = CHART / "crds/taonodes.yaml"
RUST_PERMISSIONS = ROOT / "server/src/actuate/kubernetes/cluster.rs"
KUBE_VERSION = "1.30.0"
RELEASE = "guardian"
NAMESPACE = "taonode-guardian"

# Kinds kubernetes-validate has no schema for (custom resources of cert-manager). They are
# skipped there on purpose and checked by check_cert_manager() instead.
NO_SCHEMA_KINDS = {("cert-manager.io/v1", "Issuer"), ("cert-manager.io/v1", "Certificate")}

DIGEST = "sha256:" + "ab" * 32
# The SHA-256 of the token "chart-test" (printf %s chart-test | sha256sum).
WEB_TOKEN_SHA256 = hashlib.sha256(b"chart-test").hexdigest()

VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "production": {
        "server": {
            "replicas": 3,
            "image": {"digest": DIGEST},
            "ledger": {
                "url": "postgres://guardian@postgres.db.svc:5432/guardian",
                "existingSecret": "guardian-ledger",
            },
            "commandSigning": {"existingSecret": "guardian-command-signing"},
            "service": {"type": "LoadBalancer"},
            "tls": {"extraDnsNames": ["guardian.example.com"]},
            "config": {"extraToml": "[alerts]\nmin_severity = \"critical\"\n"},
            "web": {"enabled": True, "tokenSha256": [WEB_TOKEN_SHA256]},
        },
        "agent": {
            "image": {"digest": DIGEST},
            "gpu": {"enabled": True},
            "keystorePath": "/home/validator/.bittensor/wallets",
            "hostNetwork": True,
            "chain": {"endpoint": "ws://127.0.0.1:9944"},
            "nodeSelector": {"guardian.taonode.io/validator": "true"},
            "tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": "validator", "effect": "NoSchedule"}
            ],
        },
        "certManager": {
            "enabled": True,
            "agentCertificates": {"nodes": ["validator-01", "validator-02"]},
            "operators": ["alice"],
        },
    },
    "no-cert-manager": {
        "certManager": {"enabled": False},
        "server": {"tls": {"secretName": "guardian-server-tls"}, "persistence": {"enabled": True}},
        "agent": {"tls": {"caSecret": {"name": "fleet-ca", "key": "ca.crt"}}},
    },
}

# Values that must not render (the template's fail message must contain the text).
MUST_FAIL: dict[str, tuple[dict[str, Any], str]] = {
    "replicas>1 on SQLite": ({"server": {"replicas": 2}}, "needs the PostgreSQL ledger"),
    "image by tag": ({"agent": {"image": {"digest": "latest"}}}, "pulled by digest"),
    "no TLS Secret without cert-manager": ({"certManager": {"enabled": False}}, "server.tls.secretName"),
    "web page nobody can sign in to": (
        {"server": {"web": {"enabled": True, "tokenSha256": [], "clientCertificates": False}}},
        "server.web.enabled needs",
    ),
}

# (apiGroup, resource, verb): exactly what the server's ClusterRole may grant.
CLUSTER_RULES = {
    *(("guardian.taonode.io", "taonodes", v) for v in ("get", "list", "watch")),
    *(("guardian.taonode.io", "taonodes/status", v) for v in ("patch", "get")),
    ("apps", "statefulsets", "get"),
    ("apps", "deployments", "get"),
    ("apps", "statefulsets", "patch"),
    ("apps", "deployments", "patch"),
    *(("", "pods", v) for v in ("get", "list", "delete")),
    ("", "events", "create"),
    *(("", "persistentvolumeclaims", v) for v in ("get", "patch")),
    ("storage.k8s.io", "storageclasses", "get"),
    *(("", "nodes", v) for v in ("get", "patch")),
    *(("batch", "jobs", v) for v in ("get", "create")),
    ("authorization.k8s.io", "selfsubjectaccessreviews", "create"),
}
STANDARD_LABELS = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
]
WORKLOAD_KINDS = {"Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job"}


class Failures:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, rule: str, detail: str = "") -> None:
        self.items.append(f"{where}: {rule}" + (f" ({detail})" if detail else ""))


def ident(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"


def dig(obj: Any, *path: Any, default: Any = None) -> Any:
    for key in path:
        if isinstance(obj, dict) and key in obj:
            obj = obj[key]
        elif isinstance(obj, list) and isinstance(key, int) and key < len(obj):
            obj = obj[key]
        else:
            return default
    return obj


def of_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o.get("kind") == kind]


def component(obj: dict[str, Any]) -> str:
    return dig(obj, "metadata", "labels", "app.kubernetes.io/component", default="")


# ---------------------------------------------------------------------------------------
# Render and lint


def render(chart: Any, values: dict[str, Any]) -> dict[str, str]:
    return chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def objects_of(manifests: dict[str, str]) -> list[dict[str, Any]]:
    objs: list[dict[str, Any]] = []
    for path in sorted(manifests):
        if not path.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        for doc in yaml.safe_load_all(manifests[path]):
            if doc:
                doc.setdefault("metadata", {})
                objs.append(doc)
    return objs


def lint(values: dict[str, Any], label: str, failures: Failures) -> tuple[int, int]:
    report = helm_chart.lint(
        str(CHART), values, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}"
    )
    warnings = 0
    for message in report.get("messages", []):
        severity = message.get("severity")
        text = f"{message.get('path')}: {message.get('error')}"
        if severity == 3:
            failures.add(f"helm lint [{label}]", "lint error", text)
        elif severity == 2:
            warnings += 1
            print(f"  warning (helm lint [{label}]): {text}")
    for error in report.get("errors", []):
        failures.add(f"helm lint [{label}]", "lint error", str(error))
    return warnings, len(report.get("messages", []))


# ---------------------------------------------------------------------------------------
# Schema validation (kubernetes-validate, the real CLI)


def write_objects(objs: list[dict[str, Any]], folder: Path) -> tuple[list[Path], list[str]]:
    folder.mkdir(parents=True, exist_ok=True)
    files, skipped = [], []
    for i, obj in enumerate(objs):
        name = f"{i:02d}-{obj.get('kind', 'unknown').lower()}-{obj['metadata'].get('name', 'x')}.yaml"
        path = folder / name
        path.write_text(yaml.safe_dump(obj, sort_keys=False))
        if (obj.get("apiVersion"), obj.get("kind")) in NO_SCHEMA_KINDS:
            skipped.append(ident(obj))
        else:
            files.append(path)
    return files, skipped


def kubernetes_validate_cli(files: list[Path]) -> tuple[int, list[str]]:
    tool = Path(sys.executable).parent / "kubernetes-validate"
    proc = subprocess.run(
        [str(tool), "-k", KUBE_VERSION, "--strict", "--quiet", *map(str, files)],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [l for l in (proc.stdout + proc.stderr).splitlines() if l.strip()]
    return proc.returncode, lines


def validate_schemas(files: list[Path], failures: Failures) -> None:
    rc, lines = kubernetes_validate_cli(files)
    for line in lines:
        # WARN = no schema for a kind we did not expect to skip: that is a failure too.
        if line.startswith(("ERROR", "WARN", "FATAL")) or rc != 0:
            failures.add("kubernetes-validate", "schema", line)
    if rc != 0 and not lines:
        failures.add("kubernetes-validate", "schema", f"exit status {rc}")


# ---------------------------------------------------------------------------------------
# Assertions on rendered objects


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj.get("kind") in WORKLOAD_KINDS:
        return dig(obj, "spec", "template", "spec", default={})
    if obj.get("kind") == "Pod":
        return obj.get("spec", {})
    return None


def check_labels(objs: list[dict[str, Any]], f: Failures) -> None:
    for obj in objs:
        labels = obj["metadata"].get("labels") or {}
        for label in STANDARD_LABELS:
            if label not in labels:
                f.add(ident(obj), f"label {label} missing")


def check_pods(objs: list[dict[str, Any]], f: Failures) -> None:
    for obj in objs:
        spec = pod_spec(obj)
        if spec is None:
            continue
        where = ident(obj)
        psc = spec.get("securityContext") or {}
        if psc.get("runAsNonRoot") is not True:
            f.add(where, "pod securityContext.runAsNonRoot must be true")
        for key in ("runAsUser", "runAsGroup"):
            if not isinstance(psc.get(key), int) or psc.get(key) == 0:
                f.add(where, f"pod securityContext.{key} must be a numeric non-root id", repr(psc.get(key)))
        for key in ("hostPID", "hostIPC"):
            if spec.get(key):
                f.add(where, f"{key} must not be set")
        pod_seccomp = dig(psc, "seccompProfile", "type")
        containers = (spec.get("initContainers") or []) + (spec.get("containers") or [])
        if not containers:
            f.add(where, "no containers")
        for c in containers:
            cw = f"{where} container {c.get('name')}"
            sc = c.get("securityContext") or {}
            if sc.get("readOnlyRootFilesystem") is not True:
                f.add(cw, "securityContext.readOnlyRootFilesystem must be true")
            if sc.get("allowPrivilegeEscalation") is not False:
                f.add(cw, "securityContext.allowPrivilegeEscalation must be false")
            if sc.get("privileged"):
                f.add(cw, "securityContext.privileged must not be true")
            if "ALL" not in (dig(sc, "capabilities", "drop") or []):
                f.add(cw, "securityContext.capabilities.drop must contain ALL")
            if dig(sc, "capabilities", "add"):
                f.add(cw, "securityContext.capabilities.add must be empty", str(dig(sc, "capabilities", "add")))
            seccomp = dig(sc, "seccompProfile", "type") or pod_seccomp
            if seccomp != "RuntimeDefault":
                f.add(cw, "seccompProfile must be RuntimeDefault (pod or container)", repr(seccomp))
            if sc.get("runAsUser") == 0 or sc.get("runAsNonRoot") is False:
                f.add(cw, "container must not run as root")
            for part in ("requests", "limits"):
                for res in ("cpu", "memory"):
                    if not dig(c, "resources", part, res):
                        f.add(cw, f"resources.{part}.{res} missing")
            image = str(c.get("image", ""))
            if not re.search(r"@sha256:[0-9a-f]{64}$", image):
                f.add(cw, "image must be pinned by digest (repo@sha256:<64 hex>)", image)


def check_rbac(objs: list[dict[str, Any]], f: Failures) -> None:
    for obj in objs:
        if obj.get("kind") not in ("Role", "ClusterRole"):
            continue
        for rule in obj.get("rules") or []:
            for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                if any("*" in str(x) for x in rule.get(field) or []):
                    f.add(ident(obj), f"RBAC wildcard in {field}", str(rule))
            resources = rule.get("resources") or []
            verbs = rule.get("verbs") or []
            if any(r == "secrets" or r.startswith("secrets/") for r in resources):
                f.add(ident(obj), "RBAC must not grant access to secrets", str(rule))
            if "persistentvolumeclaims" in resources and {"delete", "deletecollection"} & set(verbs):
                f.add(ident(obj), "RBAC must not delete persistentvolumeclaims", str(rule))
            if {"escalate", "bind", "impersonate"} & set(verbs):
                f.add(ident(obj), "RBAC must not escalate, bind or impersonate", str(rule))

    def triples(role: dict[str, Any]) -> set[tuple[str, str, str]]:
        return {
            (g, r, v)
            for rule in role.get("rules") or []
            for g in rule.get("apiGroups") or []
            for r in rule.get("resources") or []
            for v in rule.get("verbs") or []
        }

    cluster_roles = of_kind(objs, "ClusterRole")
    if len(cluster_roles) != 1:
        f.add("ClusterRole", "exactly one ClusterRole expected", str(len(cluster_roles)))
    for role in cluster_roles:
        got = triples(role)
        if got != CLUSTER_RULES:
            f.add(
                ident(role),
                "ClusterRole must grant exactly the server's verbs",
                f"extra {sorted(got - CLUSTER_RULES)}, missing {sorted(CLUSTER_RULES - got)}",
            )
    # The server needs nothing namespaced: replicas fail over on the ledger's lock (standby =
    # true), not on a Lease. A RoleBinding grants too (also to a ClusterRole), so none at all.
    for obj in of_kind(objs, "Role") + of_kind(objs, "RoleBinding"):
        granted = sorted(triples(obj)) if obj.get("kind") == "Role" else (obj.get("roleRef") or {})
        f.add(ident(obj), "no Role or RoleBinding: the server needs no namespaced permission", str(granted))

    server_sa = [o for o in of_kind(objs, "ServiceAccount") if component(o) == "server"]
    agent_sa = [o for o in of_kind(objs, "ServiceAccount") if component(o) == "agent"]
    server_names = {o["metadata"]["name"] for o in server_sa}
    agent_names = {o["metadata"]["name"] for o in agent_sa}
    for binding in of_kind(objs, "ClusterRoleBinding") + of_kind(objs, "RoleBinding"):
        for subject in binding.get("subjects") or []:
            if subject.get("kind") != "ServiceAccount" or subject.get("name") not in server_names:
                f.add(ident(binding), "binds something other than the server's ServiceAccount", str(subject))
            if subject.get("name") in agent_names:
                f.add(ident(binding), "the agent's ServiceAccount must have no RBAC")
        ref = binding.get("roleRef") or {}
        targets = {o["metadata"]["name"] for o in of_kind(objs, ref.get("kind", ""))}
        if ref.get("name") not in targets:
            f.add(ident(binding), "roleRef names no role of this chart", str(ref))
    if len(of_kind(objs, "ClusterRoleBinding")) != 1:
        f.add("ClusterRoleBinding", "exactly one expected (the server's)")


def rust_permissions(f: Failures) -> set[tuple[str, str, str]]:
    """The PERMISSIONS the server checks at run time, read from its source."""
    try:
        source = RUST_PERMISSIONS.read_text()
    except OSError as error:
        f.add(str(RUST_PERMISSIONS.relative_to(ROOT)), "cannot read the server's PERMISSIONS", str(error))
        return set()
    block = re.search(r"pub const PERMISSIONS: \[Permission; (\d+)\] = \[(.*?)\n\];", source, re.S)
    if not block:
        f.add(str(RUST_PERMISSIONS.relative_to(ROOT)), "PERMISSIONS array not found (update check_chart.py)")
        return set()
    body = block.group(2)
    found = set()
    for verb, group, resource in re.findall(r'permission\("([^"]*)",\s*"([^"]*)",\s*"([^"]*)"\)', body):
        found.add((group, resource, verb))
    for lit in re.findall(r"Permission\s*\{(.*?)\}", body, re.S):
        fields = dict(re.findall(r'(\w+):\s*"([^"]*)"', lit))
        resource = fields.get("resource", "")
        if fields.get("subresource"):
            resource += "/" + fields["subresource"]
        found.add((fields.get("group", ""), resource, fields.get("verb", "")))
    if len(found) != int(block.group(1)):
        f.add(
            str(RUST_PERMISSIONS.relative_to(ROOT)),
            "could not read every PERMISSIONS entry (update check_chart.py)",
            f"{len(found)} of {block.group(1)}",
        )
    return found


def check_rust_permissions(objs: list[dict[str, Any]], f: Failures) -> int:
    needed = rust_permissions(f)
    missing = needed - CLUSTER_RULES
    if missing:
        f.add("ClusterRole", "does not grant what the server checks (cluster.rs PERMISSIONS)", str(sorted(missing)))
    return len(needed)


def find_volume(spec: dict[str, Any], name: str) -> dict[str, Any]:
    for volume in spec.get("volumes") or []:
        if volume.get("name") == name:
            return volume
    return {}


def check_agent(objs: list[dict[str, Any]], values: dict[str, Any], f: Failures) -> None:
    daemonsets = of_kind(objs, "DaemonSet")
    if len(daemonsets) != 1:
        f.add("DaemonSet", "exactly one agent DaemonSet expected", str(len(daemonsets)))
        return
    ds = daemonsets[0]
    where = ident(ds)
    spec = pod_spec(ds) or {}
    agent = values["agent"]
    if spec.get("automountServiceAccountToken") is not False:
        f.add(where, "automountServiceAccountToken must be false on the agent")
    for sa in of_kind(objs, "ServiceAccount"):
        if component(sa) == "agent" and sa.get("automountServiceAccountToken") is not False:
            f.add(ident(sa), "automountServiceAccountToken must be false on the agent's account")
    container = (spec.get("containers") or [{}])[0]
    if container.get("command", [])[:1] + container.get("args", []) != [
        "guardian-agent", "--config", "/etc/guardian/agent.toml"
    ]:
        f.add(where, "must run guardian-agent --config /etc/guardian/agent.toml")
    env = {e.get("name"): e for e in container.get("env") or []}
    for name, path in (
        ("NODE_NAME", "spec.nodeName"),
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("GUARDIAN_AGENT_NODE_ID", "spec.nodeName"),
    ):
        got = dig(env.get(name), "valueFrom", "fieldRef", "fieldPath")
        if got != path:
            f.add(where, f"env {name} must come from fieldRef {path}", repr(got))

    spool = agent["spool"]["hostPath"].rstrip("/")
    mounts = container.get("volumeMounts") or []
    host_volumes = {v["name"]: v["hostPath"]["path"] for v in spec.get("volumes") or [] if "hostPath" in v}
    writable = []
    for mount in mounts:
        if mount.get("name") in host_volumes and not mount.get("readOnly"):
            writable.append(mount["name"])
            if host_volumes[mount["name"]] != spool:
                f.add(where, f"hostPath volume {mount['name']} must be mounted readOnly (only the spool is writable)")
    if writable != ["spool"] or dig(find_volume(spec, "spool"), "hostPath", "type") != "DirectoryOrCreate":
        f.add(where, "the spool must be the one writable hostPath, DirectoryOrCreate", str(writable))
    by_path = {}
    for mount in mounts:
        if mount.get("name") in host_volumes:
            by_path[host_volumes[mount["name"]]] = mount.get("mountPath")
    expected = {"/proc": "/host/proc", agent["chainDataPath"]: agent["chainDataPath"], spool: spool}
    if agent["keystorePath"]:
        expected[agent["keystorePath"]] = agent["keystorePath"]
    for host, inside in expected.items():
        if by_path.get(host) != inside:
            f.add(where, f"host {host} must be mounted at {inside}", repr(by_path.get(host)))
    if not agent["keystorePath"] and find_volume(spec, "keystore"):
        f.add(where, "an empty keystorePath must mount nothing")
    ca = find_volume(spec, "ca")
    if [i.get("path") for i in dig(ca, "secret", "items", default=[]) or []] != ["ca.crt"]:
        f.add(where, "only the CA certificate may be mounted from the CA Secret")
    if agent["gpu"]["enabled"] != (spec.get("runtimeClassName") == agent["gpu"]["runtimeClassName"]):
        f.add(where, "runtimeClassName must follow agent.gpu.enabled", repr(spec.get("runtimeClassName")))
    if spec.get("nodeSelector", {}) != agent["nodeSelector"] or spec.get("tolerations", []) != agent["tolerations"]:
        f.add(where, "nodeSelector/tolerations must come from values")
    if spec.get("hostNetwork", False) != agent["hostNetwork"]:
        f.add(where, "hostNetwork must follow agent.hostNetwork")

    # The generated agent.toml.
    toml_text = configmap_data(objs, "agent", "agent.toml", f)
    if toml_text is None:
        return
    try:
        conf = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as error:
        f.add("ConfigMap agent", "agent.toml does not parse", str(error))
        return
    if "node_id" in conf:
        f.add("ConfigMap agent", "node_id must not be in the shared file (GUARDIAN_AGENT_NODE_ID per node)")
    want = {
        "network": agent["network"],
        "proc_root": "/host/proc",
        "chain_data_path": agent["chainDataPath"],
        "keystore_path": agent["keystorePath"],
        "spool_dir": spool + "/spool",
        "gpu": agent["gpu"]["enabled"],
    }
    for key, value in want.items():
        if conf.get(key) != value:
            f.add("ConfigMap agent", f"agent.toml {key} must be {value!r}", repr(conf.get(key)))
    server_host = f"{RELEASE}-taonode-guardian-server.{NAMESPACE}.svc"
    if conf.get("server_url") != f"https://{server_host}:7443" or conf.get("server_name") != server_host:
        f.add("ConfigMap agent", "agent.toml server_url/server_name must name the server Service", str(conf.get("server_url")))
    mount_dirs = {m.get("mountPath") for m in mounts}
    for key in ("ca_file", "cert_file", "key_file"):
        path = dig(conf, "tls", key, default="")
        if str(Path(path).parent) not in mount_dirs:
            f.add("ConfigMap agent", f"agent.toml tls.{key} is not under a mounted folder", path)
    endpoint = dig(conf, "chain", "endpoint") or dig(env.get("GUARDIAN_AGENT_CHAIN__ENDPOINT"), "value")
    if not endpoint or not str(endpoint).startswith("ws"):
        f.add("ConfigMap agent", "the chain endpoint must be set in agent.toml or GUARDIAN_AGENT_CHAIN__ENDPOINT")


def configmap_data(objs: list[dict[str, Any]], comp: str, key: str, f: Failures) -> str | None:
    for cm in of_kind(objs, "ConfigMap"):
        if component(cm) == comp and key in (cm.get("data") or {}):
            return cm["data"][key]
    f.add(f"ConfigMap {comp}", f"no ConfigMap with {key}")
    return None


def check_server(objs: list[dict[str, Any]], values: dict[str, Any], f: Failures) -> None:
    deployments = of_kind(objs, "Deployment")
    if len(deployments) != 1:
        f.add("Deployment", "exactly one server Deployment expected", str(len(deployments)))
        return
    dep = deployments[0]
    where = ident(dep)
    server = values["server"]
    if dep["spec"].get("replicas") != server["replicas"]:
        f.add(where, "replicas must follow server.replicas")
    check_strategy(dep, server["replicas"], f)
    spec = pod_spec(dep) or {}
    container = (spec.get("containers") or [{}])[0]
    if container.get("command", [])[:1] + container.get("args", []) != [
        "guardian-server", "--config", "/etc/guardian/server.toml"
    ]:
        f.add(where, "must run guardian-server --config /etc/guardian/server.toml")
    want_ports = {"grpc": 7443, "admin": 7444}
    if server["web"]["enabled"]:
        want_ports["web"] = 7446
    ports = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
    if ports != want_ports:
        f.add(where, f"container ports must be {want_ports}", str(ports))
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = dig(container, probe, "httpGet") or {}
        if get.get("path") != path or get.get("port") not in ("admin", 7444):
            f.add(where, f"{probe} must be HTTP GET {path} on the admin port", str(get))
    if spec.get("serviceAccountName") != f"{RELEASE}-taonode-guardian-server":
        f.add(where, "must run as the server's ServiceAccount")
    for env in container.get("env") or []:
        if dig(env, "valueFrom", "secretKeyRef") and env.get("name") != "GUARDIAN_SERVER_LEDGER_URL":
            f.add(where, "only the ledger URL may come from a Secret as env", env.get("name"))
    services = [s for s in of_kind(objs, "Service") if component(s) == "server"]
    if len(services) != 1:
        f.add("Service", "exactly one server Service expected")
    else:
        got = {p.get("name"): p.get("port") for p in services[0]["spec"].get("ports") or []}
        if got != want_ports:
            f.add(ident(services[0]), f"ports must be {want_ports}", str(got))

    toml_text = configmap_data(objs, "server", "server.toml", f)
    if toml_text is None:
        return
    try:
        conf = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as error:
        f.add("ConfigMap server", "server.toml does not parse", str(error))
        return
    if conf.get("listen") != "0.0.0.0:7443" or conf.get("admin_listen") != "0.0.0.0:7444":
        f.add("ConfigMap server", "listen must be 0.0.0.0:7443 and admin_listen 0.0.0.0:7444 in the pod")
    # Several replicas: one active server, the others standbys waiting for the ledger's lock
    # (without standby = true they would exit "locked" and crash-loop). One replica: no standby.
    if server["replicas"] > 1 and conf.get("standby") is not True:
        f.add("ConfigMap server", "server.toml must set standby = true when server.replicas > 1", repr(conf.get("standby")))
    if server["replicas"] <= 1 and conf.get("standby", False) is not False:
        f.add("ConfigMap server", "server.toml must not set standby = true with one replica", repr(conf.get("standby")))
    if server["ledger"]["existingSecret"]:
        env = {e.get("name"): e for e in container.get("env") or []}
        if not dig(env.get("GUARDIAN_SERVER_LEDGER_URL"), "valueFrom", "secretKeyRef"):
            f.add(where, "ledger.existingSecret must reach the server as GUARDIAN_SERVER_LEDGER_URL")
    elif conf.get("ledger_url") != server["ledger"]["url"]:
        f.add("ConfigMap server", "ledger_url must follow server.ledger.url")
    if dig(conf, "kubernetes", "clusters", server["config"]["clusterName"], "in_cluster") is not True:
        f.add("ConfigMap server", "the release's cluster must be in_cluster = true")
    web = conf.get("web")
    if server["web"]["enabled"]:
        if not web or web.get("listen") != "0.0.0.0:7446":
            f.add("ConfigMap server", "server.web.enabled must write [web] listen = 0.0.0.0:7446", repr(web))
        elif web.get("token_sha256") != server["web"]["tokenSha256"] or web.get("client_certificates") != server["web"]["clientCertificates"]:
            f.add("ConfigMap server", "[web] must follow server.web.tokenSha256 and clientCertificates", repr(web))
    elif web:
        f.add("ConfigMap server", "[web] written although server.web.enabled is false", repr(web))
    if dig(conf, "reconcile", "dry_run") != server["config"]["dryRun"]:
        f.add("ConfigMap server", "reconcile.dry_run must follow server.config.dryRun")
    mounts = {m.get("mountPath") for m in container.get("volumeMounts") or []}
    for key in ("ca_file", "cert_file", "key_file"):
        if str(Path(dig(conf, "tls", key, default="")).parent) not in mounts:
            f.add("ConfigMap server", f"server.toml tls.{key} is not under a mounted folder")
    signing = conf.get("command_signing_key_file")
    if bool(signing) != bool(server["commandSigning"]["existingSecret"]):
        f.add("ConfigMap server", "command_signing_key_file must be set exactly when commandSigning.existingSecret is")
    if signing:
        volume = find_volume(spec, "signing")
        if not dig(volume, "secret", "secretName") or str(Path(signing).parent) not in mounts:
            f.add(where, "the command-signing key must be a Secret volume mounted as a file")


def resolve_int_or_percent(value: Any, replicas: int, round_up: bool) -> int | None:
    """A Deployment's maxSurge (rounded up) or maxUnavailable (rounded down) in pods."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"(\d+)%", str(value))
    if not match:
        return None
    scaled = int(match.group(1)) * replicas
    return -(-scaled // 100) if round_up else scaled // 100


def check_strategy(dep: dict[str, Any], replicas: int, f: Failures) -> None:
    """One replica: Recreate. Several (one active, the rest standbys that are never Ready while
    the active one lives): RollingUpdate with maxSurge 0 and maxUnavailable covering every
    replica. The Deployment controller scales old pods down only while
    available > replicas - maxUnavailable; with standbys at most one pod is ever available, and
    no new pod can become Ready before the old active one stops, so any smaller maxUnavailable
    (1 included) stalls the rollout with the old leader still running."""
    where = ident(dep)
    strategy = dig(dep, "spec", "strategy") or {}
    kind = strategy.get("type", "RollingUpdate")
    if replicas <= 1:
        if kind != "Recreate":
            f.add(where, "strategy must be Recreate with one replica (the old pod must let go of "
                  "the ledger before the new one starts)", kind)
        return
    if kind != "RollingUpdate":
        f.add(where, "strategy must be RollingUpdate with several replicas (new pods wait as standbys)", kind)
        return
    rolling = strategy.get("rollingUpdate") or {}
    surge = resolve_int_or_percent(rolling.get("maxSurge", "25%"), replicas, round_up=True)
    unavailable = resolve_int_or_percent(rolling.get("maxUnavailable", "25%"), replicas, round_up=False)
    if surge != 0:
        f.add(where, "rollingUpdate.maxSurge must be 0 with standbys", repr(rolling.get("maxSurge")))
    if unavailable is None or unavailable < replicas:
        f.add(where, "rollingUpdate.maxUnavailable must be 100% with standbys: below it the rollout "
              "waits forever for a standby to become Ready while the old leader holds the lock",
              f"{rolling.get('maxUnavailable')!r} = {unavailable} of {replicas} pods")


def check_network_policies(objs: list[dict[str, Any]], values: dict[str, Any], f: Failures) -> None:
    policies = {component(p): p for p in of_kind(objs, "NetworkPolicy")}
    if not values["networkPolicy"]["enabled"]:
        if policies:
            f.add("NetworkPolicy", "rendered although networkPolicy.enabled is false")
        return
    server = policies.get("server")
    if not server:
        f.add("NetworkPolicy", "no server NetworkPolicy")
    else:
        rules = dig(server, "spec", "ingress", default=[])
        seen = {}
        for rule in rules:
            for port in rule.get("ports") or []:
                seen[port.get("port")] = rule.get("from")
        open_anywhere = {7443, 7446} if values["server"]["web"]["enabled"] else {7443}
        if set(seen) != open_anywhere | {7444}:
            f.add(ident(server), f"server ingress must open exactly {sorted(open_anywhere | {7444})}", str(sorted(seen)))
        for port in open_anywhere:
            if seen.get(port):
                f.add(ident(server), f"{port} must be open to agents and operators anywhere")
        if not seen.get(7444) or not all("namespaceSelector" in peer for peer in seen.get(7444) or []):
            f.add(ident(server), "7444 must be open only to selected namespaces")
    if values["agent"]["enabled"]:
        agent = policies.get("agent")
        if not agent:
            f.add("NetworkPolicy", "no agent NetworkPolicy")
            return
        if set(dig(agent, "spec", "policyTypes", default=[])) != {"Ingress", "Egress"} or dig(agent, "spec", "ingress"):
            f.add(ident(agent), "the agent must deny all ingress and restrict egress")
        ports = set()
        for rule in dig(agent, "spec", "egress", default=[]):
            for port in rule.get("ports") or []:
                ports.add((port.get("port"), port.get("protocol", "TCP")))
        want = {(7443, "TCP"), (53, "UDP"), (53, "TCP"), (values["agent"]["chain"]["rpcPort"], "TCP")}
        if ports != want:
            f.add(ident(agent), "agent egress must be exactly server 7443, DNS 53 and the subtensor RPC", str(sorted(ports)))


def check_cert_manager(objs: list[dict[str, Any]], values: dict[str, Any], f: Failures) -> None:
    cm_objs = [o for o in objs if str(o.get("apiVersion", "")).startswith("cert-manager.io/")]
    if not values["certManager"]["enabled"]:
        if cm_objs:
            f.add(ident(cm_objs[0]), "cert-manager objects rendered although certManager.enabled is false")
        return
    issuers = {o["metadata"]["name"] for o in of_kind(objs, "Issuer")}
    for issuer in of_kind(objs, "Issuer"):
        if not dig(issuer, "spec", "ca", "secretName"):
            f.add(ident(issuer), "the CA Issuer needs spec.ca.secretName")
    certs = of_kind(objs, "Certificate")
    server_host = f"{RELEASE}-taonode-guardian-server.{NAMESPACE}.svc"
    kinds = {"server": 0, "agent": 0, "operator": 0}
    for cert in certs:
        where = ident(cert)
        spec = cert.get("spec") or {}
        for key in ("secretName", "issuerRef", "usages", "privateKey"):
            if not spec.get(key):
                f.add(where, f"Certificate needs spec.{key}")
        ref = spec.get("issuerRef") or {}
        if ref.get("kind") == "Issuer" and ref.get("name") not in issuers:
            f.add(where, "issuerRef names no Issuer of this chart", str(ref))
        comp = component(cert)
        uris = spec.get("uris") or []
        if comp == "server":
            kinds["server"] += 1
            if server_host not in (spec.get("dnsNames") or []) or "server auth" not in spec.get("usages", []):
                f.add(where, f"the server Certificate must carry {server_host} and server auth")
        elif comp == "agent":
            kinds["agent"] += 1
            node = [u for u in uris if u.startswith("spiffe://taonode-guardian/node/")]
            if len(node) != 1 or not all(
                u.startswith(("spiffe://taonode-guardian/node/", "spiffe://taonode-guardian/network/")) for u in uris
            ):
                f.add(where, "an agent Certificate carries one spiffe://taonode-guardian/node/<id> URI (and network)", str(uris))
            if "client auth" not in spec.get("usages", []):
                f.add(where, "an agent Certificate must allow client auth")
        elif comp == "operator":
            kinds["operator"] += 1
            if len(uris) != 1 or not uris[0].startswith("spiffe://taonode-guardian/operator/"):
                f.add(where, "an operator Certificate carries one spiffe://taonode-guardian/operator/<name> URI", str(uris))
        else:
            f.add(where, "Certificate without a server/agent/operator component label")
    want = {
        "server": 1,
        "agent": len(values["certManager"]["agentCertificates"]["nodes"]),
        "operator": len(values["certManager"]["operators"]),
    }
    if kinds != want:
        f.add("Certificate", "one server Certificate, one per listed node and operator", f"{kinds} != {want}")
    secret = dig(pod_spec(of_kind(objs, "Deployment")[0]) if of_kind(objs, "Deployment") else {}, "volumes")
    tls = [v for v in secret or [] if v.get("name") == "tls"]
    server_certs = [c for c in certs if component(c) == "server"]
    if tls and server_certs and dig(tls[0], "secret", "secretName") != server_certs[0]["spec"].get("secretName"):
        f.add("Deployment", "the server's TLS volume must be the server Certificate's Secret")


def check_crd(chart: Any, f: Failures) -> None:
    if not CRD_COPY.is_file() or CRD_COPY.read_bytes() != CRD_SOURCE.read_bytes():
        f.add(
            str(CRD_COPY.relative_to(ROOT)),
            f"must be a byte-for-byte copy of {CRD_SOURCE.relative_to(ROOT)}",
            f"cp {CRD_SOURCE.relative_to(ROOT)} {CRD_COPY.relative_to(ROOT)}",
        )
    names = [c.get("name") for c in chart.crds]
    if not any(str(n).endswith("taonodes.yaml") for n in names):
        f.add("chart", "Helm does not load crds/taonodes.yaml", str(names))


def check_all(objs: list[dict[str, Any]], values: dict[str, Any]) -> Failures:
    f = Failures()
    check_labels(objs, f)
    check_pods(objs, f)
    check_rbac(objs, f)
    check_server(objs, values, f)
    if values["agent"]["enabled"]:
        check_agent(objs, values, f)
    check_network_policies(objs, values, f)
    check_cert_manager(objs, values, f)
    return f


# ---------------------------------------------------------------------------------------
# The real binaries read the generated TOML (when scripts/test built them)


def check_with_binaries(objs: list[dict[str, Any]], label: str, tmp: Path, f: Failures) -> str:
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug"
    agent_bin, server_bin = target / "guardian-agent", target / "guardian-server"
    if not (agent_bin.is_file() and server_bin.is_file()):
        return "skipped (target/debug/guardian-{agent,server} not built)"
    base_env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp)}
    for comp, binary, key, env in (
        ("agent", agent_bin, "agent.toml", {"GUARDIAN_AGENT_NODE_ID": "node-from-env"}),
        ("server", server_bin, "server.toml", {}),
    ):
        text = configmap_data(objs, comp, key, f)
        if text is None:
            continue
        path = tmp / f"{label}-{key}"
        path.write_text(text)
        proc = subprocess.run(
            [str(binary), "--config", str(path), "--print-config"],
            env={**base_env, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0:
            f.add(f"ConfigMap {comp} [{label}]", f"{binary.name} rejects the generated {key}", proc.stderr.strip())
        elif comp == "agent" and 'node_id = "node-from-env"' not in proc.stdout:
            f.add(f"ConfigMap agent [{label}]", "GUARDIAN_AGENT_NODE_ID does not set node_id")
    return "guardian-agent and guardian-server --print-config accept the generated TOML"


# ---------------------------------------------------------------------------------------
# Proof that the assertions can fail


def mutations() -> list[tuple[str, str, str, Callable[[list[dict[str, Any]]], None]]]:
    """(value set, name, text the finding must contain, mutation of the rendered objects)."""

    def container(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
        return pod_spec(of_kind(objs, kind)[0])["containers"][0]

    def rule(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return of_kind(objs, "ClusterRole")[0]["rules"]

    def writable_proc(objs: list[dict[str, Any]]) -> None:
        for m in container(objs, "DaemonSet")["volumeMounts"]:
            if m["name"] == "host-proc":
                m["readOnly"] = False

    def server_toml(objs: list[dict[str, Any]], old: str, new: str) -> None:
        for cm in of_kind(objs, "ConfigMap"):
            if "server.toml" in cm["data"]:
                if old not in cm["data"]["server.toml"]:
                    raise KeyError(f"{old!r} not in server.toml")
                cm["data"]["server.toml"] = cm["data"]["server.toml"].replace(old, new)

    def namespaced(objs: list[dict[str, Any]], kind: str, **body: Any) -> None:
        meta = copy.deepcopy(of_kind(objs, "ClusterRole")[0]["metadata"])
        meta.update(name=meta["name"] + "-leader-election", namespace=NAMESPACE)
        objs.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta, **body})

    def rolling(objs: list[dict[str, Any]], **fields: Any) -> None:
        of_kind(objs, "Deployment")[0]["spec"]["strategy"]["rollingUpdate"].update(fields)

    server_sa = {"kind": "ServiceAccount", "name": f"{RELEASE}-taonode-guardian-server", "namespace": NAMESPACE}
    checks = [
        ("writable root filesystem", "readOnlyRootFilesystem",
         lambda o: container(o, "Deployment")["securityContext"].update(readOnlyRootFilesystem=False)),
        ("privilege escalation", "allowPrivilegeEscalation",
         lambda o: container(o, "DaemonSet")["securityContext"].pop("allowPrivilegeEscalation")),
        ("capabilities kept", "capabilities.drop",
         lambda o: container(o, "Deployment")["securityContext"]["capabilities"].update(drop=["NET_RAW"])),
        ("seccomp unconfined", "seccompProfile",
         lambda o: container(o, "DaemonSet")["securityContext"].update(seccompProfile={"type": "Unconfined"})),
        ("no memory limit", "resources.limits.memory",
         lambda o: container(o, "Deployment")["resources"]["limits"].pop("memory")),
        ("image by tag", "pinned by digest",
         lambda o: container(o, "DaemonSet").update(image="guardian-agent:latest")),
        ("secrets readable", "secrets",
         lambda o: rule(o).append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]})),
        ("wildcard verb", "wildcard",
         lambda o: rule(o)[0].update(verbs=["*"])),
        ("PVC deletable", "persistentvolumeclaims",
         lambda o: rule(o).append({"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["delete"]})),
        ("verb dropped", "exactly the server's verbs",
         lambda o: rule(o)[0].update(verbs=["get", "list"])),
        ("writable host /proc", "mounted readOnly",
         writable_proc),
        ("NODE_NAME missing", "NODE_NAME",
         lambda o: container(o, "DaemonSet").update(
             env=[e for e in container(o, "DaemonSet")["env"] if e["name"] != "NODE_NAME"])),
        ("agent token mounted", "automountServiceAccountToken",
         lambda o: pod_spec(of_kind(o, "DaemonSet")[0]).update(automountServiceAccountToken=True)),
        ("admin port loopback", "admin_listen",
         lambda o: server_toml(o, '0.0.0.0:7444', '127.0.0.1:7444')),
        # Failover is the ledger's lock: no namespaced RBAC at all.
        ("a Role granting leases", "no Role or RoleBinding",
         lambda o: namespaced(o, "Role", rules=[{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                                                 "verbs": ["get", "create", "update"]}])),
        ("a RoleBinding to a ClusterRole", "no Role or RoleBinding",
         lambda o: namespaced(o, "RoleBinding", subjects=[server_sa], roleRef={
             "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"})),
        ("standby with one replica", "must not set standby = true",
         lambda o: server_toml(o, "standby = false", "standby = true")),
        ("RollingUpdate with one replica", "must be Recreate with one replica",
         lambda o: of_kind(o, "Deployment")[0]["spec"].update(strategy={"type": "RollingUpdate"})),
    ]
    # The production set: 3 replicas on PostgreSQL, one active and two standbys.
    standbys = [
        ("no standby with 3 replicas", "standby = true when server.replicas > 1",
         lambda o: server_toml(o, "standby = true", "standby = false")),
        ("maxUnavailable 1 with standbys", "maxUnavailable must be 100%",
         lambda o: rolling(o, maxUnavailable=1)),
        ("maxSurge 1 with standbys", "maxSurge must be 0",
         lambda o: rolling(o, maxSurge=1)),
        ("RollingUpdate with the defaults (25%/25%)", "maxUnavailable must be 100%",
         lambda o: of_kind(o, "Deployment")[0]["spec"].update(strategy={"type": "RollingUpdate"})),
        ("standby Ready on /healthz", "readinessProbe must be HTTP GET /readyz",
         lambda o: container(o, "Deployment")["readinessProbe"]["httpGet"].update(path="/healthz")),
    ]
    return [("default", *c) for c in checks] + [("production", *c) for c in standbys]


def prove_assertions_fail(
    objs: list[dict[str, Any]], values: dict[str, Any], label: str, tmp: Path, f: Failures
) -> int:
    proven = 0
    for value_set, name, expect, mutate in mutations():
        if value_set != label:
            continue
        broken = copy.deepcopy(objs)
        try:
            mutate(broken)
        except (IndexError, KeyError, TypeError) as error:
            f.add("check_chart.py self-test", f"mutation {name!r} [{label}] no longer applies (update it)", repr(error))
            continue
        caught = check_all(broken, values).items
        if any(expect in item for item in caught):
            proven += 1
        else:
            f.add("check_chart.py self-test", f"mutation {name!r} [{label}] was not caught (expected a failure about {expect})", str(caught))
    if label != "default":
        return proven
    # The schema check must reject an unknown field too.
    bad = copy.deepcopy(of_kind(objs, "Deployment")[0])
    bad["spec"]["template"]["spec"]["containers"][0]["badField"] = True
    path = tmp / "bad-deployment.yaml"
    path.write_text(yaml.safe_dump(bad))
    rc, lines = kubernetes_validate_cli([path])
    if rc != 0 and any("badField" in line for line in lines):
        proven += 1
    else:
        f.add("check_chart.py self-test", "kubernetes-validate --strict accepted an unknown field", "\n".join(lines))
    return proven


# ---------------------------------------------------------------------------------------


def failover_summary(objs: list[dict[str, Any]], label: str) -> str:
    dep = (of_kind(objs, "Deployment") or [{}])[0]
    strategy = dig(dep, "spec", "strategy") or {}
    shape = strategy.get("type", "?")
    if strategy.get("rollingUpdate"):
        shape += " " + "/".join(f"{k} {v}" for k, v in strategy["rollingUpdate"].items())
    standby = None
    for cm in of_kind(objs, "ConfigMap"):
        if "server.toml" in (cm.get("data") or {}):
            try:
                standby = tomllib.loads(cm["data"]["server.toml"]).get("standby")
            except tomllib.TOMLDecodeError:
                pass
    namespaced = len(of_kind(objs, "Role") + of_kind(objs, "RoleBinding"))
    rbac = f"{namespaced} Role/RoleBinding" if namespaced else "no Role/RoleBinding"
    return f"{label}: {dig(dep, 'spec', 'replicas')} replica(s), {shape}, standby = {str(standby).lower()}, {rbac}"


def main() -> int:
    started = time.monotonic()
    failures = Failures()
    chart = helm_chart.Chart.load(str(CHART))
    defaults = chart.values
    rendered_total = validated_total = 0
    skipped_all: list[str] = []
    binaries_note = ""
    lint_warnings = lint_messages = 0
    proven = 0
    failover: list[str] = []
    with tempfile.TemporaryDirectory(prefix="check-chart-") as tmpdir:
        tmp = Path(tmpdir)
        files: list[Path] = []
        for label, values in VALUE_SETS.items():
            merged = chart.merge_values(values)
            try:
                manifests = render(chart, values)
            except Exception as error:  # noqa: BLE001 - any render error is a finding
                failures.add(f"helm render [{label}]", "render failed", str(error))
                continue
            objs = objects_of(manifests)
            rendered_total += len(objs)
            (tmp / label).mkdir()
            (tmp / label / "rendered.yaml").write_text("\n---\n".join(manifests.values()))
            written, skipped = write_objects(objs, tmp / label / "objects")
            files += written
            skipped_all += [f"{s} [{label}]" for s in skipped]
            w, m = lint(values, label, failures)
            lint_warnings += w
            lint_messages += m
            for item in check_all(objs, merged).items:
                failures.items.append(f"[{label}] {item}")
            binaries_note = check_with_binaries(objs, label, tmp, failures)
            failover.append(failover_summary(objs, label))
            if label in ("default", "production"):
                proven += prove_assertions_fail(objs, merged, label, tmp, failures)
        # The chart's CRD (crds/ is not rendered by templates) goes through the schemas too.
        crd_files, _ = write_objects([yaml.safe_load(c["data"]) for c in chart.crds], tmp / "crds")
        files += crd_files
        validated_total = len(files)
        validate_schemas(files, failures)
        check_crd(chart, failures)
        permissions = check_rust_permissions([], failures)
        for label, (values, message) in MUST_FAIL.items():
            try:
                render(chart, values)
                failures.add(f"helm render [{label}]", "must fail to render but rendered")
            except Exception as error:  # noqa: BLE001
                if message not in str(error):
                    failures.add(f"helm render [{label}]", f"failed without the expected message {message!r}", str(error))

    print(
        f"check-chart: helm-python-sdk {helm_python.__version__} (Helm {helm_python.helm_sdk_version()}), "
        f"kubernetes-validate {kubernetes_validate.__version__} (schemas {KUBE_VERSION}, strict), "
        f"Python {sys.version.split()[0]}"
    )
    print(f"  value sets: {', '.join(VALUE_SETS)}; default values: server replicas {defaults['server']['replicas']}")
    print(f"  rendered {rendered_total} objects; {validated_total} validated against the Kubernetes {KUBE_VERSION} schemas "
          f"(CRD included)")
    print(f"  not schema-validated (no bundled schema; checked in Python): {len(skipped_all)} cert-manager objects")
    print(f"  helm lint: {lint_messages} messages, {lint_warnings} warnings")
    print(f"  ClusterRole covers the {permissions} permissions in server/src/actuate/kubernetes/cluster.rs")
    print(f"  failover: {'; '.join(failover)}")
    print(f"  binaries: {binaries_note}")
    print(f"  self-test: {proven} known-bad variants caught; {len(MUST_FAIL)} bad value sets refused")
    print(f"  {time.monotonic() - started:.1f} s")
    if failures.items:
        print(f"check-chart: FAILED, {len(failures.items)} finding(s):", file=sys.stderr)
        for item in failures.items:
            print(f"  - {item}", file=sys.stderr)
        return 1
    print("check-chart: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
