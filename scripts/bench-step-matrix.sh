#!/usr/bin/env bash
# Every configuration of the step-speed acceptance table (issue 26, docs/library.md#speed-and-memory):
# `saft bench step` (full, masked-dense, saft, the floor, PEFT LoRA r=8 and SHiRA, rounds interleaved in
# one process) at ViT-B-32 x 10 classes (batch 16) and ViT-B-16 x 1000 classes (batch 8 and 32), each in
# fp32 and under bf16 autocast. Each run writes OUT/NAME.json and OUT/NAME.log with `uptime` before and
# after it (timings are only comparable on an otherwise idle machine). On a 2-core CPU a ViT-B-16 x 1000
# configuration takes 6-13 min, the whole matrix ~35 min: run it in the background, e.g.
#   nohup scripts/bench-step-matrix.sh runs/bench/step-matrix > runs/bench/step-matrix.log 2>&1 &
# Environment: WARMUP / REPEATS (rounds; defaults 1 / 3 for ViT-B-16 x 1000, 2 / 5 for ViT-B-32),
# ONLY=NAME to run one configuration, DEVICE (default cpu), EXTRA (more `saft bench step` options).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bench/step-matrix}
mkdir -p "$out"
saft=.venv/bin/saft
status=0
run() {  # NAME WARMUP REPEATS ARGS...
  local name=$1 warmup=$2 repeats=$3
  shift 3
  [ -n "${ONLY:-}" ] && [ "$ONLY" != "$name" ] && return 0
  {
    echo "== $name: saft bench step $* --warmup ${WARMUP:-$warmup} --repeats ${REPEATS:-$repeats}"
    echo "uptime before: $(uptime)"
    # shellcheck disable=SC2086
    "$saft" bench step --device "${DEVICE:-cpu}" "$@" --warmup "${WARMUP:-$warmup}" --repeats "${REPEATS:-$repeats}" \
      ${EXTRA:-} --out "$out/$name.json" 2>&1 || status=1
    echo "uptime after: $(uptime)"
  } > "$out/$name.log"
  grep -v '^round\|UserWarning\|sparse_coo_tensor' "$out/$name.log"
}
for precision in fp32 bf16; do
  run "b32-c10-bs16-$precision" 2 5 --arch ViT-B-32 --num-classes 10 --batch-size 16 --precision "$precision"
done
for bs in 8 32; do
  for precision in fp32 bf16; do
    run "b16-c1000-bs$bs-$precision" 1 3 --arch ViT-B-16 --num-classes 1000 --batch-size "$bs" --precision "$precision"
  done
done
exit $status
