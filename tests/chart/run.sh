#!/usr/bin/env bash
# The Helm chart's tests: fails when the chart's CRDs differ from what the Rust types
# generate, then renders the chart with the real Helm SDK and checks it (tests/chart/*.py).
#
#   bash tests/chart/run.sh            # everything
#   bash tests/chart/run.sh -k rbac    # extra arguments go to pytest
#
# Needs python3 >= 3.10 and PyPI (the first run installs tests/chart/requirements.txt into
# target/chart-venv; later runs reuse it). No helm binary, cluster or other network access:
# helm-python-sdk bundles Helm's Go SDK, kubernetes-validate bundles the Kubernetes schemas.
set -euo pipefail
cd "$(dirname "$0")/../.."

venv="${WEIR_CHART_VENV:-target/chart-venv}"
requirements=tests/chart/requirements.txt
export PYTHONDONTWRITEBYTECODE=1

python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "tests/chart needs python3 >= 3.10")'
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [[ ! -x "$venv/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    echo "== tests/chart: installing $requirements into $venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
    echo "$want" > "$stamp"
fi

echo "== tests/chart: CRDs generated from the Rust types vs charts/weir/crds/crds.yaml"
generated="$(mktemp)"
trap 'rm -f "$generated"' EXIT
cargo run -q -p weir-controller --bin crdgen > "$generated"
if ! diff -u charts/weir/crds/crds.yaml "$generated"; then
    echo "charts/weir/crds/crds.yaml is out of date; regenerate it with" >&2
    echo "  cargo run -q -p weir-controller --bin crdgen > charts/weir/crds/crds.yaml" >&2
    exit 1
fi

echo "== tests/chart: pytest"
WEIR_CRDGEN_OUTPUT="$generated" "$venv/bin/python" -m pytest tests/chart -q -p no:cacheprovider "$@"
