#!/usr/bin/env python3
"""Checks the Kyverno admission policies in deploy/policy/ without a cluster.

Run through `bash scripts/check-policy`, which makes the pinned virtualenv this needs. No Kyverno
engine installs from the package registries this project reaches (the kyverno CLI is a Go binary
published on GitHub only), so the policies are checked in two halves instead:

1. shape: each policy against Kyverno's published ClusterPolicy CRD schema (the kyverno.io/v1
   openAPIV3Schema of Kyverno v1.19.0, converted to a strict JSON Schema and vendored as
   tests/fixtures/policy/kyverno-clusterpolicy-v1.schema.json), plus the programmatic checks
   Kyverno's webhook makes on the rule types used here (one operation per rule, rule names and
   their autogen names at most 63 characters, the verifyImages attestor rules);
2. behaviour: the rules exactly as Kyverno runs them. Kyverno's autogen is reproduced (its
   textual `object.spec` rewrite for pod controllers and CronJob, pkg/autogen/v1), the match
   block is applied (kinds, namespaces, operations), and every validate.cel variable and
   expression is compiled and evaluated with two independent CEL implementations, which must
   agree: cel-expr-python (the CEL team's C++ runtime, type-checked with `object` as dyn, as
   Kubernetes compiles it) and cel-python (celpy, pure Python). The inputs:
   - every object the Helm chart renders with check_chart.py's value sets: each must pass;
   - chart value sets that must be refused (a root agent, an image from another registry);
   - tests/fixtures/policy/good/*.yaml: must pass (other-namespace.yaml: must match no rule);
   - tests/fixtures/policy/bad/*.yaml: each must fail exactly the rules its annotation
     policy.taonode.io/expect-fail names (policy/rule, comma-separated), by a false expression,
     never by an evaluation error;
   - coverage: for each rule, a violation planted in containers, initContainers and
     ephemeralContainers in turn (Pod, Deployment, CronJob) must fail exactly that rule.
   image-signatures.yaml (verifyImages) needs the registry and the key, so only its shape and
   its matching are checked here.
3. self-tests: the schema refuses known-bad policy edits, and --release fills the placeholders.

`--release` writes the policies with the release's registry, public key and namespaces filled
in (README.md in deploy/policy says how); `--regenerate-schema CRD.yaml` rebuilds the vendored
schema from a Kyverno CRD file. Prints one line per check and `policy: N passed, M failed`;
exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import importlib.metadata
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import yaml
import jsonschema

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import check_chart  # noqa: E402  (the chart's value sets, render and YAML split)

POLICY_DIR = ROOT / "deploy/policy"
FIXTURES = ROOT / "tests/fixtures/policy"
SCHEMA_FILE = FIXTURES / "kyverno-clusterpolicy-v1.schema.json"
TEST_KEY = FIXTURES / "test-release-ed25519.pub"

# The placeholders the release fills (deploy/policy/README.md).
REGISTRY_PLACEHOLDER = "registry.example.com/taonode-guardian/"
KEY_PLACEHOLDER = "RELEASE-PUBLIC-KEY-PLACEHOLDER"
DEFAULT_NAMESPACES = ["taonode-guardian"]

EXPECT_FAIL = "policy.taonode.io/expect-fail"
EXPECT_MATCHED = "policy.taonode.io/expect-matched"
AUTOGEN_ANNOTATION = "pod-policies.kyverno.io/autogen-controllers"

# Kyverno pkg/autogen/v1: the kinds and GVKs autogen writes, and its textual rewrites.
POD_CONTROLLERS = ["DaemonSet", "Deployment", "Job", "ReplicaSet", "ReplicationController", "StatefulSet"]
GVK = {
    "DaemonSet": "apps/v1/DaemonSet", "Deployment": "apps/v1/Deployment", "Job": "batch/v1/Job",
    "StatefulSet": "apps/v1/StatefulSet", "ReplicaSet": "apps/v1/ReplicaSet",
    "ReplicationController": "v1/ReplicationController", "CronJob": "batch/v1/CronJob", "Pod": "v1/Pod",
}
POD_CEL_REWRITE = [
    ("object.spec", "object.spec.template.spec"), ("oldObject.spec", "oldObject.spec.template.spec"),
    ("object.metadata", "object.spec.template.metadata"), ("oldObject.metadata", "oldObject.spec.template.metadata"),
]
CRONJOB_CEL_REWRITE = [
    ("object.spec", "object.spec.jobTemplate.spec.template.spec"),
    ("oldObject.spec", "oldObject.spec.jobTemplate.spec.template.spec"),
    ("object.metadata", "object.spec.jobTemplate.spec.template.metadata"),
    ("oldObject.metadata", "oldObject.spec.jobTemplate.spec.template.metadata"),
]
POD_REWRITE = [(f"request.{a}", f"request.{b}") for a, b in POD_CEL_REWRITE]
CRONJOB_REWRITE = [(f"request.{a}", f"request.{b}") for a, b in CRONJOB_CEL_REWRITE]
SIGNATURE_ALGORITHMS = {"", "sha224", "sha256", "sha384", "sha512"}

# Rules whose container variable leaves ephemeralContainers out, and why (pod-security.yaml).
EPHEMERAL_EXEMPT = {"resource-limits": "the API server refuses resources on ephemeral containers"}

DIGEST = "sha256:" + "ab" * 32
# For the coverage checks: a violation of each rule planted in one container.
VIOLATIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "run-as-non-root": lambda c: c.setdefault("securityContext", {}).update(runAsNonRoot=False, runAsUser=0),
    "read-only-root-filesystem": lambda c: c.setdefault("securityContext", {}).update(readOnlyRootFilesystem=False),
    "no-privilege-escalation": lambda c: c.setdefault("securityContext", {}).update(allowPrivilegeEscalation=True),
    "drop-all-capabilities": lambda c: c.setdefault("securityContext", {}).update(capabilities={"drop": ["NET_RAW"]}),
    "seccomp-profile": lambda c: c.setdefault("securityContext", {}).update(seccompProfile={"type": "Unconfined"}),
    "resource-limits": lambda c: c.get("resources", {}).pop("limits", None),
    "image-registry": lambda c: c.update(image=f"docker.io/library/busybox@{DIGEST}"),
    "image-digest": lambda c: c.update(image=f"{REGISTRY_PLACEHOLDER}guardian-server:v1"),
}

# Chart values that must render but be refused at admission: (values, {kind: rules it fails}).
CHART_MUST_REFUSE: dict[str, tuple[dict[str, Any], dict[str, set[str]]]] = {
    "root agent (agent.runAsUser: 0)": (
        {"agent": {"runAsUser": 0}},
        {"DaemonSet": {"taonode-guardian-pod-security/run-as-non-root"}},
    ),
    "server image from another registry": (
        {"server": {"image": {"repository": "docker.io/taonode/guardian-server"}}},
        {"Deployment": {"taonode-guardian-images/image-registry"}},
    ),
}


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed: list[str] = []

    def ok(self, what: str) -> None:
        self.passed += 1
        print(f"ok    {what}")

    def fail(self, what: str, why: str) -> None:
        self.failed.append(f"{what}: {why}")
        print(f"FAIL  {what}: {why}")

    def check(self, condition: bool, what: str, why: str) -> bool:
        (self.ok(what) if condition else self.fail(what, why))
        return condition


# ---------------------------------------------------------------------------------------
# Kyverno's CRD schema, as strict JSON Schema


def crd_to_json_schema(crd: dict[str, Any], version: str, source: str) -> dict[str, Any]:
    """The openAPIV3Schema of one CRD version as a strict JSON Schema (draft 2020-12).

    Descriptions are dropped; `additionalProperties: false` is added wherever `properties` are
    listed without x-kubernetes-preserve-unknown-fields (the API server prunes or, with
    kubectl's strict field validation, refuses unknown fields); x-kubernetes-int-or-string
    becomes integer-or-string, nullable adds null; other x-kubernetes-* markers are dropped.
    """
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]

    def convert(node: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "description" or key.startswith("x-kubernetes-"):
                continue
            if key == "properties":  # a map of name -> schema
                out[key] = {name: convert(sub) for name, sub in value.items()}
            elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, dict)):
                out[key] = convert(value)
            elif key in ("allOf", "anyOf", "oneOf"):
                out[key] = [convert(sub) for sub in value]
            else:
                out[key] = copy.deepcopy(value)
        if node.get("x-kubernetes-int-or-string"):
            out.pop("type", None)
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if out.pop("nullable", False) and "type" in out:
            out["type"] = [out["type"], "null"]
        if (
            "properties" in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
            and "additionalProperties" not in node
        ):
            out["additionalProperties"] = False
        return out

    out = convert(schema)
    group = crd["spec"]["group"]
    out["properties"]["apiVersion"] = {"const": f"{group}/{version}"}
    out["properties"]["kind"] = {"const": crd["spec"]["names"]["kind"]}
    # The CRD leaves metadata to the API server's ObjectMeta; a cluster-scoped policy needs a name.
    out["properties"]["metadata"] = {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"}},
    }
    out["required"] = sorted(set(out.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": (
            "Generated by scripts/check_policy.py --regenerate-schema from the CRD named in "
            f"x-source, spec.versions[name={version}].schema.openAPIV3Schema: descriptions dropped, "
            "additionalProperties: false where properties are listed without "
            "x-kubernetes-preserve-unknown-fields, apiVersion/kind pinned, metadata.name required."
        ),
        "x-source": source,
        **out,
    }


def load_schema() -> tuple[dict[str, Any], jsonschema.protocols.Validator]:
    schema = json.loads(SCHEMA_FILE.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return schema, cls(schema)


def schema_errors(validator: Any, policy: dict[str, Any]) -> list[str]:
    errors = sorted(validator.iter_errors(policy), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message[:200]}" for e in errors]


# ---------------------------------------------------------------------------------------
# Kyverno's programmatic policy checks (api/kyverno/v1 Validate, pkg/validation/policy),
# for the rule types these policies use


def kyverno_checks(policy: dict[str, Any]) -> list[str]:
    errs: list[str] = []
    rules = policy.get("spec", {}).get("rules") or []
    names = [r.get("name", "") for r in rules]
    if len(set(names)) != len(names):
        errs.append(f"duplicate rule names {names}")
    for rule in rules:
        name = rule.get("name", "")
        for prefix in ("", "autogen-", "autogen-cronjob-"):
            if len(prefix + name) > 63:
                errs.append(f"rule {name}: {prefix}{name} is over 63 characters (Kyverno truncates autogen names)")
        ops = [k for k in ("mutate", "validate", "generate", "verifyImages") if rule.get(k)]
        if len(ops) != 1:
            errs.append(f"rule {name}: exactly one of mutate/validate/generate/verifyImages, got {ops}")
        validate = rule.get("validate") or {}
        kinds = [k for k in ("pattern", "anyPattern", "deny", "foreach", "podSecurity", "cel", "assert", "manifests")
                 if validate.get(k) is not None]
        if validate and len(kinds) != 1:
            errs.append(f"rule {name}: validate needs exactly one of pattern/anyPattern/deny/foreach/podSecurity/cel, got {kinds}")
        if validate.get("cel") is not None and rule.get("context"):
            errs.append(f"rule {name}: context variables are not supported for CEL expressions in validate rules")
        if validate and validate.get("failureAction") != "Enforce":
            errs.append(f"rule {name}: validate.failureAction must be Enforce (these policies refuse, not audit)")
        for i, iv in enumerate(rule.get("verifyImages") or []):
            where = f"rule {name} verifyImages[{i}]"
            audit = iv.get("failureAction", "Audit") == "Audit"
            if audit:
                errs.append(f"{where}: failureAction must be Enforce")
            if audit and iv.get("mutateDigest", True):
                errs.append(f"{where}: mutateDigest must be set to false for 'Audit' failure action")
            if not iv.get("imageReferences"):
                errs.append(f"{where}: an image reference is required")
            if not iv.get("required", True) or not iv.get("verifyDigest", True):
                errs.append(f"{where}: required and verifyDigest must stay true")
            for j, attestor_set in enumerate(iv.get("attestors") or []):
                entries = attestor_set.get("entries") or []
                if not entries:
                    errs.append(f"{where} attestors[{j}]: an entry is required")
                if attestor_set.get("count") is not None and attestor_set["count"] > len(entries):
                    errs.append(f"{where} attestors[{j}]: count cannot exceed the number of entries")
                for k, entry in enumerate(entries):
                    present = [t for t in ("keys", "certificates", "keyless", "attestor") if entry.get(t) is not None]
                    if len(present) != 1:
                        errs.append(f"{where} attestors[{j}].entries[{k}]: exactly one of keys/certificates/keyless/attestor")
                    keys = entry.get("keys")
                    if keys is not None:
                        if not (keys.get("publicKeys") or keys.get("kms") or keys.get("secret")):
                            errs.append(f"{where} attestors[{j}].entries[{k}].keys: a public key, kms key or secret is required")
                        if keys.get("publicKeys") and keys.get("signatureAlgorithm", "sha256") not in SIGNATURE_ALGORITHMS:
                            errs.append(f"{where} attestors[{j}].entries[{k}].keys: invalid signature algorithm")
    return errs


# ---------------------------------------------------------------------------------------
# Autogen and matching, as Kyverno does them


def pod_only(rule: dict[str, Any]) -> bool:
    """Kyverno's checkAutogenSupport for one rule: plain kind lists, Pod alone when present."""
    blocks = [rule.get("match") or {}, rule.get("exclude") or {}]
    descriptions = []
    for block in blocks:
        if block.get("resources"):
            descriptions.append(block["resources"])
        descriptions += [f.get("resources") or {} for f in (block.get("any") or []) + (block.get("all") or [])]
    for d in descriptions:
        if d.get("name") or d.get("names") or d.get("selector") or d.get("annotations"):
            return False
        kinds = d.get("kinds") or []
        if len(kinds) > 1 and "Pod" in kinds:
            return False
    return True


def rewrite(rule: dict[str, Any], name: str, kinds: list[str], replacements: list[tuple[str, str]]) -> dict[str, Any]:
    out = copy.deepcopy(rule)
    out["name"] = name[:63]
    for block in [out.get("match") or {}]:
        for f in (block.get("any") or []) + (block.get("all") or []):
            if "Pod" in (f.get("resources") or {}).get("kinds", []):
                f["resources"]["kinds"] = [GVK[k] for k in kinds]
        if "Pod" in (block.get("resources") or {}).get("kinds", []):
            block["resources"]["kinds"] = [GVK[k] for k in kinds]
    text = json.dumps(out)
    for old, new in replacements:
        text = text.replace(old, new)
    return json.loads(text)


def effective_rules(policy: dict[str, Any]) -> list[dict[str, Any]]:
    """The rules Kyverno runs: the policy's own plus autogen's (pkg/autogen/v1 computeRules)."""
    rules = policy["spec"]["rules"]
    controllers = (policy["metadata"].get("annotations") or {}).get(AUTOGEN_ANNOTATION)
    if controllers == "none" or not all(pod_only(r) for r in rules):
        return rules
    wanted = set(POD_CONTROLLERS + ["CronJob"]) if controllers in (None, "all") else set(controllers.split(","))
    out = list(rules)
    for rule in rules:
        match_kinds = [k for f in (rule["match"].get("any") or []) + (rule["match"].get("all") or [])
                       for k in (f.get("resources") or {}).get("kinds", [])]
        match_kinds += (rule["match"].get("resources") or {}).get("kinds", [])
        if "Pod" not in match_kinds:
            continue
        cel = bool((rule.get("validate") or {}).get("cel"))
        ctrl = sorted(wanted - {"CronJob"})
        if ctrl:
            out.append(rewrite(rule, "autogen-" + rule["name"], ctrl, POD_CEL_REWRITE if cel else POD_REWRITE))
        if "CronJob" in wanted:
            out.append(rewrite(rule, "autogen-cronjob-" + rule["name"], ["CronJob"],
                               CRONJOB_CEL_REWRITE if cel else CRONJOB_REWRITE))
    return out


def matches(rule: dict[str, Any], obj: dict[str, Any], namespace: str, operation: str = "CREATE") -> bool:
    gvk = f"{obj.get('apiVersion')}/{obj.get('kind')}"

    def one(d: dict[str, Any]) -> bool:
        kinds = d.get("kinds") or []
        if not any(k == obj.get("kind") or k == gvk for k in kinds):
            return False
        if d.get("namespaces") and namespace not in d["namespaces"]:
            return False
        if d.get("operations") and operation not in d["operations"]:
            return False
        return True

    match = rule.get("match") or {}
    if match.get("any"):
        hit = any(one(f.get("resources") or {}) for f in match["any"])
    elif match.get("all"):
        hit = all(one(f.get("resources") or {}) for f in match["all"])
    else:
        hit = one(match.get("resources") or {})
    return hit


# ---------------------------------------------------------------------------------------
# Two CEL implementations


class CelError(Exception):
    pass


class CelCpp:
    """cel-expr-python: the CEL team's C++ runtime. Type-checked with the variables Kyverno
    declares for a validate.cel rule without params (object, oldObject, request,
    namespaceObject as dyn; variables as a map)."""

    name = "cel-expr-python"

    def __init__(self) -> None:
        from cel_expr_python import cel

        self.cel = cel
        dyn = cel.Type.DYN
        self.env = cel.NewEnv(variables={
            "object": dyn, "oldObject": dyn, "request": dyn, "namespaceObject": dyn,
            "variables": cel.Type.Map(cel.Type.STRING, dyn),
        })

    def compile(self, text: str) -> Any:
        try:
            return self.env.compile(text)
        except Exception as error:  # noqa: BLE001 - the library raises RuntimeError
            raise CelError(str(error).splitlines()[0]) from None

    def activation(self, base: dict[str, Any]) -> dict[str, Any]:
        return dict(base)

    def with_variable(self, act: dict[str, Any], name: str, value: Any) -> dict[str, Any]:
        return {**act, "variables": {**act.get("variables", {}), name: value}}

    def eval(self, program: Any, act: dict[str, Any]) -> Any:
        result = program.eval(data=act)
        if result.type() == self.cel.Type.ERROR:
            raise CelError(str(result.value()))
        return result.plain_value()

    def is_bool(self, program: Any) -> bool:
        return program.return_type() in (self.cel.Type.BOOL, self.cel.Type.DYN)


class CelPy:
    """cel-python (celpy): a pure-Python CEL interpreter, no type checker."""

    name = "cel-python"

    def __init__(self) -> None:
        import celpy
        from celpy import celtypes

        self.celpy = celpy
        self.celtypes = celtypes
        self.env = celpy.Environment()

    def compile(self, text: str) -> Any:
        try:
            return self.env.program(self.env.compile(text))
        except Exception as error:  # noqa: BLE001
            raise CelError(str(error).splitlines()[0]) from None

    def activation(self, base: dict[str, Any]) -> dict[str, Any]:
        act = {k: self.celpy.json_to_cel(v) for k, v in base.items() if k != "variables"}
        act["variables"] = self.celtypes.MapType({})
        return act

    def with_variable(self, act: dict[str, Any], name: str, value: Any) -> dict[str, Any]:
        variables = self.celtypes.MapType(dict(act["variables"]))
        variables[self.celtypes.StringType(name)] = value
        return {**act, "variables": variables}

    def eval(self, program: Any, act: dict[str, Any]) -> Any:
        try:
            result = program.evaluate(act)
        except self.celpy.CELEvalError as error:
            raise CelError(str(error.args[0] if error.args else error)) from None
        if isinstance(result, self.celpy.CELEvalError):
            raise CelError(str(result.args[0] if result.args else result))
        if isinstance(result, self.celtypes.BoolType):
            return bool(result)
        return result

    def is_bool(self, program: Any) -> bool:
        return True


class CelRule:
    """One validate.cel rule compiled on every engine."""

    def __init__(self, policy: str, rule: dict[str, Any], engines: list[Any]) -> None:
        self.policy = policy
        self.rule = rule
        self.name = rule["name"]
        self.id = f"{policy}/{self.name}"
        cel = rule["validate"]["cel"]
        self.variables = [(v["name"], v["expression"]) for v in cel.get("variables") or []]
        self.expressions = [(e["expression"], e.get("message") or rule["validate"].get("message") or "")
                            for e in cel.get("expressions") or []]
        self.engines = engines
        self.compiled: dict[str, tuple[list[Any], list[Any]]] = {}
        for engine in engines:
            variables = [engine.compile(text) for _, text in self.variables]
            expressions = [engine.compile(text) for text, _ in self.expressions]
            for (text, _), program in zip(self.expressions, expressions):
                if not engine.is_bool(program):
                    raise CelError(f"{engine.name}: expression does not return bool: {text[:80]}")
            self.compiled[engine.name] = (variables, expressions)

    def evaluate(self, obj: dict[str, Any], namespace: str) -> tuple[str, list[str]]:
        """('pass' | 'fail' | 'error', messages); both engines must agree, else 'error'."""
        base = {
            "object": obj, "oldObject": None, "namespaceObject": {"metadata": {"name": namespace}},
            "request": {"operation": "CREATE", "namespace": namespace, "name": obj["metadata"].get("name", ""),
                        "kind": {"kind": obj.get("kind")}},
        }
        outcomes: dict[str, list[str]] = {}
        for engine in self.engines:
            variables, expressions = self.compiled[engine.name]
            act = engine.activation(base)
            results: list[str] = []
            try:
                for (name, _), program in zip(self.variables, variables):
                    act = engine.with_variable(act, name, engine.eval(program, act))
            except CelError as error:
                outcomes[engine.name] = [f"error: variable: {error}"] * len(expressions)
                continue
            for program in expressions:
                try:
                    value = engine.eval(program, act)
                    results.append("pass" if value is True else "fail" if value is False else f"error: not a bool: {value!r}")
                except CelError as error:
                    results.append(f"error: {error}")
            outcomes[engine.name] = results
        first, *others = outcomes.values()
        if any(o != first for o in others):
            return "error", [f"engines disagree: {outcomes}"]
        errors = [r for r in first if r.startswith("error")]
        if errors:
            return "error", errors
        failed = [msg.strip() for r, (_, msg) in zip(first, self.expressions) if r == "fail"]
        return ("fail", failed) if failed else ("pass", [])


# ---------------------------------------------------------------------------------------
# Running the policies on objects


class Policies:
    def __init__(self, policies: dict[str, dict[str, Any]], engines: list[Any], report: Report) -> None:
        self.rules: list[tuple[str, dict[str, Any]]] = []  # (policy, effective rule)
        self.cel: dict[tuple[str, str], CelRule] = {}
        for path, policy in policies.items():
            pname = policy["metadata"]["name"]
            rules = effective_rules(policy)
            for rule in rules:
                self.rules.append((pname, rule))
            cel_rules = [r for r in rules if (r.get("validate") or {}).get("cel")]
            base = [r for r in cel_rules if not r["name"].startswith("autogen-")]
            errors = []
            for rule in cel_rules:
                try:
                    self.cel[(pname, rule["name"])] = CelRule(pname, rule, engines)
                except CelError as error:
                    errors.append(f"{rule['name']}: {error}")
            if cel_rules:
                n_expr = sum(len(r["validate"]["cel"].get("expressions") or []) for r in base)
                n_var = sum(len(r["validate"]["cel"].get("variables") or []) for r in base)
                report.check(not errors, f"cel-compile {pname}: {len(base)} rules ({len(cel_rules) - len(base)} autogen), "
                             f"{n_var} variables, {n_expr} expressions compile on {' and '.join(e.name for e in engines)}",
                             "; ".join(errors))
            else:
                autogen = [r["name"] for r in rules if r["name"].startswith("autogen-")]
                report.ok(f"autogen {pname}: {len(rules)} rules ({', '.join(autogen) or 'no autogen'}); "
                          "verifyImages needs the registry, checked by Kyverno at admission")

    def run(self, obj: dict[str, Any], namespace: str) -> tuple[list[str], dict[str, list[str]], list[str]]:
        """(rules that matched, {failed rule: messages}, [errors])."""
        matched, failed, errors = [], {}, []
        for pname, rule in self.rules:
            if not matches(rule, obj, namespace):
                continue
            rid = f"{pname}/{rule['name']}"
            matched.append(rid)
            cel_rule = self.cel.get((pname, rule["name"]))
            if cel_rule is None:
                continue  # verifyImages: Kyverno checks it against the registry
            status, messages = cel_rule.evaluate(obj, namespace)
            if status == "fail":
                failed[rid] = messages
            elif status == "error":
                errors.append(f"{rid}: {'; '.join(messages)}")
        return matched, failed, errors


def base_rule(rid: str) -> str:
    """taonode-guardian-images/autogen-cronjob-image-digest -> taonode-guardian-images/image-digest."""
    policy, rule = rid.split("/", 1)
    for prefix in ("autogen-cronjob-", "autogen-"):
        if rule.startswith(prefix):
            return f"{policy}/{rule[len(prefix):]}"
    return rid


def namespace_of(obj: dict[str, Any]) -> str:
    return obj["metadata"].get("namespace") or check_chart.NAMESPACE


def ident(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind')}/{obj['metadata'].get('name')}"


def variant(rids: list[str]) -> str:
    rules = [r.split("/", 1)[1] for r in rids]
    if rules and all(r.startswith("autogen-cronjob-") for r in rules):
        return "autogen-cronjob-*"
    if rules and all(r.startswith("autogen-") for r in rules):
        return "autogen-*"
    return "the Pod rules"


def validated_rules(matched: list[str], engine_rules: set[str]) -> list[str]:
    return [m for m in matched if m in engine_rules]


# ---------------------------------------------------------------------------------------
# Checks


def load_policies() -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(POLICY_DIR.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        if len(docs) != 1:
            raise SystemExit(f"check-policy: {path} must hold exactly one policy, has {len(docs)}")
        out[str(path.relative_to(ROOT))] = docs[0]
    return out


def check_shape(policies: dict[str, dict[str, Any]], validator: Any, report: Report) -> None:
    for path, policy in policies.items():
        errors = schema_errors(validator, policy)
        rules = (policy.get("spec") or {}).get("rules") or []
        report.check(not errors, f"schema {path} (ClusterPolicy {policy.get('metadata', {}).get('name')}, {len(rules)} rules)",
                     "; ".join(errors[:5]))
        errors = kyverno_checks(policy)
        report.check(not errors, f"kyverno-checks {path}", "; ".join(errors))


def check_coverage_text(policies: dict[str, dict[str, Any]], report: Report) -> None:
    """Each validate.cel rule reads all three container lists through one variable that every
    expression uses (resource-limits: containers and initContainers, see EPHEMERAL_EXEMPT)."""
    for policy in policies.values():
        for rule in policy["spec"]["rules"]:
            cel = (rule.get("validate") or {}).get("cel")
            if not cel:
                continue
            name = rule["name"]
            want = ["object.spec.containers", "object.spec.initContainers"]
            if name not in EPHEMERAL_EXEMPT:
                want.append("object.spec.ephemeralContainers")
            var = next((v for v in cel.get("variables") or [] if all(w in v["expression"] for w in want)), None)
            users = var and all(f"variables.{var['name']}." in e["expression"] for e in cel["expressions"])
            lists = ", ".join(w.rsplit(".", 1)[1] for w in want)
            extra = f" ({EPHEMERAL_EXEMPT[name]}: not ephemeralContainers)" if name in EPHEMERAL_EXEMPT else ""
            report.check(bool(users), f"lists {policy['metadata']['name']}/{name}: every expression reads {lists}{extra}",
                         "no variable over all the lists that every expression reads")


def check_chart_objects(policies: Policies, cel_ids: set[str], report: Report) -> int:
    chart = check_chart.helm_chart.Chart.load(str(check_chart.CHART))
    rendered = 0
    for label, values in check_chart.VALUE_SETS.items():
        try:
            objs = check_chart.objects_of(check_chart.render(chart, values))
        except Exception as error:  # noqa: BLE001
            report.fail(f"chart [{label}]", f"render failed: {error}")
            continue
        rendered += len(objs)
        unmatched = 0
        for obj in objs:
            matched, failed, errors = policies.run(obj, namespace_of(obj))
            if not matched:
                unmatched += 1
                continue
            checked = validated_rules(matched, cel_ids)
            report.check(
                not failed and not errors,
                f"chart [{label}] {ident(obj)}: passes {len(checked)} rules ({variant(checked)}); "
                f"{len(matched) - len(checked)} verifyImages rule matches",
                "; ".join([f"{r}: {' / '.join(m)}" for r, m in failed.items()] + errors),
            )
        pods = [o for o in objs if check_chart.pod_spec(o) is not None]
        report.check(
            len(objs) - unmatched == len(pods),
            f"chart [{label}]: {len(objs)} objects, the {len(pods)} with a pod spec matched, {unmatched} without one match no rule",
            "a workload matched no rule, or an object without a pod spec matched one",
        )
    for label, (values, want) in CHART_MUST_REFUSE.items():
        try:
            objs = check_chart.objects_of(check_chart.render(chart, values))
        except Exception as error:  # noqa: BLE001
            report.fail(f"chart refused [{label}]", f"render failed: {error}")
            continue
        got: dict[str, set[str]] = {}
        errors: list[str] = []
        for obj in objs:
            _, failed, errs = policies.run(obj, namespace_of(obj))
            errors += errs
            if failed:
                got[obj["kind"]] = {base_rule(r) for r in failed}
        report.check(got == want and not errors, f"chart refused [{label}]: {', '.join(f'{k} fails {sorted(v)}' for k, v in want.items())}",
                     f"got {got} {errors}")
    return rendered


def load_fixture(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    if len(docs) != 1:
        raise SystemExit(f"check-policy: {path} must hold exactly one object")
    return docs[0]


def check_fixtures_schema(paths: list[Path], report: Report) -> None:
    """The fixtures are real Kubernetes objects (kubernetes-validate --strict, as check-chart)."""
    rc, lines = check_chart.kubernetes_validate_cli(paths)
    bad = [l for l in lines if l.startswith(("ERROR", "WARN", "FATAL"))]
    report.check(rc == 0 and not bad, f"fixtures: {len(paths)} objects valid against the Kubernetes {check_chart.KUBE_VERSION} schemas (strict)",
                 "; ".join(bad or lines)[:600])


def check_fixtures(policies: Policies, cel_ids: set[str], report: Report) -> None:
    for path in sorted((FIXTURES / "good").glob("*.yaml")):
        obj = load_fixture(path)
        rel = path.relative_to(ROOT)
        matched, failed, errors = policies.run(obj, namespace_of(obj))
        annotations = obj["metadata"].get("annotations") or {}
        if annotations.get(EXPECT_MATCHED) == "none":
            report.check(not matched, f"good {rel} ({ident(obj)} in {namespace_of(obj)}): matches no rule",
                         f"matched {matched}")
            continue
        checked = validated_rules(matched, cel_ids)
        report.check(bool(checked) and not failed and not errors, f"good {rel} ({ident(obj)}): passes {len(checked)} rules ({variant(checked)})",
                     "; ".join([f"{r}: {' / '.join(m)}" for r, m in failed.items()] + errors) or "matched no rule")
    for path in sorted((FIXTURES / "bad").glob("*.yaml")):
        obj = load_fixture(path)
        rel = path.relative_to(ROOT)
        want = {w.strip() for w in ((obj["metadata"].get("annotations") or {}).get(EXPECT_FAIL) or "").split(",") if w.strip()}
        matched, failed, errors = policies.run(obj, namespace_of(obj))
        got = {base_rule(r) for r in failed}
        report.check(
            bool(want) and got == want and not errors,
            f"bad {rel} ({ident(obj)}): fails exactly {', '.join(sorted(failed)) or '-'}",
            f"expected {sorted(want) or 'an ' + EXPECT_FAIL + ' annotation'}, failed {sorted(got)}, errors {errors}",
        )


def check_coverage(policies: Policies, report: Report) -> None:
    """A violation of each rule planted in each container list, in a Pod, a Deployment and a
    CronJob (the three shapes autogen produces): exactly that rule must fail, except where the
    list is exempt from the rule (then nothing may fail)."""
    good_pod = load_fixture(FIXTURES / "good/pod.yaml")
    spec = good_pod["spec"]
    template = {k: v for k, v in spec.items() if k != "ephemeralContainers"}

    def shapes() -> list[tuple[str, dict[str, Any], Callable[[dict[str, Any]], dict[str, Any]]]]:
        meta = {"name": "coverage", "namespace": DEFAULT_NAMESPACES[0]}
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": dict(meta), "spec": copy.deepcopy(spec)}
        dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": dict(meta),
               "spec": {"selector": {"matchLabels": {"a": "b"}},
                        "template": {"metadata": {"labels": {"a": "b"}}, "spec": copy.deepcopy(template)}}}
        cron = {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": dict(meta),
                "spec": {"schedule": "0 0 * * *", "jobTemplate": {"spec": {"template": {
                    "spec": {**copy.deepcopy(template), "restartPolicy": "OnFailure"}}}}}}
        return [
            ("Pod", pod, lambda o: o["spec"]),
            ("Deployment", dep, lambda o: o["spec"]["template"]["spec"]),
            ("CronJob", cron, lambda o: o["spec"]["jobTemplate"]["spec"]["template"]["spec"]),
        ]

    rule_ids = {r for r in policies.cel}
    for rule, violate in VIOLATIONS.items():
        policy = next((p for p, name in rule_ids if name == rule), None)
        if policy is None:
            report.fail(f"coverage {rule}", "no such validate.cel rule in deploy/policy")
            continue
        for shape, obj, pod_spec in shapes():
            for field in ("containers", "initContainers", "ephemeralContainers"):
                if field == "ephemeralContainers" and shape != "Pod":
                    continue  # pod templates cannot hold ephemeral containers
                broken = copy.deepcopy(obj)
                violate(pod_spec(broken)[field][0])
                _, failed, errors = policies.run(broken, namespace_of(broken))
                got = {base_rule(r) for r in failed}
                exempt = field == "ephemeralContainers" and rule in EPHEMERAL_EXEMPT
                want = set() if exempt else {f"{policy}/{rule}"}
                note = f"passes ({EPHEMERAL_EXEMPT[rule]})" if exempt else f"fails exactly {', '.join(sorted(failed))}"
                report.check(got == want and not errors, f"coverage {rule} in {field} of a {shape}: {note}",
                             f"failed {sorted(got)}, errors {errors}")


def schema_self_test(policies: dict[str, dict[str, Any]], validator: Any, report: Report) -> None:
    pod_security = next(p for p in policies.values() if p["metadata"]["name"] == "taonode-guardian-pod-security")
    signatures = next(p for p in policies.values() if p["spec"]["rules"][0].get("verifyImages"))
    cases: list[tuple[str, dict[str, Any], Callable[[dict[str, Any]], None]]] = [
        ("unknown rule field", pod_security, lambda p: p["spec"]["rules"][0].update(validateCel={})),
        ("misspelt cel key", pod_security, lambda p: p["spec"]["rules"][0]["validate"]["cel"].update(
            expression=p["spec"]["rules"][0]["validate"]["cel"].pop("expressions"))),
        ("expression missing", pod_security, lambda p: p["spec"]["rules"][0]["validate"]["cel"]["expressions"][0].pop("expression")),
        ("failureAction Deny", pod_security, lambda p: p["spec"]["rules"][0]["validate"].update(failureAction="Deny")),
        ("operation PATCH", pod_security, lambda p: p["spec"]["rules"][0]["match"]["any"][0]["resources"].update(operations=["PATCH"])),
        ("kinds as a string", pod_security, lambda p: p["spec"]["rules"][0]["match"]["any"][0]["resources"].update(kinds="Pod")),
        ("rule without a name", pod_security, lambda p: p["spec"]["rules"][0].pop("name")),
        ("unknown keys field", signatures, lambda p: p["spec"]["rules"][0]["verifyImages"][0]["attestors"][0]["entries"][0]["keys"].update(publicKey="x")),
        ("attestor count 0", signatures, lambda p: p["spec"]["rules"][0]["verifyImages"][0]["attestors"][0].update(count=0)),
        ("wrong apiVersion", signatures, lambda p: p.update(apiVersion="kyverno.io/v2beta1")),
    ]
    caught = []
    for name, policy, mutate in cases:
        broken = copy.deepcopy(policy)
        mutate(broken)
        if schema_errors(validator, broken):
            caught.append(name)
        else:
            report.fail(f"self-test schema refuses {name}", "the schema accepted it")
    if len(caught) == len(cases):
        report.ok(f"self-test schema refuses {len(cases)} known-bad policies ({', '.join(caught)})")
    # Kyverno's own checks catch what the schema cannot.
    broken = copy.deepcopy(signatures)
    broken["spec"]["rules"][0]["verifyImages"][0]["attestors"][0]["count"] = 2
    broken["spec"]["rules"][0]["verifyImages"][0]["failureAction"] = "Audit"
    errors = kyverno_checks(broken)
    report.check(any("count cannot exceed" in e for e in errors) and any("mutateDigest" in e or "Enforce" in e for e in errors),
                 "self-test kyverno-checks refuse count > entries and Audit", str(errors))


# ---------------------------------------------------------------------------------------
# Release: fill the placeholders


KEY_TYPES = {
    # SubjectPublicKeyInfo DER prefixes: Ed25519 (the release key, scripts/release.py keygen),
    # ECDSA P-256 (cosign generate-key-pair).
    "Ed25519": bytes.fromhex("302a300506032b6570032100"),
    "ECDSA P-256": bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200"),
}


def public_key_type(pem: str) -> str:
    m = re.fullmatch(r"\s*-----BEGIN PUBLIC KEY-----\s*([A-Za-z0-9+/=\s]+?)\s*-----END PUBLIC KEY-----\s*", pem)
    if not m:
        raise ValueError("not one PEM PUBLIC KEY block (SubjectPublicKeyInfo)")
    der = base64.b64decode("".join(m.group(1).split()), validate=True)
    for name, prefix in KEY_TYPES.items():
        if der.startswith(prefix) and len(der) == len(prefix) + (32 if name == "Ed25519" else 65):
            return name
    raise ValueError("neither an Ed25519 nor an ECDSA P-256 public key")


def fill(policy: dict[str, Any], registry: str, key_pem: str, namespaces: list[str]) -> dict[str, Any]:
    text = json.dumps(policy).replace(REGISTRY_PLACEHOLDER, registry)
    out = json.loads(text)
    for rule in out["spec"]["rules"]:
        for block in (rule["match"].get("any") or []) + (rule["match"].get("all") or []):
            if "namespaces" in (block.get("resources") or {}):
                block["resources"]["namespaces"] = list(namespaces)
        for iv in rule.get("verifyImages") or []:
            for attestor_set in iv.get("attestors") or []:
                for entry in attestor_set.get("entries") or []:
                    if entry.get("keys", {}).get("publicKeys"):
                        entry["keys"]["publicKeys"] = key_pem.strip()
    return out


class BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (the PEM key) as YAML block literals."""


BlockDumper.add_representer(
    str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None)
)


def release(args: argparse.Namespace, validator: Any) -> int:
    if not re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)+/", args.registry):
        print(f"check-policy: --registry {args.registry!r} must be host[:port]/path/ with a trailing slash", file=sys.stderr)
        return 1
    for ns in args.namespace:
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", ns):
            print(f"check-policy: --namespace {ns!r} is not a namespace name", file=sys.stderr)
            return 1
    key_pem = Path(args.public_key).read_text()
    try:
        key_type = public_key_type(key_pem)
    except ValueError as error:
        print(f"check-policy: {args.public_key}: {error}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    problems = []
    for path, policy in load_policies().items():
        filled = fill(policy, args.registry, key_pem, args.namespace)
        text = json.dumps(filled)
        problems += [f"{path}: {e}" for e in schema_errors(validator, filled) + kyverno_checks(filled)]
        for placeholder in (REGISTRY_PLACEHOLDER, KEY_PLACEHOLDER):
            if placeholder in text and placeholder not in args.registry:
                problems.append(f"{path}: placeholder {placeholder} left")
        target = out / Path(path).name
        target.write_text(f"# {path} filled by scripts/check_policy.py --release "
                          f"(registry {args.registry}, {key_type} key, namespaces {', '.join(args.namespace)})\n"
                          + yaml.dump(filled, Dumper=BlockDumper, sort_keys=False, width=100))
    for p in problems:
        print(f"check-policy: {p}", file=sys.stderr)
    if not problems:
        print(f"check-policy: wrote {len(load_policies())} policies to {out} (registry {args.registry}, "
              f"{key_type} key, namespaces {', '.join(args.namespace)})")
    return 1 if problems else 0


def release_self_test(validator: Any, report: Report) -> None:
    with tempfile.TemporaryDirectory(prefix="check-policy-") as tmp:
        args = argparse.Namespace(registry="ghcr.io/taonode/guardian/", public_key=str(TEST_KEY),
                                  namespace=["guardian", "guardian-staging"], out=tmp)
        import contextlib
        import io
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            rc = release(args, validator)
        filled = {p.name: yaml.safe_load(p.read_text()) for p in Path(tmp).glob("*.yaml")}
        text = json.dumps(filled)
        sig = next((p for p in filled.values() if p["spec"]["rules"][0].get("verifyImages")), None)
        key = sig and sig["spec"]["rules"][0]["verifyImages"][0]["attestors"][0]["entries"][0]["keys"]["publicKeys"]
        ok = (rc == 0 and len(filled) == len(list(POLICY_DIR.glob("*.yaml")))
              and REGISTRY_PLACEHOLDER not in text and KEY_PLACEHOLDER not in text
              and "ghcr.io/taonode/guardian/*" in text and key == TEST_KEY.read_text().strip()
              and '"namespaces": ["guardian", "guardian-staging"]' in text)
        report.check(ok, f"self-test --release fills registry, key ({public_key_type(TEST_KEY.read_text())}) and namespaces; "
                         "the filled policies pass the schema", buf.getvalue().strip()[:600])
        bad = argparse.Namespace(registry="ghcr.io/taonode/guardian/", public_key=str(ROOT / "deploy/policy/images.yaml"),
                                 namespace=["guardian"], out=tmp)
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            rc = release(bad, validator)
        report.check(rc != 0, "self-test --release refuses a file that is not a public key", "it accepted one")


# ---------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regenerate-schema", metavar="CRD_YAML", help="rebuild the vendored schema from this CRD file")
    parser.add_argument("--source", default="", help="with --regenerate-schema: where the CRD came from (recorded)")
    parser.add_argument("--release", action="store_true", help="write the policies with the placeholders filled")
    parser.add_argument("--registry", help="with --release: host[:port]/path/ the release images are pushed under")
    parser.add_argument("--public-key", help="with --release: the release public key, PEM (Ed25519 or ECDSA P-256)")
    parser.add_argument("--namespace", action="append", help="with --release: a namespace the chart is installed into (repeat)")
    parser.add_argument("--out", help="with --release: the folder to write the filled policies to")
    args = parser.parse_args()

    if args.regenerate_schema:
        raw_crd = Path(args.regenerate_schema).read_bytes()
        crd = yaml.safe_load(raw_crd)
        source = f"{args.source or args.regenerate_schema} (sha256 {hashlib.sha256(raw_crd).hexdigest()})"
        schema = crd_to_json_schema(crd, "v1", source)
        SCHEMA_FILE.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
        print(f"check-policy: wrote {SCHEMA_FILE.relative_to(ROOT)} ({SCHEMA_FILE.stat().st_size} bytes)")
        return 0

    _, validator = load_schema()
    if args.release:
        missing = [f"--{n.replace('_', '-')}" for n in ("registry", "public_key", "namespace", "out") if not getattr(args, n)]
        if missing:
            parser.error(f"--release needs {', '.join(missing)}")
        return release(args, validator)

    started = time.monotonic()
    report = Report()
    schema_source = json.loads(SCHEMA_FILE.read_text())["x-source"]
    engines = [CelCpp(), CelPy()]
    versions = {p: importlib.metadata.version(p) for p in ("cel-expr-python", "cel-python", "jsonschema", "helm-python-sdk")}
    print("check-policy: no Kyverno engine installs from the reachable registries; instead:")
    print(f"  shape: Kyverno's ClusterPolicy CRD schema, strict (jsonschema {versions['jsonschema']}): {schema_source}")
    print("  rules: Kyverno's autogen and matching reproduced, CEL evaluated by "
          + " and ".join(f"{e.name} {versions[e.name]}" for e in engines)
          + f" (they must agree); chart rendered by helm-python-sdk {versions['helm-python-sdk']}")

    raw = load_policies()
    check_shape(raw, validator, report)
    check_coverage_text(raw, report)
    policies = Policies(raw, engines, report)
    cel_ids = {f"{p}/{r}" for p, r in policies.cel}
    rendered = check_chart_objects(policies, cel_ids, report)
    fixtures = sorted((FIXTURES / "good").glob("*.yaml")) + sorted((FIXTURES / "bad").glob("*.yaml"))
    check_fixtures_schema(fixtures, report)
    check_fixtures(policies, cel_ids, report)
    check_coverage(policies, report)
    schema_self_test(raw, validator, report)
    release_self_test(validator, report)

    print(f"check-policy: {len(raw)} policies, {len(policies.rules)} rules with autogen, {rendered} chart objects "
          f"rendered, {len(fixtures)} fixtures, {time.monotonic() - started:.1f} s")
    if report.failed:
        print(f"check-policy: FAILED, {len(report.failed)} finding(s):", file=sys.stderr)
        for item in report.failed:
            print(f"  - {item}", file=sys.stderr)
    print(f"policy: {report.passed} passed, {len(report.failed)} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
