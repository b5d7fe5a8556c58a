#!/bin/sh
# Train a VLM: sh train.sh [CONFIG.yaml] [key=value ...]
# Without a config it trains the offline demo. NPROC=N (N > 1) launches N processes with torchrun.
set -e
cd "$(dirname "$0")"
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
CONFIG=configs/demo/stage2_sft.yaml
case "$1" in
  *=*|"") ;;
  *) CONFIG=$1; shift ;;
esac
NPROC=${NPROC:-1}
if [ "$NPROC" -gt 1 ]; then
  exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" train.py "$CONFIG" "$@"
fi
exec "$PY" train.py "$CONFIG" "$@"
