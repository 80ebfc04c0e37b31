#!/usr/bin/env bash
# The prepared GPU check of quad (README, "Measuring on a GPU"). Runs from the folder that
# `make gpu-bundle` writes (dist/gpu): every step is its own `quad gpu-check step` process under
# a time limit, so a step that fails or hangs costs only its own figures; then one table.
#
#   gpu-check.sh [--device cuda|cpu] [--quick]
#
# Environment:
#   TORCH_LIB  the torch/lib folder of a torch 2.11.0 install; it and the nvidia/*/lib folders
#              next to it (site-packages/nvidia/*/lib) go on LD_LIBRARY_PATH. Without it, the
#              libtorch the binary was linked against.
#   OUT        when set: gpu-check.md (the table), gpu-check.json (every figure) and
#              gpu-check-logs/ are written there.
#   GPU_CHECK_BUDGET_S  overrides the whole check's budget in seconds (450 on the GPU).
# Exit code: 0 when every step ran and every tolerance held, 1 otherwise, 2 on bad usage.
set -u
here=$(cd "$(dirname "$0")" && pwd)
quad="$here/quad"
device=cuda
quick=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=${2:?--device needs cuda or cpu}; shift 2 ;;
    --device=*) device=${1#--device=}; shift ;;
    --quick) quick=(--quick); shift ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ -n "${TORCH_LIB:-}" ]; then
  libs=$TORCH_LIB
  for d in "$TORCH_LIB"/../../nvidia/*/lib; do
    [ -d "$d" ] && libs="$libs:$(cd "$d" && pwd)"
  done
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
export RUST_LOG=${RUST_LOG:-info}

work=$(mktemp -d "${TMPDIR:-/tmp}/quad-gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/steps" "$work/logs"
: > "$work/status.tsv"

if ! "$quad" gpu-check steps "${quick[@]}" > "$work/plan" 2> "$work/logs/plan.log"; then
  echo "gpu-check.sh: $quad does not start; is TORCH_LIB right?" >&2
  cat "$work/logs/plan.log" >&2
  exit 1
fi
budget=${GPU_CHECK_BUDGET_S:-$(awk '$1 == "budget" { print $2 }' "$work/plan")}
start=$(date +%s)

while read -r step limit <&3; do
  [ "$step" = budget ] && continue
  left=$(( budget - ($(date +%s) - start) ))
  if [ "$left" -lt 15 ]; then
    printf '%s\tskipped\t0\t%s\n' "$step" "$limit" >> "$work/status.tsv"
    echo "[gpu-check] $step: skipped, the budget is spent" >&2
    continue
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "[gpu-check] $step (at most ${limit} s, ${left} s left)" >&2
  t0=$(date +%s%N)
  # KILL, not TERM: quad treats TERM as "finish the epochs in flight" (the Ctrl-C handler).
  timeout -s KILL "$limit" "$quad" gpu-check step "$step" --device "$device" "${quick[@]}" \
    --bundle "$here" --work "$work" < /dev/null > "$work/logs/$step.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$step" "$rc" "$(( ($(date +%s%N) - t0) / 1000000 ))" "$limit" >> "$work/status.tsv"
  [ "$rc" -eq 0 ] || echo "[gpu-check] $step: exit code $rc (log: ${OUT:+$OUT/gpu-check-logs/}$step.log)" >&2
done 3< "$work/plan"

"$quad" gpu-check report --work "$work" ${OUT:+--out "$OUT"}
