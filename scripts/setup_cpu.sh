#!/usr/bin/env bash
# CPU set-up for a fresh machine: .venv with the CPU torch wheel and triton (its interpreter runs the kernel tests on
# CPU), then this package and its test extras. Idempotent. torch and triton are installed here only: GPU clusters
# bring their own ROCm/CUDA torch and the Triton built for it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==${TORCH_VERSION}" triton
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
