#!/usr/bin/env bash
# Installs libtorch from PyPI (torch==2.11.0) into a venv that is reused across clones.
# The venv lives under $QUAD_CACHE (default ~/.cache/quad) and .venv in the repo points to it.
set -euo pipefail
TORCH_VERSION=2.11.0
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${QUAD_CACHE:-$HOME/.cache/quad}
venv="$cache/venv-torch-$TORCH_VERSION"
mkdir -p "$cache"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import torch,sys; sys.exit(0 if torch.__version__.split('+')[0]=='$TORCH_VERSION' else 1)" 2>/dev/null; then
  echo "installing torch==$TORCH_VERSION into $venv (large download, once)" >&2
  if ! "$venv/bin/pip" install --disable-pip-version-check -q "torch==$TORCH_VERSION" "numpy<3" safetensors; then
    echo "error: could not install torch==$TORCH_VERSION from PyPI; is the registry reachable?" >&2
    exit 3
  fi
fi
# The Python reference of the causal LM (scripts/reference_lm.py): transformers reads GGUF
# through the gguf package (and needs accelerate for it). Pinned, and on one line with torch so pip never moves torch.
if ! "$venv/bin/python" -c "import transformers, gguf, accelerate" 2>/dev/null; then
  echo "installing transformers and gguf into $venv (once)" >&2
  if ! "$venv/bin/pip" install --disable-pip-version-check -q "torch==$TORCH_VERSION" transformers==5.23.0 gguf==0.19.0 accelerate==1.15.0; then
    echo "error: could not install transformers==5.23.0 gguf==0.19.0 accelerate==1.15.0 from PyPI" >&2
    exit 3
  fi
fi
ln -sfn "$venv" "$root/.venv"
"$venv/bin/python" -c "import torch; print('torch', torch.__version__, 'at', torch.__path__[0])"
