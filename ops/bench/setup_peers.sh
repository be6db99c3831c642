#!/usr/bin/env bash
# Virtual environments for the peers the benchmarks run side by side with mlxd:
# mlx_lm.server (plain `pip install mlx-lm`) and vllm-mlx 0.6.0 (pins mlx-lm < 0.32 and
# pulls a CUDA build of torch: several GB, benchmarks only), and sentence-transformers on torch
# CPU (the embeddings reference). Usage: setup_peers.sh [mlx-lm|vllm-mlx|sentence-transformers]...
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
peers=("$@"); [[ ${#peers[@]} -eq 0 ]] && peers=(mlx-lm vllm-mlx)
mlx=mlx; [[ "$(uname -s)" == "Linux" ]] && mlx="mlx[cpu]"
for peer in "${peers[@]}"; do
  venv=".venv-bench/$peer"
  [[ -f "$venv/.ok" ]] && continue
  "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  case "$peer" in
    mlx-lm)   "$venv/bin/python" -m pip install -q "$mlx" mlx-lm ;;
    vllm-mlx) "$venv/bin/python" -m pip install -q "$mlx" "vllm-mlx==0.6.0" ;;
    # torch first and pinned: here it resolves to the local CPU wheel, not a CUDA build
    sentence-transformers) "$venv/bin/python" -m pip install -q "torch==2.13.0" && "$venv/bin/python" -m pip install -q sentence-transformers ;;
    *) echo "unknown peer $peer" >&2; exit 2 ;;
  esac
  touch "$venv/.ok"
done
