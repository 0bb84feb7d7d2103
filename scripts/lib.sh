# Shared steps of scripts/run and scripts/test: install what is missing, nothing more.
# shellcheck shell=bash

# torch's CPU build: on a Pi (aarch64) this is what PyPI serves; on x86-64 machines an unpinned
# torch would pull a multi-GB CUDA build. Override with EDGEAI_TORCH_SPEC (e.g. for a GPU host).
TORCH_SPEC=${EDGEAI_TORCH_SPEC:-torch==2.13.0}
VENV=${EDGEAI_VENV:-.venv}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# ensure_apt PACKAGE...: install the Debian packages that are not installed yet.
# Sets APT_INSTALLED to the packages it installed.
ensure_apt() {
  local missing=() package
  APT_INSTALLED=()  # read by the scripts that source this file
  for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} (apt)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # shellcheck disable=SC2034 # read by the scripts that source this file
    APT_INSTALLED=("${missing[@]}")
  fi
}

# ensure_venv [EXTRAS]: a virtual environment with torch's CPU build and this project installed.
ensure_venv() {
  local extras=${1:-} stamp
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    ensure_apt python3-venv
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    echo "creating the virtual environment $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
  fi
  if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    echo "installing $TORCH_SPEC"
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
  fi
  stamp="$VENV/.edgeai-installed${extras:+-$extras}"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "installing edgeai-agent${extras:+[$extras]} and its dependencies"
    "$VENV/bin/python" -m pip install -q -e ".${extras:+[$extras]}"
    touch "$stamp"
  fi
}
