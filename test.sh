#!/bin/sh
# Ask a trained VLM about images: sh test.sh [test.py arguments]
# Without arguments it asks the offline demo model (runs/demo/stage2, from `make demo` or `sh train.sh`)
# about a held-out demo image.
set -e
cd "$(dirname "$0")"
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if [ $# -eq 0 ]; then
  IMG=data/shapes/images/val/000000.png
  Q=$("$PY" -c "import json; r = json.loads(open('data/shapes/val.jsonl').readline()); print(r['messages'][0]['content'].replace('<image>', '').strip())")
  echo "image: $IMG"
  echo "question: $Q"
  printf "answer: "
  exec "$PY" test.py --model runs/demo/stage2 --image "$IMG" --prompt "$Q" --max-new-tokens 8
fi
exec "$PY" test.py "$@"
