"""The CRDs: generated from the Rust types, shipped unchanged by the chart, valid for the API
server, and strict enough that the example policies pass and broken ones are refused."""

from __future__ import annotations

import copy
import re
import textwrap
from pathlib import Path

import pytest
import yaml

from chartlib import (
    CHART_CRDS,
    KUBE_VERSIONS,
    REPO,
    cel_program,
    chart_crds,
    crd_errors,
    crd_version_schema,
    crdgen_output,
    kube_validate,
    load_yaml_docs,
    render,
    schema_at,
    walk_schema,
)

CRDS = chart_crds()
TP = CRDS["TrafficPolicy"]
NA = CRDS["NodeAgent"]
TP_SCHEMA = crd_version_schema(TP)


def example_documents() -> list[tuple[str, dict]]:
    """Every TrafficPolicy the project shows users: examples/, deploy/ and NOTES.txt."""
    found = []
    for path in sorted([*REPO.glob("examples/**/*.yaml"), *REPO.glob("deploy/**/*.yaml")]):
        for i, doc in enumerate(load_yaml_docs(path)):
            if doc.get("kind") == "TrafficPolicy":
                found.append((f"{path.relative_to(REPO)}#{i}", doc))
    notes = render(None).notes
    for i, block in enumerate(re.findall(r"<<'EOF'\n(.*?)\n\s*EOF", notes, re.S)):
        found.append((f"NOTES.txt#{i}", yaml.safe_load(textwrap.dedent(block))))
    return found


EXAMPLES = example_documents()


# --- generated, not hand-written ---------------------------------------------------------


def test_chart_crds_are_exactly_what_crdgen_prints():
    generated = crdgen_output()
    shipped = CHART_CRDS.read_text()
    assert shipped == generated, (
        "charts/weir/crds/crds.yaml differs from the Rust types; regenerate it with\n"
        "  cargo run -q -p weir-controller --bin crdgen > charts/weir/crds/crds.yaml"
    )


def _non_string_keys(value, path=""):
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                yield f"{path}.{k!r}"
            yield from _non_string_keys(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _non_string_keys(v, f"{path}[{i}]")


def test_manifests_read_the_same_as_yaml_1_1():
    """kubectl and Helm decode YAML 1.1 (go-yaml v2), where a plain `on:`, `yes:` or `no:`
    key is a boolean: the CRD property `on` would silently become `"true"`. PyYAML reads
    YAML 1.1 the same way, so every key must come back a string."""
    paths = [CHART_CRDS, *REPO.glob("examples/**/*.yaml"), *REPO.glob("deploy/**/*.yaml")]
    for path in paths:
        for doc in load_yaml_docs(path):
            bad = list(_non_string_keys(doc))
            assert not bad, f"{path.relative_to(REPO)}: keys read as non-strings by YAML 1.1: {bad}"
    assert schema_at(TP_SCHEMA, ".spec.retry.on") is not None


def test_the_chart_ships_both_crds():
    assert sorted(CRDS) == ["NodeAgent", "TrafficPolicy"]


# --- valid for the API server ------------------------------------------------------------


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("kind", ["TrafficPolicy", "NodeAgent"])
def test_crds_validate_against_the_kubernetes_schema(kind, version):
    assert kube_validate(CRDS[kind], version) is None


@pytest.mark.parametrize("kind", ["TrafficPolicy", "NodeAgent"])
def test_crd_schemas_are_structural(kind):
    """The API server accepts only structural schemas: every node typed, no references,
    nullable only with a type, list types only on arrays."""
    problems = []
    for path, node in walk_schema(crd_version_schema(CRDS[kind])):
        if "$ref" in node or "definitions" in node or "$defs" in node:
            problems.append(f"{path}: references are not allowed")
        typed = "type" in node or node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
        if not typed and "<" not in path.rsplit(".", 1)[-1]:
            problems.append(f"{path}: no type")
        if node.get("type") == "array" and not isinstance(node.get("items"), dict):
            problems.append(f"{path}: array without items")
        if "x-kubernetes-list-type" in node and node.get("type") != "array":
            problems.append(f"{path}: list type on a non-array")
        if node.get("x-kubernetes-list-type") == "set" and node["items"].get("type") in ("object", "array"):
            problems.append(f"{path}: a set must hold scalars")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("kind", ["TrafficPolicy", "NodeAgent"])
def test_crd_defaults_satisfy_their_own_schema(kind):
    """The API server refuses a CRD whose `default` values break their schema (for example
    a `default: []` on a list with minItems 1)."""
    import jsonschema

    from chartlib import to_json_schema

    for path, node in walk_schema(crd_version_schema(CRDS[kind])):
        if "default" in node:
            errors = list(jsonschema.Draft7Validator(to_json_schema(node)).iter_errors(node["default"]))
            assert not errors, f"{path}: default {node['default']!r}: {errors[0].message}"


def _rules():
    for kind, crd in CRDS.items():
        for path, node in walk_schema(crd_version_schema(crd)):
            for rule in node.get("x-kubernetes-validations", []):
                yield kind, path, rule


def test_cel_rules_compile_and_stay_cheap():
    """Every CEL rule parses, and none sits below a list without maxItems: the API server
    multiplies a rule's cost by the largest possible list and refuses CRDs over budget."""
    for kind, path, rule in _rules():
        cel_program(rule["rule"])
        assert rule.get("message"), f"{kind} {path}: a rule without a message shows users CEL"
        parents = path.split("[]")[:-1]
        for i in range(len(parents)):
            list_path = "[]".join(parents[: i + 1])
            node = schema_at(crd_version_schema(CRDS[kind]), list_path)
            assert node is not None and "maxItems" in node, (
                f"{kind} {path}: rule under {list_path}, a list without maxItems"
            )


# --- names, scope, subresources, columns -------------------------------------------------


def test_traffic_policy_is_namespaced_with_short_name_tp_and_status():
    spec = TP["spec"]
    assert TP["metadata"]["name"] == "trafficpolicies.weir.dev"
    assert spec["group"] == "weir.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["plural"] == "trafficpolicies"
    assert "tp" in spec["names"]["shortNames"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


def test_node_agent_is_cluster_scoped_and_status_only():
    spec = NA["spec"]
    assert NA["metadata"]["name"] == "nodeagents.weir.dev"
    assert spec["scope"] == "Cluster"
    assert spec["names"]["plural"] == "nodeagents"
    (version,) = spec["versions"]
    assert version["subresources"] == {"status": {}}
    schema = crd_version_schema(NA)
    assert schema["properties"]["spec"].get("properties", {}) == {}, "NodeAgent has nothing to configure"
    status = schema["properties"]["status"]["properties"]
    for field in ("connected", "appliedVersion", "lastAckTime", "lastNack", "cacheHitRatio"):
        assert field in status
    assert set(status["lastNack"]["properties"]) >= {"version", "error"}
    assert status["cacheHitRatio"]["minimum"] == 0 and status["cacheHitRatio"]["maximum"] == 1


@pytest.mark.parametrize("kind", ["TrafficPolicy", "NodeAgent"])
def test_printer_columns_point_at_schema_fields(kind):
    crd = CRDS[kind]
    (version,) = crd["spec"]["versions"]
    schema = crd_version_schema(crd)
    kinds = {"string": {"string"}, "integer": {"integer"}, "number": {"number", "integer"}, "boolean": {"boolean"}}
    for col in version["additionalPrinterColumns"]:
        path = col["jsonPath"]
        if path.startswith(".metadata."):
            continue
        node = schema_at(schema, path)
        assert node is not None, f"{kind} column {col['name']}: {path} is not in the schema"
        if col["type"] == "date":
            assert node.get("format") == "date-time", col
        elif node.get("type") != "array":
            assert node.get("type") in kinds[col["type"]], col


def _columns(crd):
    (version,) = crd["spec"]["versions"]
    return [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]


def test_kubectl_get_nodeagents_shows_connection_version_acks_and_cache():
    assert _columns(NA) == ["Connected", "Zone", "Applied", "Last ACK", "Last NACK", "Cache Hit", "Age"]


def test_kubectl_get_tp_shows_hosts_algorithm_tier_health_and_sync():
    assert _columns(TP) == ["Hosts", "Algorithm", "Accepted", "Tier", "Healthy", "Synced", "Age"]
    assert "weir" in TP["spec"]["names"].get("categories", [])


# --- examples and broken policies against the schema -------------------------------------


def test_examples_are_found():
    sources = {name.split("#")[0] for name, _ in EXAMPLES}
    assert "examples/quickstart/shop.yaml" in sources
    assert "NOTES.txt" in sources


@pytest.mark.parametrize("name, doc", EXAMPLES, ids=[n for n, _ in EXAMPLES])
def test_every_example_policy_satisfies_the_crd(name, doc):
    assert crd_errors(TP, doc) == []


def _shop() -> dict:
    (doc,) = [d for n, d in EXAMPLES if n.startswith("examples/quickstart/shop.yaml")]
    return copy.deepcopy(doc)


def _with(path: str, value):
    """The quickstart policy with one field set (`None` deletes it)."""
    doc = _shop()
    *parents, last = re.findall(r"[^.\[\]]+", path)
    node = doc
    for p in parents:
        node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
    if value is None:
        del node[int(last) if last.isdigit() else last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return doc


def test_an_unknown_field_is_refused():
    assert crd_errors(TP, _with("spec.weights", [90, 10]))
    assert crd_errors(TP, _with("spec.rules.0.backendRefs.0.wieght", 5))


BROKEN = {
    "negative weight": _with("spec.rules.0.backendRefs.0.weight", -1),
    "weight over the maximum": _with("spec.rules.0.backendRefs.0.weight", 1_000_001),
    "no backendRefs": _with("spec.rules.0.backendRefs", []),
    "no rules": _with("spec.rules", []),
    "no hosts": _with("spec.hosts", []),
    "host with a port": _with("spec.hosts", ["shop:80"]),
    "wildcard host": _with("spec.hosts", ["*.shop"]),
    "repeated host": _with("spec.hosts", ["shop", "shop"]),
    "unknown algorithm": _with("spec.loadBalancer.algorithm", "Fastest"),
    "RingHash without hashOn": _with("spec.loadBalancer", {"algorithm": "RingHash"}),
    "two hash keys": _with("spec.loadBalancer", {"algorithm": "Maglev", "hashOn": {"header": "x-user", "cookie": "id"}}),
    "port 0": _with("spec.rules.0.backendRefs.0.port", 0),
    "priority 16": _with("spec.rules.0.backendRefs.2.priority", 16),
    "Service name with capitals": _with("spec.rules.0.backendRefs.0.name", "Shop-V1"),
    "minHealthyPercent 0": _with("spec.failover.minHealthyPercent", 0),
    "minHealthyPercent 101": _with("spec.failover.minHealthyPercent", 101),
    "retry on an unknown condition": _with("spec.retry", {"attempts": 2, "on": ["sometimes"]}),
    "eleven retries": _with("spec.retry", {"attempts": 11}),
    "health check path and grpc": _with("spec.healthCheck", {"path": "/healthz", "grpc": {"service": ""}}),
    "health check path without slash": _with("spec.healthCheck", {"path": "healthz"}),
    "unknown eviction": _with("spec.cache", {"enabled": True, "eviction": "Random"}),
    "header value with a newline": _with("spec.rules.0.matches", [{"headers": [{"name": "x-a", "value": "a\r\nb"}]}]),
    "unknown path match type": _with("spec.rules.0.matches", [{"path": {"type": "Regex", "value": "/a"}}]),
}

VALID_VARIANTS = {
    "weight 0 drains": _with("spec.rules.0.backendRefs.0.weight", 0),
    "RingHash on a header": _with("spec.loadBalancer", {"algorithm": "RingHash", "hashOn": {"header": "x-user-id"}}),
    "Maglev on the path": _with("spec.loadBalancer", {"algorithm": "Maglev", "hashOn": {"path": True}}),
    "a 503 retry": _with("spec.retry", {"attempts": 2, "on": ["connect-failure", "reset", "503"], "perTryTimeout": "1s"}),
    "gRPC health check": _with("spec.healthCheck", {"grpc": {"service": "shop"}, "interval": "2s"}),
    "upper-case host": _with("spec.hosts", ["Shop.Example"]),
    "header and path matches": _with("spec.rules.0.matches", [{"method": "GET", "path": {"type": "Exact", "value": "/a"}, "headers": [{"name": "x-canary", "value": "1"}]}]),
}


@pytest.mark.parametrize("case", sorted(VALID_VARIANTS))
def test_valid_variants_are_accepted(case):
    assert crd_errors(TP, VALID_VARIANTS[case]) == []


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_policies_are_refused_at_apply_time(case):
    assert crd_errors(TP, BROKEN[case]), f"the CRD accepts a policy with {case}"


def _validate_rs() -> str:
    return (REPO / "controller/src/model.rs").read_text()


def test_schema_enums_and_bounds_match_the_controller_validation():
    """The CRD only repeats the name tables and limits of controller/src/model.rs, which validation checks against; they must agree."""
    src = _validate_rs()
    algorithms = re.findall(r'\("(\w+)", pb::Algorithm::\w+\)', src)
    assert algorithms and schema_at(TP_SCHEMA, ".spec.loadBalancer.algorithm")["enum"] == algorithms
    evictions = re.findall(r'\("(\w+)", pb::Eviction::\w+\)', src)
    assert evictions and schema_at(TP_SCHEMA, ".spec.cache.eviction")["enum"] == evictions
    conditions = re.search(r"RETRY_CONDITIONS: \[&str; \d+\] = \[(.*?)\];", src, re.S).group(1)
    on = schema_at(TP_SCHEMA, ".spec.retry.on[]")["pattern"]
    for cond in re.findall(r'"([^"]+)"', conditions) + ["500", "503", "599"]:
        assert re.fullmatch(on, cond), cond
    for bad in ("499", "5000", "5xx ", "Reset"):
        assert not re.fullmatch(on, bad), bad

    def const(name: str) -> int:
        return int(re.search(rf"pub const {name}: i64 = ([\d_]+);", src).group(1).replace("_", ""))

    assert schema_at(TP_SCHEMA, ".spec.rules[].backendRefs[].weight")["maximum"] == const("MAX_WEIGHT")
    assert schema_at(TP_SCHEMA, ".spec.rules[].backendRefs[].priority")["maximum"] == const("MAX_PRIORITY")
    assert schema_at(TP_SCHEMA, ".spec.retry.attempts")["maximum"] == const("MAX_RETRY_ATTEMPTS")


def test_a_node_agent_status_as_the_controller_writes_it_satisfies_the_crd():
    doc = {
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "NodeAgent",
        "metadata": {"name": "kind-worker"},
        "spec": {},
        "status": {
            "connected": True,
            "controller": "weir-controller-7c9d-abcde",
            "zone": "zone-a",
            "agentVersion": "0.1.0",
            "appliedVersion": 1764086400123,
            "lastAckTime": "2025-11-25T16:00:00Z",
            "lastNack": {"version": 1764086400100, "error": "rule 0: no backends", "time": "2025-11-25T15:59:00Z"},
            "cacheHitRatio": 0.93,
        },
    }
    assert crd_errors(NA, doc) == []
    doc["status"]["cacheHitRatio"] = 1.5
    assert crd_errors(NA, doc)
    doc["status"]["cacheHitRatio"] = 0.5
    doc["spec"] = {"node": "x"}
    assert crd_errors(NA, doc), "NodeAgent's spec takes no fields"


def test_the_rendered_notes_example_is_applied_in_a_real_namespace():
    (notes_doc,) = [d for n, d in EXAMPLES if n.startswith("NOTES.txt")]
    assert notes_doc["metadata"]["namespace"] == "default"


def test_example_paths_exist():
    assert Path(CHART_CRDS).is_file()


# Formats the API server knows (apiextensions' OpenAPI validation: kube-openapi's strfmt
# registry plus OpenAPI's numeric formats); any other makes `kubectl apply` warn.
KUBERNETES_FORMATS = {
    "int32", "int64", "float", "double", "byte", "binary", "password", "date", "date-time",
    "datetime", "duration", "uri", "email", "hostname", "ipv4", "ipv6", "cidr", "mac", "uuid",
    "uuid3", "uuid4", "uuid5", "isbn", "isbn10", "isbn13", "creditcard", "ssn", "hexcolor",
    "rgbcolor",
}  # fmt: skip


def _formats(node, path=""):
    """Every `format` of a schema, wherever it sits (properties, items, anyOf, ...)."""
    if isinstance(node, dict):
        if isinstance(node.get("format"), str):
            yield path, node["format"]
        for key, sub in node.items():
            if key == "properties" and isinstance(sub, dict):
                for name, prop in sub.items():
                    yield from _formats(prop, f"{path}.{name}")
            elif key != "properties":
                yield from _formats(sub, f"{path}/{key}")
    elif isinstance(node, list):
        for i, sub in enumerate(node):
            yield from _formats(sub, f"{path}[{i}]")


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_crd_schemas_use_only_formats_kubernetes_knows(kind):
    found = list(_formats(crd_version_schema(CRDS[kind])))
    unknown = [(path, f) for path, f in found if f not in KUBERNETES_FORMATS]
    assert not unknown, f"formats the API server does not know (kubectl apply warns): {unknown}"
    # Mapped, not only dropped: the integer fields still say how wide they are.
    assert any(f == "int64" for _, f in found), found
