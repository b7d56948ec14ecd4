#!/usr/bin/env bash
# The GPU checks no session of this project could run (no GPU was lent): run them on the first GPU
# node, in order, and copy the figures it prints into benchmarks/RESULTS.md with the device and date.
#
#   bash benchmarks/gpu_checks.sh [WORK_DIR]        # default WORK_DIR: ./gpu-checks
#
# Each step writes its output under WORK_DIR and the script stops at the first failure (set -e).
#  1. the GPU demo: sample -> shards -> train on the GPUs -> eval (the whole GPU path end to end);
#  2. the loader benchmark: DALI mixed decode vs the baseline loader (target >= 30,000 img/s on an H100);
#  3. the stage profile with the scaling model (targets: model-only >= 40,000 img/s alexnet-owt bf16,
#     end_to_end >= 95% of it); regenerate docs/scaling.md's tables from profile.json;
#  4. 2-GPU training with torch.compile and bf16 gradient compression, SIGTERM mid-epoch, then
#     --resume (the DALI pipeline checkpoint restored on a GPU pipeline);
#  5. a shard with an undecodable JPEG on the GPU decoder: --on-corrupt error names it, skip counts it.
# Profile on a shard set with well over ~30k train images per GPU (the demo's has 26k) for loader
# figures you quote: smaller sets make the timed runs cross epoch boundaries (a pipeline rebuild each).
set -euo pipefail

WORK=${1:-gpu-checks}
mkdir -p "$WORK"
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt 1 ]; then echo "no CUDA GPU visible" >&2; exit 2; fi
python -c "import torch; print('device:', torch.cuda.get_device_name(0), '| GPUs:', torch.cuda.device_count(), '| torch', torch.__version__)" | tee "$WORK/device.txt"
date -u +"date: %Y-%m-%d %H:%M UTC" | tee -a "$WORK/device.txt"

echo "== 1. demo on the GPU"
alexnet-fast demo --out "$WORK/demo" --device cuda 2>&1 | tee "$WORK/demo.log"
SHARDS="$WORK/demo/shards"

echo "== 2. loader benchmark (DALI mixed decode vs baseline)"
python benchmarks/loaders.py --data "$SHARDS" --device cuda --json "$WORK/loaders.json"

echo "== 3. stage profile + scaling model"
alexnet-fast profile --data "$SHARDS" --device cuda --arch alexnet-owt --precision bf16 --scaling \
  --json "$WORK/profile.json" --plot "$WORK/profile.png"
alexnet-fast profile --data "$SHARDS" --device cuda --arch alexnet-owt --precision bf16 --compile \
  --stages model,end_to_end --json "$WORK/profile_compiled.json"

if [ "$GPUS" -ge 2 ]; then
  echo "== 4. 2-GPU train: --compile, bf16 gradient compression, SIGTERM mid-epoch, --resume"
  RUN="$WORK/train2"
  rm -rf "$RUN"
  FLAGS=(--data "$SHARDS" --out "$RUN" --gpus 2 --arch alexnet-owt --recipe fast --batch-size 512
         --epochs 2 --compile --grad-compression bf16 --log-every 10 --ckpt-every 20)
  alexnet-fast train "${FLAGS[@]}" > "$WORK/train2.log" 2>&1 &
  PID=$!
  until grep -q '"step": 30' "$RUN/metrics.jsonl" 2>/dev/null; do
    kill -0 "$PID" 2>/dev/null || { echo "training ended early: see $WORK/train2.log" >&2; exit 1; }
    sleep 2
  done
  kill -TERM "$PID"
  wait "$PID"                                   # exits 0 after writing last.pt
  alexnet-fast train "${FLAGS[@]}" --resume 2>&1 | tee "$WORK/train2_resume.log"
  grep -q "loader state restored" "$WORK/train2_resume.log"
else
  echo "== 4. skipped: one GPU visible"
fi

echo "== 5. an undecodable JPEG on the GPU decoder"
rm -rf "$WORK/damaged" && cp -r "$SHARDS" "$WORK/damaged"
python - "$WORK/damaged" <<'EOF'
import sys
from pathlib import Path
idx = sorted(Path(sys.argv[1]).glob("train-*.idx"))[0]
fields = idx.read_text().splitlines()[2].split()
offset = int(fields[fields.index("jpg") + 1])
with open(idx.with_suffix(".tar"), "r+b") as f:
    f.seek(offset)
    f.write(b"not a jpeg" * 20)
print("damaged", idx.with_suffix(".tar").name, "key", fields[3].split(".")[0])
EOF
if alexnet-fast train --data "$WORK/damaged" --out "$WORK/damaged_run" --gpus 1 --arch alexnet-owt \
     --batch-size 256 --epochs 1 > "$WORK/corrupt_error.log" 2>&1; then
  echo "expected --on-corrupt error to stop the run" >&2; exit 1
fi
tail -1 "$WORK/corrupt_error.log"
alexnet-fast train --data "$WORK/damaged" --out "$WORK/damaged_skip" --gpus 1 --arch alexnet-owt \
  --batch-size 256 --epochs 1 --on-corrupt skip 2>&1 | tail -3
grep -q skipped_samples "$WORK/damaged_skip/metrics.jsonl"

echo "all GPU checks passed; outputs in $WORK"
