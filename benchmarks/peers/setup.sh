#!/usr/bin/env bash
# Create (idempotently) the virtual environment with onnxruntime-training that
# benchmarks/bench_peers.py runs its onnxruntime-training side in.
#
#     bash benchmarks/peers/setup.sh [VENV_DIR]      (default: benchmarks/peers/.venv-ort-training)
#
# Pinned: onnxruntime-training-cpu 1.19.2 (the last release), onnx 1.17.0 (a newer onnx
# writes IR versions that onnxruntime 1.19 cannot load) and torch 2.13.0 CPU (the
# onnxruntime.training Python API imports torch; the same torch as the main venv).
# PYTHON (default: python3.11, else python3) chooses the interpreter; it must be 3.8-3.12,
# the Pythons onnxruntime-training-cpu 1.19.2 has wheels for.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${1:-$HERE/.venv-ort-training}"
ORT_TRAINING=onnxruntime-training-cpu==1.19.2
ONNX=onnx==1.17.0
TORCH=torch==2.13.0

check() {
    "$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import onnxruntime.training.api  # noqa: F401  (imports torch)
from onnxruntime.training import artifacts  # noqa: F401
import onnx, torch
want = {"onnxruntime-training-cpu": "1.19.2", "onnx": "1.17.0"}
for name, v in want.items():
    got = md.version(name)
    assert got == v, f"{name} {got}, want {v}"
assert torch.__version__.split("+")[0] == "2.13.0", f"torch {torch.__version__}, want 2.13.0"
print(f"onnxruntime-training {md.version('onnxruntime-training-cpu')}, onnx {onnx.__version__}, "
      f"torch {torch.__version__}: import onnxruntime.training.api ok")
PY
}

if [ -x "$VENV/bin/python" ] && check 2>/dev/null; then
    echo "setup.sh: $VENV is ready"
    exit 0
fi

if [ -z "${PYTHON:-}" ]; then
    PYTHON="$(command -v python3.11 || command -v python3)"
fi
echo "setup.sh: creating $VENV with $PYTHON ($("$PYTHON" --version 2>&1))"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
# torch first and alone, then everything else with torch pinned by a constraint, so that pip
# never resolves another torch (the CPU wheel 2.13.0 is the one wanted).
"${PIP[@]}" "$TORCH"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
printf '%s\n' "$TORCH" "$ONNX" > "$CONSTRAINTS"
"${PIP[@]}" -c "$CONSTRAINTS" "$ORT_TRAINING" "$ONNX"
check
echo "setup.sh: $VENV is ready"
