#!/usr/bin/env bash
# The device benchmark: one script, about 8 minutes on one GPU, nothing from the network (synthetic images made here,
# pretrained=False). Measured side by side on the same GPU:
#   1. training images/s of dgzoo and of timm (ResNet-50, 224 px; fp32 / bf16 / + channels-last / + compile),
#   2. per-domain gradient passes / ERM step and one GGA candidate / ERM step, 224 px, bf16,
#   3. sweep throughput at 1 / 2 / 4 runs per GPU (dgzoo sweep --launcher local-gpus --runs-per-gpu N).
# timm's own train.py is not in timm's wheel: give its path (a timm checkout's train.py) with --timm-train PATH or
# $TIMM_TRAIN_PY; without it, timm's model runs in a timm-style loop written in benchmarks/device_suite.py, and the
# results say which one ran.
#
#   benchmarks/device_suite.sh                              # on a GPU: writes benchmarks/results/device.md
#   benchmarks/device_suite.sh --timm-train ~/timm/train.py # the same, against timm's train.py
#   benchmarks/device_suite.sh --smoke                      # tiny, on CPU in about a minute: checks the suite runs
#
# Options: --smoke, --timm-train PATH, --out FILE (default: benchmarks/results/device.md on a GPU, none otherwise),
# --gpu ID (default 0). Run from the repository root; set PYTHON to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
SMOKE=0
OUT=""
GPU=0
TIMM_TRAIN=${TIMM_TRAIN_PY:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --timm-train) TIMM_TRAIN="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --gpu) GPU="$2"; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "device_suite.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d -t dgzoo-device-suite-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
RESULTS="$WORK/results.jsonl"

if [ "$SMOKE" = 1 ]; then
  # CPU-sized: test_resnet, 32 px, a few steps; float32 (torch's CPU bf16 kernels are not what is measured here)
  # and the 'eager' compile backend (the compile path, without minutes of C++ compilation).
  SIZE=(--backbone test_resnet --image-size 32 --domains 2 --classes 2 --per-class 8 --batch-size 4 --workers 0)
  TIMED=(--warm 1 --steps 2)
  EXTRA=(--float32 --compile-backend eager)
  SETTINGS=(--settings fp32 bf16+channels_last+compile)
  SWEEP=(--runs 2 --runs-per-gpu 2 --steps 2)
  RATIOS=(--candidates 1 --rounds 2 --warm-rounds 1)
else
  SIZE=(--backbone resnet50 --image-size 224 --domains 3 --classes 4 --per-class 64 --batch-size 32)
  TIMED=(--warm 15 --steps 30)
  EXTRA=()
  SETTINGS=()
  SWEEP=(--runs 4 --runs-per-gpu 1 2 4 --steps 40)
  RATIOS=(--candidates 4 --rounds 5 --warm-rounds 1)
fi
part() {  # run one part of the suite; keep its RESULT lines, show everything else
  local name=$1; shift
  local start=$SECONDS
  echo "== $name" >&2
  "$PYTHON" benchmarks/device_suite.py "$name" --data "$WORK/data" "${SIZE[@]}" "${EXTRA[@]}" "$@" \
    | tee "$WORK/$name.log" | sed -n 's/^RESULT //p' >> "$RESULTS"
  echo "== $name: $((SECONDS - start)) s" >&2
}
part data
part dgzoo "${TIMED[@]}" "${SETTINGS[@]}"
part timm "${TIMED[@]}" "${SETTINGS[@]}" ${TIMM_TRAIN:+--timm-train "$TIMM_TRAIN"}
part ratios "${RATIOS[@]}"
part sweep "${SWEEP[@]}" --gpu "$GPU"

COMMAND="benchmarks/device_suite.sh${SMOKE:+$([ "$SMOKE" = 1 ] && echo ' --smoke')}${TIMM_TRAIN:+ --timm-train $TIMM_TRAIN}"
"$PYTHON" benchmarks/device_suite.py report --data "$WORK/data" --results "$RESULTS" --command "$COMMAND" \
  > "$WORK/device.md"
cat "$WORK/device.md"
if [ -z "$OUT" ] && [ "$SMOKE" = 0 ] && "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  OUT=benchmarks/results/device.md
fi
if [ -n "$OUT" ]; then
  cp "$WORK/device.md" "$OUT"
  echo "wrote $OUT" >&2
fi
