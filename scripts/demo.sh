#!/usr/bin/env bash
# The main job end to end on CPU: DeepSpeed (2 ranks, ZeRO-2) trains configs/small.yaml on the
# shipped Shakespeare corpus while the side launcher forks 20% 1-sqrt cooldowns from checkpoints
# 200/400/600 and evaluates them; then the report. Rerunning resumes (finished parts are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/demo}
BIN=.venv/bin
export DS_ACCELERATOR=cpu PYTHONUNBUFFERED=1
PORT=$($BIN/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

echo "== evertrain demo: training $RUN (DeepSpeed, 2 ranks on CPU) with the forker beside it"
$BIN/evertrain forker --run "$RUN" --at 200,400,600 --cooldown-fraction 0.2 --shape 1-sqrt \
    --nodes local:1 --until-step 600 > >(sed 's/^/[forker] /') 2>&1 &
FORKER=$!
trap 'kill $FORKER 2>/dev/null || true' EXIT

$BIN/deepspeed --num_gpus 2 --master_port "$PORT" pretrain.py --config configs/small.yaml \
    --run-dir "$RUN" train.max_steps=600

echo "== training done; waiting for the forked cooldowns to finish"
wait $FORKER
trap - EXIT

$BIN/evertrain report --run "$RUN"
echo "== metrics: $RUN/metrics.jsonl   cooldowns: $RUN/cooldowns/   plot: $RUN/report.png"
