#!/bin/sh
# Train a VLM: sh train.sh [CONFIG.yaml] [key=value ...]
# Without a config it trains the offline demo.
# NPROC=N (N > 1) launches N processes on this machine with torchrun (DDP; gloo on a CPU, nccl on GPUs).
# Several machines: NNODES=M NODE_RANK=i MASTER_ADDR=host [MASTER_PORT=29500] NPROC=N on each machine.
# Set global_batch_size=... in the config to keep the batch per optimizer step fixed whatever N and M are.
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
NNODES=${NNODES:-1}
if [ "$NPROC" -gt 1 ] || [ "$NNODES" -gt 1 ]; then
  # A config mistake answers once, in one line, instead of from every process and again from torchrun.
  WORLD_SIZE=$((NPROC * NNODES)) "$PY" train.py --check "$CONFIG" "$@" || exit $?
fi
if [ "$NNODES" -gt 1 ]; then
  : "${MASTER_ADDR:?set MASTER_ADDR (the rank-0 machine) when NNODES > 1}"
  : "${NODE_RANK:?set NODE_RANK (0..NNODES-1) when NNODES > 1}"
  exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" --nproc_per_node "$NPROC" \
    train.py "$CONFIG" "$@"
fi
if [ "$NPROC" -gt 1 ]; then
  exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" train.py "$CONFIG" "$@"
fi
exec "$PY" train.py "$CONFIG" "$@"
