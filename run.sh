#!/usr/bin/env bash
# Train: one process per visible GPU (speedrun preset), or one CPU process (cpu preset, demo corpus).
# Extra arguments override hyperparameters: ./run.sh --num_iterations=500 --run_name=mytry
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
