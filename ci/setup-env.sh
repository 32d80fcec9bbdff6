#!/usr/bin/env bash
# Set up what a make target needs, idempotently; a second run only checks (about a second).
#   bash ci/setup-env.sh lab|test [helm] [docker]
#   lab     the Python environment with pyworker[lab] (editable) + redis-server   (make demo)
#   test    the same with pyworker[test,lab], + openssl and setpriv              (tests, benches)
#   helm    + the pinned helm 4/3 and kubernetes-validate (ci/get-helm.sh)
#   docker  + docker.io, debootstrap and a running dockerd (ci/setup-image.sh)
# The Python environment: an active virtual environment ($VIRTUAL_ENV) is used as it is, else the
# project's own .venv/ is made (python3 -m venv; Debian's python3-venv is installed first when
# root and missing): nothing goes into the system Python. The Makefile passes VENV and PYTHON
# (= $VENV/bin/python); a PYTHON of its own (make PYTHON=...) is installed into as it is.
# System packages come from apt when root; otherwise one line says which command to run.
# Everything it prints goes to stderr.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-${VIRTUAL_ENV:-$REPO/.venv}}
PYTHON=${PYTHON:-$VENV/bin/python}
BOOTSTRAP_PYTHON=${BOOTSTRAP_PYTHON:-python3}
# What was installed, for which pyproject.toml: in the environment, or for a PYTHON of one's own
# in build/ (ignored by git).
if [[ $PYTHON == "$VENV/bin/python" ]]; then
  STAMP=$VENV/.pyworker-setup
else
  STAMP=$REPO/build/setup-$(printf '%s' "$PYTHON" | sha256sum | cut -c1-12)
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
t0=$SECONDS

log() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: %s\n' "$*" >&2; exit 1; }

APT_UPDATED=0
apt_install() { # packages...: installs them, or says in one line what to run and fails
  if [[ $(id -u) != 0 ]]; then
    die "missing $*: run  sudo apt-get install -y $*  (then this command again)"
  fi
  command -v apt-get >/dev/null || die "missing $*: install them with your system's package manager"
  log "apt-get install $* ..."
  if ((APT_UPDATED == 0)); then
    timeout 600 apt-get update -q >/dev/null || die "apt-get update failed"
    APT_UPDATED=1
  fi
  timeout 900 apt-get install -y -q --no-install-recommends "$@" >/dev/null \
    || die "apt-get install $* failed"
}

system_packages() { # mode
  local missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  if [[ $1 == test ]]; then
    command -v openssl >/dev/null || missing+=(openssl)       # the TLS test's certificate
    command -v setpriv >/dev/null || missing+=(util-linux)    # parent-death signal
  fi
  if ((${#missing[@]})); then
    apt_install "${missing[@]}"
  fi
}

make_venv() {
  [[ -x $PYTHON ]] && return 0
  if [[ -n ${VIRTUAL_ENV:-} && $VENV == "$VIRTUAL_ENV" ]]; then
    die "the active virtual environment $VIRTUAL_ENV has no bin/python"
  fi
  command -v "$BOOTSTRAP_PYTHON" >/dev/null || apt_install python3 python3-venv
  log "creating ${VENV#"$REPO"/} ($("$BOOTSTRAP_PYTHON" --version 2>&1)) ..."
  local existed=0
  [[ -e $VENV ]] && existed=1
  if ! "$BOOTSTRAP_PYTHON" -m venv "$VENV" >/dev/null 2>&1; then
    ((existed)) || rm -rf "$VENV"  # a venv without pip (no ensurepip) is left half made
    apt_install python3-venv
    "$BOOTSTRAP_PYTHON" -m venv "$VENV" || die "$BOOTSTRAP_PYTHON -m venv $VENV failed"
  fi
}

# What the install depends on: pyproject.toml, the extras and where the package is (editable).
stamp_key() { # extras
  { cat "$REPO/pyproject.toml"; echo "$1 $REPO"; } | sha256sum | cut -d' ' -f1
}

modules_ok() { # module...: pyworker is this checkout's and every module is importable
  "$PYTHON" - "$REPO" "$@" <<'PY' 2>/dev/null
import importlib.util, os, sys
repo, mods = sys.argv[1], sys.argv[2:]
spec = importlib.util.find_spec("pyworker")
ok = spec is not None and os.path.dirname(spec.origin) == os.path.join(repo, "pyworker")
sys.exit(0 if ok and all(importlib.util.find_spec(m) for m in mods) else 1)
PY
}

installed() { # "extras..." module...: a stamp of one of those extras matches, and modules_ok
  local extras=$1 e; shift
  [[ -f $STAMP ]] || return 1
  for e in $extras; do
    if grep -qxF "$(stamp_key "$e")" "$STAMP"; then
      modules_ok "$@"
      return
    fi
  done
  return 1
}

pip_install() { # extras "enough extras" module...
  local extras=$1 enough=$2 where=${VENV#"$REPO"/}
  [[ $PYTHON == "$VENV/bin/python" ]] || where=$PYTHON
  shift 2
  if installed "$enough" "$@"; then
    log "pyworker[$extras] is installed in $where"
    return 0
  fi
  local pipelog t=$SECONDS ticker rc=0
  pipelog=$(mktemp "${TMPDIR:-/tmp}/pyworker-pip.XXXXXX")
  log "pip install -e '.[$extras]' into $where (the first time takes minutes; log $pipelog) ..."
  # Progress every 10 s: packages collected so far and pip's last line.
  (last=$SECONDS
   while sleep 1; do  # 1 s steps: a killed ticker leaves no long sleep behind
     if ((SECONDS - last >= 10)); then
       last=$SECONDS
       log "  ... $((SECONDS - t)) s, $(grep -c '^Collecting' "$pipelog") packages:" \
           "$(tail -n 1 "$pipelog" | cut -c1-70)"
     fi
   done) &
  ticker=$!
  timeout 1200 "$PYTHON" -m pip install --progress-bar off -e "$REPO[$extras]" >"$pipelog" 2>&1 \
    || rc=$?
  kill "$ticker" 2>/dev/null; wait "$ticker" 2>/dev/null || true
  if ((rc)); then
    tail -n 20 "$pipelog" >&2
    die "pip install -e '.[$extras]' failed ($rc; log $pipelog)"
  fi
  rm -f "$pipelog"
  modules_ok "$@" || die "pip install -e '.[$extras]' ran, but $PYTHON cannot find pyworker (in $REPO) or one of: $*"
  mkdir -p "$(dirname "$STAMP")"
  stamp_key "$extras" >>"$STAMP"
  log "installed pyworker[$extras] in $((SECONDS - t)) s"
}

main() {
  local mode=${1:-} extra
  case $mode in
    lab) ;;
    test) ;;
    *) die "usage: ci/setup-env.sh lab|test [helm] [docker]" ;;
  esac
  shift
  system_packages "$mode"
  if [[ $PYTHON == "$VENV/bin/python" ]]; then
    make_venv
  fi
  "$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip"
  if [[ $mode == lab ]]; then
    pip_install lab "lab test,lab" jupyterlab
  else
    pip_install test,lab test,lab jupyterlab pytest websocket
  fi
  for extra in "$@"; do
    case $extra in
      helm)
        log "helm 4 and 3 (pinned) and kubernetes-validate: ci/get-helm.sh"
        # The tests find them where it puts them (the cache; see tests/chart/chartlib.py).
        PYTHON=$PYTHON timeout 900 bash "$REPO/ci/get-helm.sh" >&2
        ;;
      docker)
        log "Docker: ci/setup-image.sh"
        PYTHON=$PYTHON timeout 1500 bash "$REPO/ci/setup-image.sh" >&2
        ;;
      *) die "unknown part $extra (helm, docker)" ;;
    esac
  done
  log "ready in $((SECONDS - t0)) s"
}

main "$@"
