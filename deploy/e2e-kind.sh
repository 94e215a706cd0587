#!/usr/bin/env bash
# Real-cluster smoke test, for machines with Docker (weir's CI has none, so CI never runs it):
#
#   1. builds both images from deploy/Dockerfile.*,
#   2. creates a kind cluster (a control plane and two workers in zones zone-a / zone-b)
#      and loads the images into it,
#   3. installs charts/weir (mTLS with chart-generated certificates) into a namespace that
#      enforces the restricted Pod Security Standard, and waits for it,
#   4. checks one connected NodeAgent per worker,
#   5. deploys deploy/e2e/demo.yaml (shop-v1 x2, shop-v2 x1, a 90/10 TrafficPolicy), waits
#      for the policy to be Accepted, and sends 200 requests through the node-local agent
#      Service from a client pod: both versions must answer, shop-v1 most of the time,
#   6. scales shop-v1 to zero: every request must then reach shop-v2 (failover).
#
# Needs docker, kind (>= 0.20), kubectl and helm (3.8+ or 4). The cluster is deleted at the
# end unless KEEP=1. On failure it prints the pods, events and weir's logs.
#
#   deploy/e2e-kind.sh
#   KEEP=1 CLUSTER=weir-dev deploy/e2e-kind.sh
#
# What it exercises: the controller's Kubernetes mode (reflectors on TrafficPolicies,
# Services and EndpointSlices, leader election on the Lease weir-controller, status and
# NodeAgent writing; README "Kubernetes mode"), the agents' mTLS stream to it, and the chart.
# weir's CI has no Docker, so there the same code paths run against a fake API server
# (tests/tests/kube_mode.rs) and the chart is checked without a cluster (tests/chart/run.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER="${CLUSTER:-weir-e2e}"
NAMESPACE="${NAMESPACE:-weir-system}"
TAG="${TAG:-e2e-$(git rev-parse --short HEAD 2>/dev/null || echo dev)}"
REQUESTS="${REQUESTS:-200}"
CURL_IMAGE="${CURL_IMAGE:-docker.io/curlimages/curl:8.11.1}"

log() { printf '\n== %s\n' "$*"; }
die() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

for tool in docker kind kubectl helm; do
    command -v "$tool" >/dev/null || die "$tool is not installed (needed: docker, kind, kubectl, helm)"
done
docker info >/dev/null 2>&1 || die "docker is installed but its daemon does not answer"

diagnose() {
    set +e
    log "diagnostics"
    kubectl get pods -A -o wide
    kubectl get nodeagents,trafficpolicies -A
    kubectl -n "$NAMESPACE" get events --sort-by=.lastTimestamp | tail -30
    kubectl -n "$NAMESPACE" logs deployment/weir-controller --all-containers --tail=100
    kubectl -n "$NAMESPACE" logs daemonset/weir-agent --all-containers --tail=100
}

cleanup() {
    local status=$?
    if [[ $status -ne 0 ]]; then
        diagnose
    fi
    if [[ "${KEEP:-0}" == 1 ]]; then
        echo "KEEP=1: cluster $CLUSTER left running (kind delete cluster --name $CLUSTER)"
    else
        kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    fi
    exit "$status"
}

log "1. building weir-controller:$TAG and weir-agent:$TAG"
docker build -f deploy/Dockerfile.controller -t "weir-controller:$TAG" .
docker build -f deploy/Dockerfile.agent -t "weir-agent:$TAG" .

log "2. kind cluster $CLUSTER"
if ! kind get clusters | grep -qx "$CLUSTER"; then
    kind create cluster --name "$CLUSTER" --wait 180s --config - <<'EOF'
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
  - role: worker
  - role: worker
EOF
fi
trap cleanup EXIT
kubectl config use-context "kind-$CLUSTER" >/dev/null
workers=()
while IFS= read -r node; do workers+=("$node"); done < <(
    kubectl get nodes -l '!node-role.kubernetes.io/control-plane' -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}'
)
[[ ${#workers[@]} -eq 2 ]] || die "expected 2 worker nodes, found ${#workers[@]}"
kubectl label node "${workers[0]}" topology.kubernetes.io/zone=zone-a --overwrite
kubectl label node "${workers[1]}" topology.kubernetes.io/zone=zone-b --overwrite
kind load docker-image --name "$CLUSTER" "weir-controller:$TAG" "weir-agent:$TAG"

log "3. helm install weir (into a namespace that enforces the restricted Pod Security Standard)"
kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f -
kubectl label namespace "$NAMESPACE" pod-security.kubernetes.io/enforce=restricted --overwrite
helm upgrade --install weir charts/weir --namespace "$NAMESPACE" \
    --set controller.image.repository=weir-controller --set-string controller.image.tag="$TAG" \
    --set agent.image.repository=weir-agent --set-string agent.image.tag="$TAG" \
    --wait --timeout 5m
kubectl get crd trafficpolicies.weir.dev nodeagents.weir.dev >/dev/null

log "4. one connected NodeAgent per worker"
for _ in $(seq 60); do
    connected="$(kubectl get nodeagents -o jsonpath='{range .items[?(@.status.connected==true)]}{.metadata.name}{"\n"}{end}' | sort)"
    [[ "$connected" == "$(printf '%s\n' "${workers[@]}" | sort)" ]] && break
    sleep 2
done
kubectl get nodeagents
[[ "$connected" == "$(printf '%s\n' "${workers[@]}" | sort)" ]] || die "NodeAgents connected: [$connected], workers: [${workers[*]}]"

log "5. demo backends and a 90/10 TrafficPolicy"
kubectl apply -f deploy/e2e/demo.yaml
kubectl -n weir-e2e rollout status deployment/shop-v1 --timeout=3m
kubectl -n weir-e2e rollout status deployment/shop-v2 --timeout=3m
kubectl -n weir-e2e wait trafficpolicy/shop --for=jsonpath='{.status.conditions[?(@.type=="Accepted")].status}'=True --timeout=60s
kubectl -n weir-e2e get tp

# Requests from a pod on a worker, through the weir-agent Service (internalTrafficPolicy:
# Local, so they go to the agent on the client's node). Prints one pod name per request.
send() {
    kubectl -n weir-e2e run "client-$1" --rm -i --restart=Never --quiet --image="$CURL_IMAGE" \
        --command -- sh -c "for i in \$(seq $REQUESTS); do
            curl -s -m 5 -H 'Host: shop' http://weir-agent.$NAMESPACE:15001/hostname || printf error; echo
        done"
}

answers="$(send split)"
v1="$(grep -c '^shop-v1-' <<<"$answers" || true)"
v2="$(grep -c '^shop-v2-' <<<"$answers" || true)"
echo "shop-v1: $v1, shop-v2: $v2, of $REQUESTS"
(( v1 + v2 == REQUESTS )) || die "$((REQUESTS - v1 - v2)) requests failed or went elsewhere"
(( v2 > 0 && v1 >= REQUESTS * 75 / 100 && v1 <= REQUESTS * 98 / 100 )) || die "not a 90/10 split"

log "6. failover: shop-v1 scaled to zero"
kubectl -n weir-e2e scale deployment/shop-v1 --replicas=0
kubectl -n weir-e2e wait pod -l app=shop-v1 --for=delete --timeout=60s
sleep 3 # EndpointSlice -> controller -> agents
answers="$(send failover)"
v2="$(grep -c '^shop-v2-' <<<"$answers" || true)"
echo "shop-v2: $v2 of $REQUESTS"
(( v2 == REQUESTS )) || die "only $v2 of $REQUESTS requests reached shop-v2 after shop-v1 went away"

log "PASS"
