#!/usr/bin/env bash
# One GPU check, under 10 minutes on one GPU: the `gpu` tests, `saft bench step` on ViT-B-16 with
# 1000 class prompts at batch 128 under bf16 autocast (full, masked-dense, saft, the floor, PEFT
# LoRA and SHiRA, rounds interleaved) and `saft bench eval`, all on cuda, into one JSON report
# (docs/distributed.md, docs/library.md#speed-and-memory).
#   scripts/gpu-check.sh [REPORT.json]      (default runs/gpu-check.json)
# Run from the repository root after `make install`. Exits non-zero when a part failed; the
# report still holds every part that ran.
set -uo pipefail
cd "$(dirname "$0")/.."
report=${1:-runs/gpu-check.json}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
py=.venv/bin/python
saft=.venv/bin/saft
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: no CUDA device visible')" || exit 2

status=0
timeout 240 "$py" -m pytest -q -m gpu tests/gpu -rs --junitxml="$work/gpu-tests.xml" -p no:cacheprovider \
  > "$work/gpu-tests.log" 2>&1 || status=1
tail -5 "$work/gpu-tests.log"
timeout 240 "$saft" bench step --device cuda --arch ViT-B-16 --num-classes 1000 --batch-size 128 \
  --precision bf16 --warmup 2 --repeats 5 --out "$work/step.json" > "$work/step.log" 2>&1 || status=1
tail -14 "$work/step.log"
timeout 150 "$saft" bench eval --device cuda --images 20000 --batch-size 256 --out "$work/eval.json" \
  > "$work/eval.log" 2>&1 || status=1
tail -8 "$work/eval.log"

"$py" - "$work" "$report" "$status" <<'PY'
import json, os, sys, xml.etree.ElementTree as ET
import torch
work, report, status = sys.argv[1], sys.argv[2], int(sys.argv[3])

def load(name):
    path = os.path.join(work, name)
    return json.load(open(path)) if os.path.exists(path) else None

tests = None
if os.path.exists(os.path.join(work, "gpu-tests.xml")):
    suite = ET.parse(os.path.join(work, "gpu-tests.xml")).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
doc = {"schema": "saft-gpu-check/1", "gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
       "torch": torch.__version__, "cuda": torch.version.cuda, "ok": status == 0,
       "gpu_tests": tests, "bench_step": load("step.json"), "bench_eval": load("eval.json")}
os.makedirs(os.path.dirname(report) or ".", exist_ok=True)
tmp = report + ".tmp"
json.dump(doc, open(tmp, "w"), indent=2)
os.replace(tmp, report)
print(f"gpu-check: {doc['gpu']}: tests {tests}; report {report}")
PY
exit $status
