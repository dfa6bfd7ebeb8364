#!/usr/bin/env bash
# The main job end to end on CPU: DeepSpeed (2 ranks, ZeRO-2) trains configs/small.yaml on the
# shipped Shakespeare corpus while the side launcher forks 20% 1-sqrt cooldowns from checkpoints
# 150/300/450/600 and evaluates them; then the report (four cooldowns: the fit of the loss against
# tokens has three parameters, so a fourth point gives it an uncertainty). Rerunning resumes
# (finished parts are skipped).
#
#   scripts/demo.sh [--config C] [--steps N] [--at S1,S2,...] [--run DIR] [--ranks N] [--bin DIR]
#                   [-- section.key=value ...]
# Each flag has an environment twin (CONFIG STEPS AT RUN RANKS BIN); the overrides after `--` go to
# pretrain.py (the forks read the run's resolved config, so they follow). BIN is the directory
# holding the python, with deepspeed installed, to run (default .venv/bin). POLL_S sets how often
# the forker looks for new checkpoints (default 5).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/small.yaml}
STEPS=${STEPS:-600}
AT=${AT:-150,300,450,600}
RUN=${RUN:-runs/demo}
RANKS=${RANKS:-2}
BIN=${BIN:-.venv/bin}
POLL_S=${POLL_S:-5}
while [ $# -gt 0 ]; do
    case "$1" in
        --config) CONFIG=$2; shift 2 ;;
        --steps) STEPS=$2; shift 2 ;;
        --at) AT=$2; shift 2 ;;
        --run) RUN=$2; shift 2 ;;
        --ranks) RANKS=$2; shift 2 ;;
        --bin) BIN=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "scripts/demo.sh: error: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
PY=$BIN/python
# `python -m` from the repository root: this checkout's code, whatever the venv was installed from
EVERTRAIN=("$PY" -m evertrain.launch.cli)
export DS_ACCELERATOR=cpu PYTHONUNBUFFERED=1
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

echo "== evertrain demo: training $RUN ($CONFIG, $STEPS steps, DeepSpeed x$RANKS on CPU) with the forker beside it"
# The forker starts before the trainer has made the run dir: it waits for it (--wait-s). Its forks
# get one thread each: they share the cores with the training ranks, and more threads than cores
# slow everyone down (OpenMP spins).
OMP_NUM_THREADS=1 "${EVERTRAIN[@]}" forker --run "$RUN" --at "$AT" --cooldown-fraction 0.2 --shape 1-sqrt \
    --pool local:1 --until-step "$STEPS" --poll-s "$POLL_S" > >(sed -u 's/^/[forker] /') 2>&1 &
FORKER=$!
trap 'kill $FORKER 2>/dev/null || true' EXIT

"$BIN/deepspeed" --num_gpus "$RANKS" --master_port "$PORT" pretrain.py --config "$CONFIG" \
    --run "$RUN" train.max_steps="$STEPS" "$@"

echo "== training done; waiting for the forked cooldowns to finish"
wait $FORKER
trap - EXIT

"${EVERTRAIN[@]}" report --run "$RUN"
echo "== metrics: $RUN/metrics.jsonl   cooldowns: $RUN/cooldowns/   plot: $RUN/report.png"
