#!/usr/bin/env bash
# CPU set-up for a fresh machine: .venv with the CPU torch wheel, then this package and its test
# extras. Idempotent. torch is pinned here only: GPU clusters bring their own ROCm/CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==${TORCH_VERSION}"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
