#!/usr/bin/env bash
# Train: one process per visible GPU (speedrun preset), or one CPU process (cpu preset, demo corpus).
# Extra arguments override hyperparameters: ./run.sh --num_iterations=500 --run_name=mytry
# Several seeds back to back, then mean/std/t-test: ./run.sh --runs=5 --seed=0 --run_name=mytry
# Exit code: 0 completed, 3 diverged, 130 interrupted (the record is written in every case), 1 failed.
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -gt 0 ]; then
  exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" train_gpt.py "$@"
else
  exec "$PY" train_gpt.py "$@"
fi
