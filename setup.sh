#!/usr/bin/env bash
# Set up cxr-sr-node in ./.venv (idempotent).
#   ./setup.sh          the node and the model tools (CPU torch)
#   ./setup.sh --test   also the test tools and the real DICOM/queue peers the tests talk to
#                       (Debian packages dcmtk, orthanc, rabbitmq-server; needs root or sudo)
#   ./setup.sh --gpu    CUDA torch instead of the CPU wheel (large download)
set -euo pipefail
cd "$(dirname "$0")"
mode="${1:-}"
python="${PYTHON:-python3}"

if [ "$mode" = "--test" ]; then
  missing=()
  command -v storescp >/dev/null || missing+=(dcmtk)
  command -v Orthanc >/dev/null || [ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
  command -v rabbitmq-server >/dev/null || [ -x /usr/sbin/rabbitmq-server ] || missing+=(rabbitmq-server)
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if [ "$mode" = "--gpu" ]; then
  # a CPU build from an earlier plain ./setup.sh satisfies the version range: replace it
  if .venv/bin/python -c "import sys, torch; sys.exit(0 if '+cpu' in torch.__version__ else 1)" 2>/dev/null; then
    .venv/bin/python -m pip uninstall --quiet -y torch
  fi
  "${pip[@]}" "torch>=2.4,<2.15"
else
  # The pinned CPU wheel first: a bare "torch" would resolve to a multi-GB CUDA build.
  .venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" torch==2.13.0
fi
if [ "$mode" = "--test" ]; then
  "${pip[@]}" -e ".[test]"
else
  "${pip[@]}" -e .
fi
echo "cxr-sr-node set up in $(pwd)/.venv"
