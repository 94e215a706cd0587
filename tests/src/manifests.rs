//! YAML manifests for tests, in the exact shape a cluster (and local mode) reads.

/// A Service with one unnamed port; `app_protocol` e.g. `kubernetes.io/h2c`.
pub fn service(name: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  ports:\n    - port: {port}\n"
    )
}

/// An EndpointSlice for `service` with endpoints `(ip, ready)` on `port`.
pub fn slice(service: &str, port: u16, endpoints: &[(&str, bool)]) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-1\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n  - port: {port}\nendpoints:\n"
    );
    for (ip, ready) in endpoints {
        s.push_str(&format!(
            "  - addresses: [\"{ip}\"]\n    conditions: {{ready: {ready}}}\n"
        ));
    }
    s
}

/// A TrafficPolicy; `backends` are `(service, port, weight, priority)`.
pub fn policy(
    name: &str,
    hosts: &[&str],
    backends: &[(&str, u16, i64, i64)],
    extra: &str,
) -> String {
    let hosts = hosts
        .iter()
        .map(|h| format!("\"{h}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let mut s = format!(
        "apiVersion: weir.dev/v1alpha1\nkind: TrafficPolicy\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  hosts: [{hosts}]\n{extra}  rules:\n    - backendRefs:\n"
    );
    for (svc, port, weight, priority) in backends {
        s.push_str(&format!(
            "        - {{name: {svc}, port: {port}, weight: {weight}, priority: {priority}}}\n"
        ));
    }
    s
}

/// Joins documents into one multi-document file.
pub fn docs(parts: &[String]) -> String {
    parts.join("---\n")
}

/// A Service whose port speaks HTTP/2 cleartext (`appProtocol: kubernetes.io/h2c`), as a
/// gRPC Service declares it.
pub fn service_h2c(name: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  ports:\n    - port: {port}\n      appProtocol: kubernetes.io/h2c\n"
    )
}
