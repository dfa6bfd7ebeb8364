#!/usr/bin/env bash
# The three things evertrain is for, end to end on CPU, in a few minutes:
#   1. `deepspeed pretrain.py` trains configs/demo.yaml on 2 ranks (ZeRO-2), as you would run it;
#   2. while it trains, `evertrain data append` adds plays held back from its data dir: the run takes
#      them at its next checkpoint (its console says so, and the report marks the data version);
#   3. the forker beside it forks a 20% 1-sqrt cooldown from four checkpoints and evaluates each; then
#      `evertrain report` fits the loss against tokens through them and draws the plot.
# It prepares its own data dir first (the shipped plays minus the held-back ones), reruns resume
# (finished parts are skipped), and it prints its own wall time at the end.
#
#   scripts/demo.sh [--config C] [--steps N] [--at S1,S2,...] [--append-at S] [--run DIR] [--data DIR]
#                   [--ranks N] [--bin DIR] [-- section.key=value ...]
# Each flag has an environment twin (CONFIG STEPS AT APPEND_AT RUN DATA RANKS BIN); the overrides after
# `--` go to pretrain.py (the forks read the run's resolved config, so they follow). INPUT and VAL are
# the text files a missing data dir is prepared from (default corpus/train/*.txt, corpus/val/*.txt),
# APPEND the files appended while it trains (default: the last HOLD_BACK=5 of INPUT, left out of the
# prepare). BIN is the directory holding the python, with deepspeed installed, to run (default
# .venv/bin). POLL_S sets how often the forker and the appender look at the checkpoints (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/demo.yaml}
STEPS=${STEPS:-400}
AT=${AT:-100,200,300,400}
APPEND_AT=${APPEND_AT:-150}
RUN=${RUN:-runs/demo}
DATA=${DATA:-data/demo}
RANKS=${RANKS:-2}
BIN=${BIN:-.venv/bin}
POLL_S=${POLL_S:-2}
HOLD_BACK=${HOLD_BACK:-5}
VOCAB=${VOCAB:-4096}
while [ $# -gt 0 ]; do
    case "$1" in
        --config) CONFIG=$2; shift 2 ;;
        --steps) STEPS=$2; shift 2 ;;
        --at) AT=$2; shift 2 ;;
        --append-at) APPEND_AT=$2; shift 2 ;;
        --run) RUN=$2; shift 2 ;;
        --data) DATA=$2; shift 2 ;;
        --ranks) RANKS=$2; shift 2 ;;
        --bin) BIN=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "scripts/demo.sh: error: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
START=$SECONDS
PY=$BIN/python
# `python -m` from the repository root: this checkout's code, whatever the venv was installed from
EVERTRAIN=("$PY" -m evertrain.launch.cli)
export DS_ACCELERATOR=cpu PYTHONUNBUFFERED=1
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
version() { "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["version"])' "$DATA/manifest.json"; }
latest_step() {  # the run's newest committed checkpoint, 0 before the first
    local latest
    latest=$(cat "$RUN/checkpoints/LATEST" 2>/dev/null || echo step_0)
    echo $((10#${latest#step_}))
}

read -r -a INPUTS <<< "${INPUT:-$(echo corpus/train/*.txt)}"
read -r -a VALS <<< "${VAL:-$(echo corpus/val/*.txt)}"
if [ -n "${APPEND:-}" ]; then
    read -r -a APPENDS <<< "$APPEND"
else  # the last plays are held back from the prepare, to be appended while the run trains
    APPENDS=("${INPUTS[@]: -$HOLD_BACK}")
    INPUTS=("${INPUTS[@]:0:${#INPUTS[@]}-$HOLD_BACK}")
fi
if [ ! -f "$DATA/manifest.json" ]; then
    echo "== preparing $DATA: ${#INPUTS[@]} plays, a $VOCAB-piece tokenizer trained on them (${#APPENDS[@]} held back)"
    "${EVERTRAIN[@]}" data prepare --input "${INPUTS[@]}" --val "${VALS[@]}" --out "$DATA" --vocab-size "$VOCAB"
fi

echo "== training $RUN ($CONFIG, $STEPS steps, DeepSpeed x$RANKS on CPU) with the forker beside it;"
echo "   ${#APPENDS[@]} more files go into $DATA once the run has a checkpoint at step $APPEND_AT"
echo "   (on its first start DeepSpeed compiles its CPU communication op, once: ~1 CPU-minute, ~35 s on 2 cores)"
# The forker starts before the trainer has made the run dir: it waits for it (--wait-s). Its forks
# get one thread each: they share the cores with the training ranks, and more threads than cores
# slow everyone down (OpenMP spins).
OMP_NUM_THREADS=1 "${EVERTRAIN[@]}" forker --run "$RUN" --at "$AT" --cooldown-fraction 0.2 --shape 1-sqrt \
    --pool local:1 --until-step "$STEPS" --poll-s "$POLL_S" > >(sed -u 's/^/[forker] /') 2>&1 &
FORKER=$!
# The appender: data arrives while the run trains (a rerun whose data dir has it already skips it).
(
    while [ "$(latest_step)" -lt "$APPEND_AT" ]; do sleep "$POLL_S"; done
    if [ "$(version)" -eq 1 ]; then
        "${EVERTRAIN[@]}" data append --data "$DATA" "${APPENDS[@]}"
    fi
) > >(sed -u 's/^/[append] /') 2>&1 &
APPENDER=$!
trap 'kill $FORKER $APPENDER 2>/dev/null || true' EXIT

"$BIN/deepspeed" --num_gpus "$RANKS" --master_port "$PORT" pretrain.py --config "$CONFIG" \
    --run "$RUN" data.path="$DATA" train.max_steps="$STEPS" "$@"

kill "$APPENDER" 2>/dev/null || true  # a run shorter than APPEND_AT never needed it
echo "== training done; waiting for the forked cooldowns to finish"
wait $FORKER
trap - EXIT

"${EVERTRAIN[@]}" report --run "$RUN"
echo "== metrics: $RUN/metrics.jsonl   cooldowns: $RUN/cooldowns/   plot: $RUN/report.png"
ELAPSED=$((SECONDS - START))
echo "== demo done in $((ELAPSED / 60))m$(printf %02d $((ELAPSED % 60)))s wall (load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a))"
