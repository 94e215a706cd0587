"""Helpers for the chart tests: render the chart with the real Helm SDK, validate objects
against the Kubernetes schemas and against weir's CRD schemas (OpenAPI and CEL), and read the
command-line contracts of the two binaries from their sources.

Everything here works offline: helm-python-sdk bundles Helm's Go SDK as a shared library,
kubernetes-validate bundles the Kubernetes JSON schemas, and cel-python evaluates CEL.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import celpy
import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "weir"
CHART_CRDS = CHART / "crds" / "crds.yaml"
RELEASE = "weir"
NAMESPACE = "weir-system"

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest that
# kubernetes-validate ships schemas for.
KUBE_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]

# Kinds of other projects' CRDs the chart may create; kubernetes-validate has no schema for
# them, so their fields are asserted by dedicated tests instead.
THIRD_PARTY_KINDS = {
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}

# Values the chart is rendered with besides its defaults. Each one flips something a user
# would: TLS source, monitoring, sizing, placement, names, images, IPv6.
SCENARIOS: dict[str, dict[str, Any] | None] = {
    "default": None,
    "plaintext": {"tls": {"mode": "plaintext"}},
    "cert-manager": {"tls": {"mode": "certManager"}},
    "cert-manager-issuer": {
        "tls": {
            "mode": "certManager",
            "certManager": {
                "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"},
                "duration": "720h",
                "renewBefore": "240h",
            },
        }
    },
    "service-monitor": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    "monitoring": {
        "serviceMonitor": {"enabled": True},
        "monitoring": {
            "grafanaDashboards": {"enabled": True, "annotations": {"grafana_folder": "weir"}},
            "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
        },
    },
    "single-replica": {
        "controller": {"replicas": 1, "podAntiAffinity": "none", "podDisruptionBudget": {"enabled": False}}
    },
    "custom": {
        "fullnameOverride": "edge",
        "bindAddress": "::",
        "clusterDomain": "corp.example",
        "imagePullSecrets": [{"name": "regcred"}],
        "commonLabels": {"team": "platform"},
        "controller": {
            "replicas": 3,
            "podAntiAffinity": "hard",
            "image": {
                "repository": "registry.example/weir/controller",
                "digest": "sha256:" + "ab" * 32,
                "pullPolicy": "Always",
            },
            "grpcPort": 9000,
            "adminPort": 9001,
            "logLevel": "debug",
            "extraEnv": [{"name": "RUST_BACKTRACE", "value": "1"}],
            "resources": {
                "requests": {"cpu": "250m", "memory": "256Mi"},
                "limits": {"cpu": "2", "memory": "1Gi"},
            },
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "infra", "effect": "NoSchedule"}],
            "topologySpreadConstraints": [
                {
                    "maxSkew": 1,
                    "topologyKey": "topology.kubernetes.io/zone",
                    "whenUnsatisfiable": "ScheduleAnyway",
                    "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "controller"}},
                }
            ],
            "priorityClassName": "system-cluster-critical",
            "podDisruptionBudget": {"enabled": True, "maxUnavailable": "50%"},
            "service": {"annotations": {"example.com/owner": "platform"}},
            "serviceAccount": {"create": True, "name": "weir-ctl", "annotations": {"example.com/iam": "x"}},
        },
        "agent": {
            "image": {"repository": "registry.example/weir/agent", "tag": "1.2.3"},
            "proxyPort": 8080,
            "adminPort": 8081,
            "workers": 4,
            "resources": {
                "requests": {"cpu": "500m", "memory": "256Mi"},
                "limits": {"cpu": None, "memory": "2Gi"},
            },
            "tolerations": [{"operator": "Exists"}],
            "extraArgs": ["--header-read-timeout=5s"],
            "podAnnotations": {"example.com/scrape": "true"},
        },
        "serviceMonitor": {"enabled": True, "interval": "15s", "scrapeTimeout": "5s"},
    },
    # The agent's lower cache tiers, one at a time so that a flag the binary lacks names
    # its own scenario.
    "cache-disk": {"agent": {"cache": {"disk": {"enabled": True, "sizeLimit": "5Gi"}}}},
    "cache-redis": {"agent": {"cache": {"redis": {"url": "redis://valkey.cache.svc:6379/2"}}}},
    "cache-peers": {"agent": {"proxyPort": 8080, "cache": {"peers": {"enabled": True}}}},
}

# Values that give the agent access to its node (hostNetwork, hostPath). They need a
# namespace that allows privileged pods and add a root init container (no probes), so the
# tests of the "restricted" Pod Security Standard and of every container's probes leave
# them out; every other test renders them too (ALL_SCENARIOS).
HOST_SCENARIOS: dict[str, dict[str, Any]] = {
    "host-network": {"agent": {"hostNetwork": True}},
    "cache-disk-host-path": {"agent": {"cache": {"disk": {"enabled": True, "hostPath": "/var/cache/weir-edge"}}}},
}

ALL_SCENARIOS: dict[str, dict[str, Any] | None] = {**SCENARIOS, **HOST_SCENARIOS}


@dataclass
class Rendered:
    """One render of the chart: its objects, NOTES.txt and the raw files."""

    files: dict[str, str]
    docs: list[dict[str, Any]]
    notes: str
    values: dict[str, Any]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [d for d in self.of_kind(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
        return found[0]

    def by_component(self, kind: str, component: str) -> dict[str, Any]:
        found = [
            d
            for d in self.of_kind(kind)
            if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
        ]
        assert len(found) == 1, f"expected one {kind} of component {component}, found {len(found)}"
        return found[0]


@functools.lru_cache(maxsize=None)
def _chart() -> helm.Chart:
    return helm.Chart.load(CHART)


@functools.lru_cache(maxsize=None)
def _render_cached(values_json: str, name: str, namespace: str) -> Rendered:
    values = json.loads(values_json)
    chart = _chart()
    files = chart.render(values, name=name, namespace=namespace, is_install=True)
    docs: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("metadata", {})
                docs.append(doc)
    return Rendered(files=files, docs=docs, notes=notes, values=chart.merge_values(values))


def render(values: dict[str, Any] | None = None, name: str = RELEASE, namespace: str = NAMESPACE) -> Rendered:
    """Renders the chart as `helm install` would (offline: `lookup` finds nothing)."""
    return _render_cached(json.dumps(values), name, namespace)


def pod_specs(r: Rendered) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod spec) of every object that runs pods."""
    for d in r.docs:
        if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job"):
            yield d, d["spec"]["template"]["spec"]
        elif d["kind"] == "CronJob":
            yield d, d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        elif d["kind"] == "Pod":
            yield d, d["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec.get("containers", [])


def flag_values(args: list[str]) -> dict[str, list[str | None]]:
    """`--name=value` / `--name` arguments by name."""
    out: dict[str, list[str | None]] = {}
    for a in args:
        assert a.startswith("--"), f"argument {a!r} is not a --flag"
        name, _, value = a[2:].partition("=")
        out.setdefault(name, []).append(value if "=" in a else None)
    return out


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def secret_data(secret: dict[str, Any]) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in secret.get("data", {}).items()}


# --- the binaries' command-line contracts ------------------------------------------------


@dataclass
class Cli:
    flags: set[str]
    envs: set[str]


@functools.lru_cache(maxsize=None)
def clap_cli(main_rs: str) -> Cli:
    """The long flags and env variables a clap `#[derive(Parser)]` struct declares."""
    src = (REPO / main_rs).read_text()
    flags = {"help", "version"}
    envs: set[str] = set()
    pattern = re.compile(
        r"#\[arg\((?P<attr>.*?)\)\]\s*(?:(?:///[^\n]*|#\[[^\n]*\])\s*)*(?:pub\s+)?(?P<field>\w+)\s*:",
        re.S,
    )
    for m in pattern.finditer(src):
        attr, field = m.group("attr"), m.group("field")
        long = re.search(r'\blong\s*=\s*"([^"]+)"', attr)
        if long:
            flags.add(long.group(1))
        elif re.search(r"\blong\b", attr):
            flags.add(field.replace("_", "-"))
        env = re.search(r'\benv\s*=\s*"([^"]+)"', attr)
        if env:
            envs.add(env.group(1))
    return Cli(flags=flags, envs=envs)


# --- Kubernetes schemas ------------------------------------------------------------------


def kube_validate(doc: dict[str, Any], version: str) -> str | None:
    """None when `doc` is valid for that Kubernetes version (strict: unknown fields are
    errors, as `kubectl apply` reports them), else the error."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
        return None
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        return f"{doc['kind']}/{doc['metadata'].get('name')}: {path}: {e.message}"


# --- CRD schemas -------------------------------------------------------------------------


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@functools.lru_cache(maxsize=None)
def crdgen_output() -> str:
    """What `crdgen` prints now: the file run.sh generated (WEIR_CRDGEN_OUTPUT), or a fresh run."""
    given = os.environ.get("WEIR_CRDGEN_OUTPUT")
    if given:
        return Path(given).read_text()
    return subprocess.run(
        ["cargo", "run", "-q", "-p", "weir-controller", "--bin", "crdgen"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def chart_crds() -> dict[str, dict[str, Any]]:
    """The chart's CRDs by kind."""
    return {d["spec"]["names"]["kind"]: d for d in load_yaml_docs(CHART_CRDS)}


def crd_version_schema(crd: dict[str, Any]) -> dict[str, Any]:
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    return version["schema"]["openAPIV3Schema"]


def walk_schema(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every sub-schema with its path (`.spec.rules[].backendRefs[].weight`)."""
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from walk_schema(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk_schema(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk_schema(node["additionalProperties"], f"{path}.*")
    for key in ("allOf", "anyOf", "oneOf"):
        for i, sub in enumerate(node.get(key, [])):
            yield from walk_schema(sub, f"{path}<{key}{i}>")


def schema_at(root: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The sub-schema a printer-column JSONPath such as `.status.agents.synced` or
    `.status.conditions[?(@.type=="Accepted")].status` points at, or None."""
    node = root
    for part in re.findall(r"\.([A-Za-z0-9_]+)|(\[[^\]]*\])", path):
        name, index = part
        if name:
            props = node.get("properties", {})
            if name not in props:
                return None
            node = props[name]
        else:
            if node.get("type") != "array":
                return None
            node = node["items"]
    return node


def to_json_schema(node: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    """A Kubernetes structural schema as a JSON schema for `jsonschema`.

    `nullable` admits null, `x-kubernetes-list-type: set` means unique items, and objects
    refuse unknown fields (strict, as kubectl's server-side field validation reports them;
    the API server would otherwise prune them silently)."""
    out: dict[str, Any] = {}
    nullable = node.get("nullable", False)
    for key in (
        "description", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
        "minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties",
        "required", "multipleOf", "uniqueItems",
    ):
        if key in node:
            out[key] = node[key]
    if "enum" in node:
        out["enum"] = list(node["enum"]) + ([None] if nullable else [])
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"] + (["null"] if nullable else [])
    elif "type" in node:
        out["type"] = [node["type"], "null"] if nullable else node["type"]
    if "properties" in node:
        out["properties"] = {k: to_json_schema(v, strict) for k, v in node["properties"].items()}
    if isinstance(node.get("items"), dict):
        out["items"] = to_json_schema(node["items"], strict)
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = to_json_schema(node["additionalProperties"], strict)
    elif "additionalProperties" in node:
        out["additionalProperties"] = node["additionalProperties"]
    elif node.get("type") == "object" and strict and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    for key in ("allOf", "anyOf", "oneOf"):
        if key in node:
            out[key] = [to_json_schema(s, strict) for s in node[key]]
    if "not" in node:
        out["not"] = to_json_schema(node["not"], strict)
    return out


def object_json_schema(crd: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of a whole object of this CRD (apiVersion, kind, metadata included)."""
    schema = to_json_schema(crd_version_schema(crd))
    group = crd["spec"]["group"]
    (version,) = [v["name"] for v in crd["spec"]["versions"] if v.get("storage")]
    schema["properties"]["apiVersion"] = {"const": f"{group}/{version}"}
    schema["properties"]["kind"] = {"const": crd["spec"]["names"]["kind"]}
    schema["properties"]["metadata"] = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$", "maxLength": 253},
            "namespace": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        },
        "required": ["name"],
    }
    schema.setdefault("required", [])
    schema["required"] = sorted(set(schema["required"]) | {"apiVersion", "kind", "metadata"})
    return schema


_CEL = celpy.Environment()


@functools.lru_cache(maxsize=None)
def cel_program(rule: str) -> Any:
    return _CEL.program(_CEL.compile(rule))


def cel_violations(node: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """The messages of the `x-kubernetes-validations` rules that `value` breaks, evaluated
    at every schema node whose value is present, with `self` bound to it, as the API server
    does."""
    if value is None:
        return []
    errors: list[str] = []
    for v in node.get("x-kubernetes-validations", []):
        result = cel_program(v["rule"]).evaluate({"self": celpy.json_to_cel(value)})
        if not (isinstance(result, celpy.celtypes.BoolType) and bool(result)):
            errors.append(f"{path or '<root>'}: {v.get('message', v['rule'])}")
    if isinstance(value, dict):
        props = node.get("properties", {})
        for k, sub in value.items():
            if k in props:
                errors += cel_violations(props[k], sub, f"{path}.{k}")
            elif isinstance(node.get("additionalProperties"), dict):
                errors += cel_violations(node["additionalProperties"], sub, f"{path}.{k}")
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for i, sub in enumerate(value):
            errors += cel_violations(node["items"], sub, f"{path}[{i}]")
    return errors


def crd_errors(crd: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    """Everything the API server would refuse in `obj`: OpenAPI schema errors, then CEL."""
    validator = jsonschema.Draft7Validator(object_json_schema(crd))
    errors = [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    ]
    if not errors:
        errors = cel_violations(crd_version_schema(crd), obj)
    return errors
