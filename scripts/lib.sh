# Shared steps of scripts/run and scripts/test: install what is missing, nothing more.
# shellcheck shell=bash

# Which torch: PyPI's torch wheels are CUDA builds, on x86-64 and on arm64 alike (4 GB with
# their NVIDIA libraries on a Pi that can never use them). EDGEAI_TORCH chooses:
#   auto  (default) the CPU build, unless an NVIDIA GPU is present
#   cpu   the CPU build, from PyTorch's own wheel index (about 0.2 GB on arm64)
#   cuda  PyPI's build
# EDGEAI_TORCH_VERSION pins the release; EDGEAI_TORCH_SPEC replaces the whole requirement.
TORCH_VERSION=${EDGEAI_TORCH_VERSION:-2.13.0}
TORCH_CPU_INDEX=${EDGEAI_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
TORCH_ARM64_PYPI_CPU=2.9.1  # the last release whose arm64 wheel on PyPI is a CPU build
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

has_nvidia_gpu() { [ -e /proc/driver/nvidia/version ] || command -v nvidia-smi >/dev/null 2>&1; }

reachable() {
  "$VENV/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=15)' "$1" 2>/dev/null
}

# install_torch: torch into $VENV, the build EDGEAI_TORCH asks for (see the top of this file).
install_torch() {
  local choice=${EDGEAI_TORCH:-auto} pip=("$VENV/bin/python" -m pip install -q)
  if [ -n "${EDGEAI_TORCH_SPEC:-}" ]; then
    echo "installing $EDGEAI_TORCH_SPEC (EDGEAI_TORCH_SPEC)"
    "${pip[@]}" "$EDGEAI_TORCH_SPEC"
    return
  fi
  if [ "$choice" = auto ]; then
    if has_nvidia_gpu; then choice=cuda; else choice=cpu; fi
  fi
  case "$choice" in
    cuda)
      echo "installing torch==$TORCH_VERSION from PyPI (a CUDA build, several GB)"
      "${pip[@]}" "torch==$TORCH_VERSION"
      ;;
    cpu)
      if reachable "$TORCH_CPU_INDEX/torch/"; then
        echo "installing torch==$TORCH_VERSION, CPU build, from $TORCH_CPU_INDEX"
        "${pip[@]}" --index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION"
      elif [ "$(uname -m)" = aarch64 ]; then
        echo "PyTorch's CPU wheel index ($TORCH_CPU_INDEX) cannot be reached from here." >&2
        echo "PyPI's torch $TORCH_VERSION for arm64 is a CUDA build of about 4 GB; installing" >&2
        echo "torch==$TORCH_ARM64_PYPI_CPU instead, the last arm64 release on PyPI built for the CPU." >&2
        "${pip[@]}" "torch==$TORCH_ARM64_PYPI_CPU"
      else
        echo "PyTorch's CPU wheel index ($TORCH_CPU_INDEX) cannot be reached from here;" >&2
        echo "installing torch==$TORCH_VERSION as pip finds it: from PyPI that is a CUDA build of" >&2
        echo "several GB, unless a local wheel or index provides the CPU build." >&2
        "${pip[@]}" "torch==$TORCH_VERSION"
      fi
      ;;
    *)
      echo "EDGEAI_TORCH must be auto, cpu or cuda, not $choice" >&2
      return 2
      ;;
  esac
}

# ensure_venv [EXTRAS]: a virtual environment with torch (install_torch) and this project installed.
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
    install_torch
  fi
  stamp="$VENV/.edgeai-installed${extras:+-$extras}"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "installing edgeai-agent${extras:+[$extras]} and its dependencies"
    "$VENV/bin/python" -m pip install -q -e ".${extras:+[$extras]}"
    touch "$stamp"
  fi
}
