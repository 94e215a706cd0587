"""The Helm chart, rendered by the real Helm SDK with default and non-default values.

Each test names the property a cluster operator relies on; every object is also checked
against the Kubernetes schemas of the oldest supported and the newest Kubernetes version.
"""

from __future__ import annotations

import base64
import datetime
import re
from urllib.parse import urlparse

import helm_python as helm
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from chartlib import (
    ALL_SCENARIOS,
    CHART,
    KUBE_VERSIONS,
    NAMESPACE,
    SCENARIOS,
    THIRD_PARTY_KINDS,
    clap_cli,
    containers,
    flag_values,
    kube_validate,
    pod_specs,
    render,
    secret_data,
    selects,
)

# scenario_names: the pod-network, "restricted" ones; all_scenario_names adds HOST_SCENARIOS.
scenario_names = list(SCENARIOS)
all_scenario_names = list(ALL_SCENARIOS)


def rendered(name: str):
    return render(ALL_SCENARIOS[name])


def workload(r, component: str):
    kind = "Deployment" if component == "controller" else "DaemonSet"
    return r.by_component(kind, component)


def container_of(r, component: str) -> dict:
    (c,) = workload(r, component)["spec"]["template"]["spec"]["containers"]
    return c


def args_of(r, component: str) -> dict:
    return flag_values(container_of(r, component)["args"])


# --- every object is valid Kubernetes ------------------------------------------------------


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("scenario", all_scenario_names)
def test_every_object_validates_against_the_kubernetes_schemas(scenario, version):
    r = rendered(scenario)
    assert r.docs, "the chart rendered no objects"
    errors = []
    for doc in r.docs:
        if (doc["apiVersion"], doc["kind"]) in THIRD_PARTY_KINDS:
            continue
        error = kube_validate(doc, version)
        if error:
            errors.append(error)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("scenario", all_scenario_names)
def test_only_known_third_party_kinds_escape_schema_validation(scenario):
    import kubernetes_validate

    for doc in rendered(scenario).docs:
        try:
            kubernetes_validate.validate(doc, KUBE_VERSIONS[-1], strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert (doc["apiVersion"], doc["kind"]) in THIRD_PARTY_KINDS, (
                f"no Kubernetes schema for {doc['apiVersion']} {doc['kind']}: a typo in apiVersion?"
            )


@pytest.mark.parametrize("scenario", all_scenario_names)
def test_objects_are_namespaced_in_the_release_namespace_and_uniquely_named(scenario):
    r = rendered(scenario)
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding"}
    seen = set()
    for d in r.docs:
        meta = d["metadata"]
        key = (d["kind"], meta["name"])
        assert key not in seen, f"{key} rendered twice"
        seen.add(key)
        if d["kind"] in cluster_scoped:
            assert "namespace" not in meta
        else:
            assert meta.get("namespace") == NAMESPACE, f"{key} is not in the release namespace"
        labels = meta.get("labels", {})
        assert labels.get("app.kubernetes.io/managed-by") == "Helm", key
        assert labels.get("app.kubernetes.io/instance") == "weir", key


def test_long_release_names_still_give_valid_names():
    """Helm allows release names of up to 53 characters; Service names must stay DNS labels
    (63 characters, starting with a letter), other names DNS subdomains, label values 63."""
    r = render(None, name="a-very-long-release-name-for-weir-that-goes-on-and-o")
    for d in r.docs:
        name = d["metadata"]["name"]
        if d["kind"] == "Service":
            assert len(name) <= 63 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name
        assert len(name) <= 253 and re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name), name
        for value in d["metadata"]["labels"].values():
            assert len(value) <= 63, (name, value)
        if (d["apiVersion"], d["kind"]) not in THIRD_PARTY_KINDS:
            assert kube_validate(d, KUBE_VERSIONS[-1]) is None


def test_the_crds_ship_in_crds_not_templates():
    r = rendered("default")
    assert not r.of_kind("CustomResourceDefinition"), "CRDs belong in crds/, which Helm installs first"
    with helm.Chart.load(CHART) as chart:
        kinds = sorted(
            doc["spec"]["names"]["kind"]
            for f in chart.crds
            for doc in __import__("yaml").safe_load_all(f["data"])
            if doc
        )
    assert kinds == ["NodeAgent", "TrafficPolicy"]


def test_chart_metadata_follows_helm_v3_conventions():
    with helm.Chart.load(CHART) as chart:
        meta = chart.metadata
    assert meta["apiVersion"] == "v2"
    assert meta["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"])
    assert meta["appVersion"]
    assert meta["kubeVersion"].startswith(">=1.30")


# --- helm lint and the values schema -----------------------------------------------------


@pytest.mark.parametrize("scenario", all_scenario_names)
def test_helm_lint_is_clean(scenario):
    report = helm.lint(CHART, ALL_SCENARIOS[scenario], strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    assert report["errors"] == []
    assert report["total_charts_linted"] == 1
    # Severity 1 is INFO (only "icon is recommended": the project has no icon URL).
    findings = [m for m in report["messages"] if m["severity"] >= 2]
    assert findings == []
    assert all(m["error"] == "icon is recommended" for m in report["messages"]), report["messages"]


def test_default_values_satisfy_the_values_schema():
    with helm.Chart.load(CHART) as chart:
        assert chart.schema is not None, "values.schema.json is missing"
        chart.validate_schema(None)
        for values in ALL_SCENARIOS.values():
            chart.validate_schema(values)


@pytest.mark.parametrize(
    "values, where",
    [
        ({"controllr": {"replicas": 2}}, "controllr"),
        ({"tls": {"mode": "mtls"}}, "/tls/mode"),
        ({"tls": {"plaintext": True}}, "plaintext"),
        ({"controller": {"replicas": "two"}}, "/controller/replicas"),
        ({"controller": {"replicas": -1}}, "/controller/replicas"),
        ({"controller": {"podAntiAffinity": "sometimes"}}, "/controller/podAntiAffinity"),
        ({"controller": {"grpcPort": 70000}}, "/controller/grpcPort"),
        ({"agent": {"image": {"pullPolicy": "Sometimes"}}}, "/agent/image/pullPolicy"),
        ({"agent": {"image": {"digest": "latest"}}}, "/agent/image/digest"),
        ({"agent": {"extraArgs": ["-v"]}}, "/agent/extraArgs"),
        ({"agent": {"resources": {"limits": {"memory": "lots"}}}}, "/agent/resources/limits/memory"),
        ({"serviceMonitor": {"enabled": "yes"}}, "/serviceMonitor/enabled"),
        ({"tls": {"certManager": {"issuerRef": {"name": "x", "kind": "Vault"}}}}, "/tls/certManager/issuerRef/kind"),
        ({"bindAddress": "localhost"}, "/bindAddress"),
        ({"agent": {"cache": {"shared": {"url": "redis://r:6379"}}}}, "shared"),
        ({"agent": {"cache": {"disk": {"enabled": "yes"}}}}, "/agent/cache/disk/enabled"),
        ({"agent": {"cache": {"disk": {"hostPath": "var/cache/weir"}}}}, "/agent/cache/disk/hostPath"),
        ({"agent": {"cache": {"disk": {"sizeLimit": "lots"}}}}, "/agent/cache/disk/sizeLimit"),
        ({"agent": {"cache": {"redis": {"url": "valkey.cache.svc:6379"}}}}, "/agent/cache/redis/url"),
        ({"agent": {"cache": {"redis": {"url": "rediss://valkey.cache.svc:6380"}}}}, "/agent/cache/redis/url"),
        ({"agent": {"cache": {"peers": {"enabled": 1}}}}, "/agent/cache/peers/enabled"),
    ],
)
def test_the_values_schema_rejects_mistakes(values, where):
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError) as e:
            chart.render(values, name="weir", namespace=NAMESPACE)
    assert where in str(e.value)


# --- least privilege -------------------------------------------------------------------------


def _all_strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _all_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _all_strings(v)


@pytest.mark.parametrize("scenario", all_scenario_names)
def test_rbac_has_no_wildcards(scenario):
    for d in rendered(scenario).docs:
        if d["kind"] in ("ClusterRole", "Role"):
            for s in _all_strings(d.get("rules", [])):
                assert "*" not in s, f"{d['kind']}/{d['metadata']['name']} grants {s!r}"
            assert "aggregationRule" not in d


def _grants(role) -> set[tuple[str, str, str, str]]:
    out = set()
    for rule in role["rules"]:
        for group in rule.get("apiGroups", []):
            for res in rule.get("resources", []):
                for verb in rule["verbs"]:
                    for name in rule.get("resourceNames", ["<any>"]):
                        out.add((group, res, verb, name))
    return out


def _expand(spec):
    return {
        (g, r, v, n)
        for groups, resources, verbs, names in spec
        for g in groups
        for r in resources
        for v in verbs
        for n in names
    }


def test_controller_cluster_role_is_exactly_the_contract():
    r = rendered("default")
    role = r.one("ClusterRole", "weir-controller")
    expected = _expand(
        [
            ([""], ["services", "nodes"], ["get", "list", "watch"], ["<any>"]),
            (["discovery.k8s.io"], ["endpointslices"], ["get", "list", "watch"], ["<any>"]),
            (["weir.dev"], ["trafficpolicies"], ["get", "list", "watch"], ["<any>"]),
            (["weir.dev"], ["trafficpolicies/status"], ["get", "patch"], ["<any>"]),
            (["weir.dev"], ["nodeagents"], ["get", "list", "watch", "create", "patch", "delete"], ["<any>"]),
            (["weir.dev"], ["nodeagents/status"], ["get", "patch"], ["<any>"]),
            (["events.k8s.io"], ["events"], ["create", "patch"], ["<any>"]),
        ]
    )
    assert _grants(role) == expected
    assert not any(res in ("secrets", "pods", "configmaps") for _, res, _, _ in _grants(role))


def test_leader_election_is_one_lease_in_the_release_namespace():
    r = rendered("default")
    (role,) = r.of_kind("Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert _grants(role) == {
        ("coordination.k8s.io", "leases", "create", "<any>"),
        ("coordination.k8s.io", "leases", "get", "weir-controller"),
        ("coordination.k8s.io", "leases", "update", "weir-controller"),
    }
    (binding,) = r.of_kind("RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}


@pytest.mark.parametrize("scenario", ["default", "custom"])
def test_only_the_controller_service_account_is_bound(scenario):
    r = rendered(scenario)
    controller_sa = workload(r, "controller")["spec"]["template"]["spec"]["serviceAccountName"]
    agent_sa = workload(r, "agent")["spec"]["template"]["spec"]["serviceAccountName"]
    assert controller_sa != agent_sa
    bindings = r.of_kind("ClusterRoleBinding") + r.of_kind("RoleBinding")
    assert len(bindings) == 2
    for b in bindings:
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": controller_sa, "namespace": NAMESPACE}]
    r.one("ServiceAccount", controller_sa)
    if scenario == "custom":
        assert controller_sa == "weir-ctl"


@pytest.mark.parametrize("scenario", all_scenario_names)
def test_the_agent_has_no_kubernetes_api_access(scenario):
    r = rendered(scenario)
    spec = workload(r, "agent")["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    sa = r.one("ServiceAccount", spec["serviceAccountName"])
    assert sa["automountServiceAccountToken"] is False
    for c in containers(spec):
        for m in c.get("volumeMounts", []):
            assert "serviceaccount" not in m["mountPath"]


# --- pods locked down ----------------------------------------------------------------------


@pytest.mark.parametrize("scenario", scenario_names)
def test_every_container_is_non_root_read_only_and_without_capabilities(scenario):
    r = rendered(scenario)
    pods = list(pod_specs(r))
    assert {w["kind"] for w, _ in pods} == {"Deployment", "DaemonSet"}
    for w, spec in pods:
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, w["metadata"]["name"]
        for c in containers(spec):
            where = f"{w['kind']}/{w['metadata']['name']}/{c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot") is True, where
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 0)) != 0, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("privileged", False) is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            seccomp = sc.get("seccompProfile") or pod_sc.get("seccompProfile")
            assert seccomp == {"type": "RuntimeDefault"}, where
        # The volume types the "restricted" Pod Security Standard allows that weir uses.
        for v in spec.get("volumes", []):
            assert set(v) - {"name"} <= {"secret", "emptyDir"}, v


@pytest.mark.parametrize("scenario", scenario_names)
def test_every_container_has_probes_and_resources(scenario):
    for w, spec in pod_specs(rendered(scenario)):
        for c in containers(spec):
            where = f"{w['kind']}/{w['metadata']['name']}/{c['name']}"
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz", where
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", where
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            for probe in ("livenessProbe", "readinessProbe"):
                assert c[probe]["httpGet"]["port"] == "admin" and "admin" in ports, where
            res = c["resources"]
            assert res["requests"].get("cpu") and res["requests"].get("memory"), where
            assert res["limits"].get("memory"), where
            assert not c["image"].endswith(":latest") and (":" in c["image"] or "@" in c["image"]), where


@pytest.mark.parametrize("scenario", scenario_names)
def test_the_agent_needs_no_host_access(scenario):
    """Pods reach the agent of their own node through the internalTrafficPolicy=Local
    Service, so the agent runs on the pod network: no hostNetwork, hostPort or hostPath."""
    spec = workload(rendered(scenario), "agent")["spec"]["template"]["spec"]
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    for c in containers(spec):
        for p in c.get("ports", []):
            assert "hostPort" not in p
    for v in spec.get("volumes", []):
        assert "hostPath" not in v


# --- wiring: Services, ports, flags ---------------------------------------------------------


@pytest.mark.parametrize("scenario", all_scenario_names)
def test_the_agent_service_keeps_traffic_on_the_node(scenario):
    r = rendered(scenario)
    svc = r.by_component("Service", "agent")
    assert svc["spec"]["internalTrafficPolicy"] == "Local"
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    ds_labels = workload(r, "agent")["spec"]["template"]["metadata"]["labels"]
    ctl_labels = workload(r, "controller")["spec"]["template"]["metadata"]["labels"]
    assert selects(svc["spec"]["selector"], ds_labels)
    assert not selects(svc["spec"]["selector"], ctl_labels)
    proxy = next(p for p in svc["spec"]["ports"] if p["name"] == "proxy")
    assert proxy["port"] == r.values["agent"]["proxyPort"]


@pytest.mark.parametrize("scenario", all_scenario_names)
def test_services_select_their_pods_and_named_ports(scenario):
    r = rendered(scenario)
    for component in ("controller", "agent"):
        svc = r.by_component("Service", component)
        pod = workload(r, component)["spec"]["template"]
        assert selects(svc["spec"]["selector"], pod["metadata"]["labels"])
        assert selects(workload(r, component)["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
        names = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in names, f"{component} Service port {p['name']} targets nothing"


@pytest.mark.parametrize("scenario", all_scenario_names)
def test_flags_and_env_exist_in_the_binaries(scenario):
    """The chart passes only flags the binaries declare (a stray flag crash-loops the pod)."""
    r = rendered(scenario)
    for component, main_rs in (("controller", "controller/src/main.rs"), ("agent", "agent/src/main.rs")):
        cli = clap_cli(main_rs)
        assert {"admin-addr", "tls-cert", "tls-key", "tls-ca"} <= cli.flags, f"could not parse {main_rs}"
        c = container_of(r, component)
        unknown = set(flag_values(c["args"])) - cli.flags
        assert not unknown, f"{component}: {main_rs} has no flag(s) {sorted(unknown)}"
        # Variables the args use as $(NAME) are read by the kubelet, not the binary.
        expanded = {n for a in c["args"] for n in re.findall(r"\$\((\w+)\)", a)}
        for env in c.get("env", []):
            if env["name"] in {e["name"] for e in r.values[component].get("extraEnv", [])} | expanded:
                continue
            assert env["name"] in cli.envs, f"{component}: {main_rs} reads no env {env['name']}"


@pytest.mark.parametrize("scenario", all_scenario_names)
def test_the_downward_api_supplies_namespace_and_node_name(scenario):
    r = rendered(scenario)
    ctl_env = {e["name"]: e for e in container_of(r, "controller")["env"]}
    assert ctl_env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    agent_env = {e["name"]: e for e in container_of(r, "agent")["env"]}
    assert agent_env["WEIR_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


@pytest.mark.parametrize("scenario", all_scenario_names)
def test_listeners_match_ports_and_probes(scenario):
    r = rendered(scenario)
    bind = r.values["bindAddress"]
    host = f"[{bind}]" if ":" in bind else bind
    for component, flags in (
        ("controller", {"grpc-addr": "grpc", "admin-addr": "admin"}),
        ("agent", {"listen": "proxy", "admin-addr": "admin"}),
    ):
        c = container_of(r, component)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        args = flag_values(c["args"])
        for flag, port_name in flags.items():
            assert args[flag] == [f"{host}:{ports[port_name]}"], f"{component} --{flag}"


@pytest.mark.parametrize("scenario", all_scenario_names)
def test_agents_dial_the_controller_service(scenario):
    r = rendered(scenario)
    plaintext = r.values["tls"]["mode"] == "plaintext"
    (url,) = args_of(r, "agent")["controller"]
    u = urlparse(url)
    svc = r.by_component("Service", "controller")
    grpc = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")
    assert u.scheme == ("http" if plaintext else "https")
    assert u.hostname == f"{svc['metadata']['name']}.{NAMESPACE}.svc"
    assert u.port == grpc["port"]


@pytest.mark.parametrize("scenario", all_scenario_names)
def test_tls_flags_and_secrets_line_up(scenario):
    r = rendered(scenario)
    mode = r.values["tls"]["mode"]
    ctl, agent = args_of(r, "controller"), args_of(r, "agent")
    if mode == "plaintext":
        assert "plaintext" in ctl
        for args in (ctl, agent):
            assert not {"tls-cert", "tls-key", "tls-ca"} & set(args)
        assert not r.of_kind("Secret") and not r.of_kind("Certificate")
        return
    assert "plaintext" not in ctl
    secrets = {s["metadata"]["name"] for s in r.of_kind("Secret")}
    secrets |= {c["spec"]["secretName"] for c in r.of_kind("Certificate")}
    for component, args in (("controller", ctl), ("agent", agent)):
        spec = workload(r, component)["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] in secrets
        for flag, key in (("tls-cert", "tls.crt"), ("tls-key", "tls.key"), ("tls-ca", "ca.crt")):
            assert args[flag] == [f"{mounts['tls']}/{key}"], f"{component} --{flag}"


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _eku(cert: x509.Certificate) -> set:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_generated_certificates_chain_to_one_ca_and_name_the_controller_service():
    r = rendered("default")
    (url,) = args_of(r, "agent")["controller"]
    ctl = secret_data(r.one("Secret", "weir-controller-tls"))
    agent = secret_data(r.one("Secret", "weir-agent-tls"))
    for s in (r.one("Secret", "weir-controller-tls"), r.one("Secret", "weir-agent-tls")):
        assert s["type"] == "kubernetes.io/tls"
    assert ctl["ca.crt"] == agent["ca.crt"], "controller and agents must trust the same CA"
    ca = _cert(ctl["ca.crt"])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    for data in (ctl, agent):
        cert = _cert(data["tls.crt"])
        cert.verify_directly_issued_by(ca)
        key = serialization.load_pem_private_key(data["tls.key"], password=None)
        assert key.public_key().public_numbers() == cert.public_key().public_numbers()
        lifetime = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
        assert lifetime > datetime.timedelta(days=3640)
    server = _cert(ctl["tls.crt"])
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert urlparse(url).hostname in names
    assert f"weir-controller.{NAMESPACE}.svc.cluster.local" in names
    assert ExtendedKeyUsageOID.SERVER_AUTH in _eku(server)
    assert ExtendedKeyUsageOID.CLIENT_AUTH in _eku(_cert(agent["tls.crt"]))


def test_generated_certificates_follow_the_cluster_domain():
    r = rendered("custom")
    ctl = secret_data(r.one("Secret", "edge-controller-tls"))
    names = _cert(ctl["tls.crt"]).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert f"edge-controller.{NAMESPACE}.svc.corp.example" in names.get_values_for_type(x509.DNSName)


@pytest.mark.parametrize("scenario", ["cert-manager", "cert-manager-issuer"])
def test_cert_manager_issues_both_certificates(scenario):
    r = rendered(scenario)
    assert not r.of_kind("Secret"), "with cert-manager the chart must not generate keys"
    (url,) = args_of(r, "agent")["controller"]
    server = r.one("Certificate", "weir-controller-tls")
    client = r.one("Certificate", "weir-agent-tls")
    assert urlparse(url).hostname in server["spec"]["dnsNames"]
    assert "server auth" in server["spec"]["usages"]
    assert "client auth" in client["spec"]["usages"]
    known_usages = {"digital signature", "key encipherment", "server auth", "client auth"}
    for cert in (server, client):
        assert set(cert["spec"]["usages"]) <= known_usages
        assert cert["spec"]["privateKey"]["rotationPolicy"] == "Always"
        assert cert["spec"]["issuerRef"] == server["spec"]["issuerRef"]
    issuer = server["spec"]["issuerRef"]
    if scenario == "cert-manager-issuer":
        assert issuer == {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
        assert server["spec"]["duration"] == "720h"
        assert not r.of_kind("Issuer"), "an external issuer needs no bootstrap CA"
    else:
        ca_issuer = r.one("Issuer", issuer["name"])
        ca_cert = r.one("Certificate", "weir-ca")
        assert ca_cert["spec"]["isCA"] is True
        assert ca_issuer["spec"]["ca"]["secretName"] == ca_cert["spec"]["secretName"]
        selfsigned = r.one("Issuer", ca_cert["spec"]["issuerRef"]["name"])
        assert selfsigned["spec"] == {"selfSigned": {}}


def test_service_monitors_scrape_both_components_when_enabled():
    assert not rendered("default").of_kind("ServiceMonitor")
    r = rendered("service-monitor")
    for component in ("controller", "agent"):
        sm = r.by_component("ServiceMonitor", component)
        svc = r.by_component("Service", component)
        assert sm["metadata"]["labels"]["release"] == "prometheus"
        assert selects(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
        assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        (ep,) = sm["spec"]["endpoints"]
        assert ep["path"] == "/metrics"
        assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]}
    other = r.by_component("Service", "agent")
    assert not selects(r.by_component("ServiceMonitor", "controller")["spec"]["selector"]["matchLabels"], other["metadata"]["labels"])


# --- availability ------------------------------------------------------------------------


def test_the_controller_is_highly_available_by_default():
    r = rendered("default")
    dep = workload(r, "controller")
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    terms = dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert terms[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert selects(terms[0]["podAffinityTerm"]["labelSelector"]["matchLabels"], dep["spec"]["template"]["metadata"]["labels"])
    pdb = r.one("PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], dep["spec"]["template"]["metadata"]["labels"])
    assert not selects(pdb["spec"]["selector"]["matchLabels"], workload(r, "agent")["spec"]["template"]["metadata"]["labels"])
    assert pdb["spec"]["maxUnavailable"] == 1


def test_agents_are_replaced_surge_first():
    ds = workload(rendered("default"), "agent")
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


def test_single_replica_drops_anti_affinity_and_pdb():
    r = rendered("single-replica")
    dep = workload(r, "controller")
    assert dep["spec"]["replicas"] == 1
    assert "affinity" not in dep["spec"]["template"]["spec"]
    assert not r.of_kind("PodDisruptionBudget")


def test_custom_values_are_honoured():
    r = rendered("custom")
    dep = r.one("Deployment", "edge-controller")
    ds = r.one("DaemonSet", "edge-agent")
    spec = dep["spec"]["template"]["spec"]
    assert dep["spec"]["replicas"] == 3
    assert spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == "kubernetes.io/hostname"
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert spec["tolerations"][0]["key"] == "dedicated"
    assert spec["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    assert spec["priorityClassName"] == "system-cluster-critical"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    (c,) = spec["containers"]
    assert c["image"] == "registry.example/weir/controller@sha256:" + "ab" * 32
    assert c["imagePullPolicy"] == "Always"
    assert c["resources"]["limits"] == {"cpu": "2", "memory": "1Gi"}
    assert {"name": "RUST_BACKTRACE", "value": "1"} in c["env"]
    assert flag_values(c["args"])["log"] == ["debug"]
    assert r.one("PodDisruptionBudget")["spec"]["maxUnavailable"] == "50%"
    assert r.one("Service", "edge-controller")["metadata"]["annotations"] == {"example.com/owner": "platform"}
    assert all(d["metadata"]["labels"]["team"] == "platform" for d in r.docs)

    aspec = ds["spec"]["template"]["spec"]
    (a,) = aspec["containers"]
    assert a["image"] == "registry.example/weir/agent:1.2.3"
    assert "cpu" not in a["resources"]["limits"], "limits.cpu: null removes the CPU limit"
    assert a["resources"]["limits"]["memory"] == "2Gi"
    args = flag_values(a["args"])
    assert args["workers"] == ["4"]
    assert args["header-read-timeout"] == ["5s"]
    assert args["listen"] == ["[::]:8080"]
    assert aspec["tolerations"] == [{"operator": "Exists"}]
    assert ds["spec"]["template"]["metadata"]["annotations"] == {"example.com/scrape": "true"}
    svc = r.one("Service", "edge-agent")
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"proxy": 8080, "admin": 8081}
    (url,) = args["controller"]
    assert url == f"https://edge-controller.{NAMESPACE}.svc:9000"
    assert r.by_component("ServiceMonitor", "agent")["spec"]["endpoints"][0]["interval"] == "15s"


# --- NOTES.txt ---------------------------------------------------------------------------


def test_notes_tell_the_user_what_to_run_next():
    notes = rendered("default").notes
    for needle in (
        "kubectl get nodeagents",
        "kubectl get tp",
        f"rollout status daemonset/weir-agent",
        f"http://weir-agent.{NAMESPACE}:15001/",
        "kubectl apply --server-side -f",
    ):
        assert needle in notes
    assert "WARNING" not in notes
    assert "WARNING: tls.mode=plaintext" in rendered("plaintext").notes
    assert "http://edge-agent.weir-system:8080/" in rendered("custom").notes


# --- deploy/: images and the kind smoke test ---------------------------------------------


def test_deploy_manifests_validate_against_the_kubernetes_schemas():
    from chartlib import REPO, load_yaml_docs

    docs = [(p, d) for p in sorted(REPO.glob("deploy/**/*.yaml")) for d in load_yaml_docs(p)]
    assert docs
    for path, doc in docs:
        if doc["apiVersion"].startswith("weir.dev/"):
            continue  # checked against the CRD by test_crds.py
        for version in KUBE_VERSIONS:
            assert kube_validate(doc, version) is None, path


@pytest.mark.parametrize("component", ["controller", "agent"])
def test_dockerfiles_build_the_binary_the_chart_runs(component):
    from chartlib import REPO

    dockerfile = (REPO / "deploy" / f"Dockerfile.{component}").read_text()
    r = rendered("default")
    pod = workload(r, component)["spec"]["template"]["spec"]
    assert f"cargo build --release --locked -p weir-{component} --bin weir-{component}" in dockerfile
    assert (REPO / component / "Cargo.toml").read_text().count(f'name = "weir-{component}"') == 1
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    assert user and int(user.group(1)) == pod["securityContext"]["runAsUser"]
    assert re.search(r"^FROM gcr\.io/distroless/\S+:nonroot$", dockerfile, re.M)
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", dockerfile, re.M).group(1).split()}
    assert exposed == {p["containerPort"] for p in pod["containers"][0]["ports"]}
    ignored = (REPO / "deploy" / f"Dockerfile.{component}.dockerignore").read_text().splitlines()
    assert "target/" in ignored and ".git/" in ignored


@pytest.mark.parametrize("script", ["deploy/e2e-kind.sh", "tests/chart/run.sh"])
def test_scripts_are_valid_bash(script):
    import subprocess

    from chartlib import REPO

    subprocess.run(["bash", "-n", str(REPO / script)], check=True)


# --- monitoring: dashboards and alerts ----------------------------------------------------

import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

from chartlib import REPO  # noqa: E402

DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
ALERTS = {
    "WeirControllerDown",
    "WeirAgentNotSynced",
    "WeirConfigNacked",
    "WeirFailoverActive",
    "WeirHigh5xxRatio",
    "WeirCacheHitRatioDrop",
}


def test_monitoring_objects_are_off_by_default():
    r = rendered("default")
    assert not r.of_kind("PrometheusRule")
    assert not [c for c in r.of_kind("ConfigMap") if c["metadata"]["name"].endswith("-dashboards")]


def _dashboards_configmap(r):
    (cm,) = [c for c in r.of_kind("ConfigMap") if c["metadata"]["name"].endswith("-dashboards")]
    return cm


def test_the_dashboards_configmap_ships_every_dashboard_for_the_grafana_sidecar():
    cm = _dashboards_configmap(rendered("monitoring"))
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "weir"}
    assert cm["metadata"]["namespace"] == NAMESPACE
    assert sorted(cm["data"]) == [p.name for p in DASHBOARDS]
    assert len(DASHBOARDS) >= 3
    uids = set()
    for name, text in cm["data"].items():
        # Shipped byte for byte: the sidecar hands the file to Grafana as it is.
        assert text == (CHART / "dashboards" / name).read_text().rstrip("\n")
        d = json.loads(text)
        assert d["uid"] not in uids, name
        uids.add(d["uid"])
        assert d["title"].startswith("weir"), name
        assert d["panels"], name
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for p in d["panels"]:
            assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), (name, p["title"])
            assert p["datasource"]["uid"] == "${datasource}", (name, p["title"])


def test_the_sidecar_label_is_configurable():
    cm = _dashboards_configmap(
        render({"monitoring": {"grafanaDashboards": {"enabled": True, "label": "grafana.io/dashboard", "labelValue": "weir"}}})
    )
    assert cm["metadata"]["labels"]["grafana.io/dashboard"] == "weir"
    assert "grafana_dashboard" not in cm["metadata"]["labels"]


def _metric_names(text: str) -> set[str]:
    return set(re.findall(r"(?<![A-Za-z0-9_.])weir_[a-z0-9_]+", text))


def _declared_metrics() -> set[str]:
    """Metric families the Rust sources register: the agent's (prefix weir_agent) and the
    controller's (prefix weir_controller, or a full weir_ name on its root registry)."""
    names = set()
    register = re.compile(r'register\(\s*"([a-z0-9_]+)"')
    for n in register.findall((REPO / "agent/src/metrics.rs").read_text()):
        names.add(f"weir_agent_{n}")
    for n in register.findall((REPO / "controller/src/serve/admin.rs").read_text()):
        names.add(n if n.startswith("weir_") else f"weir_controller_{n}")
    return names


def _family(sample_name: str) -> str:
    """The family a sample name belongs to: without _bucket/_sum/_count, then _total."""
    base = re.sub(r"_(bucket|sum|count)$", "", sample_name)
    return re.sub(r"_total$", "", base)


def test_dashboards_and_alerts_use_only_metrics_the_binaries_register():
    # tests/tests/metrics.rs checks the same names against a real /metrics scrape.
    declared = _declared_metrics()
    assert "weir_controller_push_latency_seconds" in declared and "weir_agent_requests" in declared
    used = set()
    for path in DASHBOARDS + [CHART / "templates/prometheusrule.yaml"]:
        used |= _metric_names(path.read_text())
    assert len(used) >= 15
    unknown = sorted(n for n in used if n not in declared and _family(n) not in declared)
    assert not unknown, f"metrics no binary registers: {unknown}"


def _prometheus_rule():
    return rendered("monitoring").one("PrometheusRule")


def test_every_alert_has_a_duration_severity_summary_and_description():
    rule = _prometheus_rule()
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    assert {a["alert"] for a in alerts} == ALERTS
    for a in alerts:
        assert a["for"], a["alert"]
        assert a["labels"]["severity"] in {"warning", "critical"}, a["alert"]
        assert a["annotations"]["summary"] and len(a["annotations"]["description"]) > 80, a["alert"]


def _promtool() -> str:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: install Debian's prometheus package (.ci/run does)"
    return promtool


def test_the_alert_rules_pass_promtool_check_and_unit_tests():
    promtool = _promtool()
    with tempfile.TemporaryDirectory() as tmp:
        rules = Path(tmp) / "rules.yaml"
        rules.write_text(yaml.safe_dump({"groups": _prometheus_rule()["spec"]["groups"]}, sort_keys=False))
        check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        assert f"SUCCESS: {len(ALERTS)} rules found" in check.stdout, check.stdout
        shutil.copy(REPO / "tests/chart/rules_test.yaml", Path(tmp) / "rules_test.yaml")
        test = subprocess.run(
            [promtool, "test", "rules", "rules_test.yaml"], cwd=tmp, capture_output=True, text=True
        )
        assert test.returncode == 0, test.stdout + test.stderr
        assert "SUCCESS" in test.stdout, test.stdout


def test_the_promtool_unit_tests_cover_firing_and_silence():
    tests = yaml.safe_load((REPO / "tests/chart/rules_test.yaml").read_text())
    fired, silent = set(), set()
    for t in tests["tests"]:
        for case in t.get("alert_rule_test", []):
            (fired if case["exp_alerts"] else silent).add(case["alertname"])
    assert len(fired & silent) >= 2, (fired, silent)


@pytest.mark.parametrize(
    "values, where",
    [
        ({"monitoring": {"grafanaDashboard": {"enabled": True}}}, "grafanaDashboard"),
        ({"monitoring": {"prometheusRule": {"enabled": "yes"}}}, "/monitoring/prometheusRule/enabled"),
        ({"monitoring": {"prometheusRule": {"high5xxRatio": 5}}}, "/monitoring/prometheusRule/high5xxRatio"),
        (
            {"monitoring": {"prometheusRule": {"cacheHitRatioDropFactor": 0}}},
            "/monitoring/prometheusRule/cacheHitRatioDropFactor",
        ),
    ],
)
def test_the_values_schema_rejects_monitoring_mistakes(values, where):
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError) as e:
            chart.render(values, name="weir", namespace=NAMESPACE)
    assert where in str(e.value)
# --- zero-downtime restart: the listening-socket hand-off (agent.hostNetwork) --------------


def test_pod_network_agents_hand_nothing_over():
    """On the pod network every agent pod has its own sockets: the hand-off is off."""
    args = args_of(rendered("default"), "agent")
    assert args["handoff-socket"] == ["off"]
    assert "exit-after-handoff" not in args


def test_host_network_agents_take_the_sockets_over_surge_first():
    """On the host network the old and the new pod of a node share the ports: the new agent
    takes the sockets over through a socket in a hostPath both pods mount, the old one
    stays idle until it is deleted, and the update starts the new pod first."""
    r = render({"agent": {"hostNetwork": True, "handoff": {"hostPath": "/run/weir-edge"}}})
    ds = workload(r, "agent")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] == 1
    (vol,) = [v for v in spec["volumes"] if "hostPath" in v]
    assert vol["hostPath"] == {"path": "/run/weir-edge", "type": "DirectoryOrCreate"}
    agent = container_of(r, "agent")
    (mount,) = [m for m in agent["volumeMounts"] if m["name"] == vol["name"]]
    args = flag_values(agent["args"])
    socket = args["handoff-socket"][0]
    assert socket.startswith(mount["mountPath"] + "/")
    assert args["exit-after-handoff"] == ["false"]
    # The init container gives the folder to the agent's user, as root with CHOWN only.
    (init,) = spec["initContainers"]
    assert [m["mountPath"] for m in init["volumeMounts"]] == [mount["mountPath"]]
    assert f"chown {spec['securityContext']['runAsUser']}:{spec['securityContext']['runAsGroup']} {mount['mountPath']}" in init["command"][-1]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert init["image"] == "docker.io/library/busybox:1.37"
    for version in KUBE_VERSIONS:
        for doc in r.docs:
            if (doc["apiVersion"], doc["kind"]) not in THIRD_PARTY_KINDS:
                assert kube_validate(doc, version) is None, doc["kind"]


# --- the agent's cache tiers (agent.cache) -------------------------------------------------

CACHE_FLAGS = {"cache-dir", "cache-redis", "cache-peer-addr"}


def _agent_pod(r):
    return workload(r, "agent")["spec"]["template"]["spec"]


@pytest.mark.parametrize("scenario", ["default", "custom", "host-network"])
def test_cache_tiers_are_off_unless_asked_for(scenario):
    r = rendered(scenario)
    agent = container_of(r, "agent")
    assert not CACHE_FLAGS & set(flag_values(agent["args"]))
    assert "POD_IP" not in {e["name"] for e in agent["env"]}
    assert "cache" not in {v["name"] for v in _agent_pod(r)["volumes"]}
    assert "cache" not in {m["name"] for m in agent["volumeMounts"]}
    # A hostPath alone does not turn the tier on.
    r = render({"agent": {"cache": {"disk": {"hostPath": "/var/cache/weir"}}}})
    assert "cache-dir" not in args_of(r, "agent")
    assert "initContainers" not in _agent_pod(r)


def test_the_disk_tier_gets_an_emptydir_of_its_own():
    r = rendered("cache-disk")
    spec = _agent_pod(r)
    agent = container_of(r, "agent")
    (cache_dir,) = flag_values(agent["args"])["cache-dir"]
    (mount,) = [m for m in agent["volumeMounts"] if m["mountPath"] == cache_dir]
    assert not mount.get("readOnly")
    (vol,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert vol == {"name": mount["name"], "emptyDir": {"sizeLimit": "5Gi"}}
    # Not the state folder (16Mi, persisted routing table) and not under it.
    state = next(m["mountPath"] for m in agent["volumeMounts"] if m["name"] == "state")
    assert not cache_dir.startswith(state + "/") and cache_dir != state
    assert agent["securityContext"]["readOnlyRootFilesystem"] is True
    assert "initContainers" not in spec, "an emptyDir takes fsGroup: no chown needed"
    # Default size; null removes the limit.
    default = _agent_pod(render({"agent": {"cache": {"disk": {"enabled": True}}}}))
    assert {"name": vol["name"], "emptyDir": {"sizeLimit": "1Gi"}} in default["volumes"]
    unbounded = _agent_pod(render({"agent": {"cache": {"disk": {"enabled": True, "sizeLimit": None}}}}))
    assert {"name": vol["name"], "emptyDir": {}} in unbounded["volumes"]


def test_the_disk_tier_on_a_host_path_is_given_to_the_agent_user():
    r = rendered("cache-disk-host-path")
    spec = _agent_pod(r)
    agent = container_of(r, "agent")
    (cache_dir,) = flag_values(agent["args"])["cache-dir"]
    (mount,) = [m for m in agent["volumeMounts"] if m["mountPath"] == cache_dir]
    (vol,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert vol == {"name": mount["name"], "hostPath": {"path": "/var/cache/weir-edge", "type": "DirectoryOrCreate"}}
    (init,) = spec["initContainers"]
    assert [(m["name"], m["mountPath"]) for m in init["volumeMounts"]] == [(vol["name"], cache_dir)]
    sc = spec["securityContext"]
    assert f"chown {sc['runAsUser']}:{sc['runAsGroup']} {cache_dir}" in init["command"][-1]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    assert agent["securityContext"]["readOnlyRootFilesystem"] is True
    # With hostNetwork too: both folders get their init container, under distinct names.
    both = _agent_pod(render({"agent": {"hostNetwork": True, "cache": {"disk": {"enabled": True, "hostPath": "/var/cache/weir"}}}}))
    inits = {i["name"]: i["volumeMounts"][0]["mountPath"] for i in both["initContainers"]}
    assert inits == {"handoff-dir": "/run/weir", "cache-dir": "/var/cache/weir"}


def test_the_shared_tier_gets_the_url_verbatim():
    r = rendered("cache-redis")
    assert args_of(r, "agent")["cache-redis"] == ["redis://valkey.cache.svc:6379/2"]
    assert {v["name"] for v in _agent_pod(r)["volumes"]} == {v["name"] for v in _agent_pod(rendered("default"))["volumes"]}
    # Characters YAML would read otherwise (#, ", :) survive the template.
    url = 'redis://:p#w"d: x@valkey:6379'
    r = render({"agent": {"cache": {"redis": {"url": url.replace(" ", "")}}}})
    assert args_of(r, "agent")["cache-redis"] == [url.replace(" ", "")]


def test_peers_reach_this_agent_at_its_pod_ip_and_proxy_port():
    r = rendered("cache-peers")
    agent = container_of(r, "agent")
    (addr,) = flag_values(agent["args"])["cache-peer-addr"]
    proxy = next(p["containerPort"] for p in agent["ports"] if p["name"] == "proxy")
    assert proxy == 8080
    assert addr == f"$(POD_IP):{proxy}"
    # The kubelet expands $(POD_IP) only from a variable the container defines.
    env = {e["name"]: e for e in agent["env"]}
    assert env["POD_IP"] == {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    assert not {"cache-dir", "cache-redis"} & set(flag_values(agent["args"]))
