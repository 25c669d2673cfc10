#!/usr/bin/env bash
# TRL and tunix on W4 and W1, matched shapes, each in its own process, under
# one wall-clock deadline. Missing pure-Python packages come as wheels in
# WHEELS (default runs/bench_wheels, see BENCHMARKS.md). W5 (ragged lengths)
# is not in the default PEERS: trl_grpo_w5 and tunix_grpo_w5 run the GRPO
# scripts with --ragged (one per call: each takes most of a 570 s budget).
#
#   JAXRL_COMMIT=<sha> RESULTS_DIR=<dir> BUDGET_S=570 [PEERS="trl_dpo tunix_grpo"] \
#     bash benchmarks/run_peers.sh [--smoke]
#
# Writes RESULTS_DIR/records_peers.tar.gz and RESULTS_DIR/log_peers.txt.
set -u
SMOKE=${1:-}
PEERS=${PEERS:-trl_dpo trl_grpo tunix_dpo tunix_grpo}
RESULTS_DIR=${RESULTS_DIR:-benchmarks/results}
REC=$RESULTS_DIR/rec_peers
PY=${PY:-python3}
WHEELS=${WHEELS:-runs/bench_wheels}
mkdir -p "$REC"
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-570} ))
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

run() {  # run MAX_SECONDS MODULE [ARGS...]
  local max=$1; shift
  local left=$(( DEADLINE - $(date +%s) ))
  if (( left < 30 )); then echo "=== SKIPPED (deadline): $*"; return; fi
  local t=$(( max < left ? max : left ))
  echo "=== [$(date +%T)] (limit ${t}s) $PY -m $*"
  timeout -k 5 "$t" "$PY" -m "$@" --out "$REC" $SMOKE || echo "=== FAILED rc=$?: $*"
}

{
  if [ -d "$WHEELS" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/peer_site "$WHEELS"/*.whl && export PYTHONPATH=/tmp/peer_site:${PYTHONPATH:-}
  fi
  "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|transformers|accelerate|trl|datasets|jax|flax|optax|google-tunix) "
  declare -A LIMIT=([trl_dpo]=100 [trl_grpo]=170 [tunix_dpo]=240 [tunix_grpo]=240
                    [trl_grpo_w5]=540 [tunix_grpo_w5]=540)
  for p in $PEERS; do
    case $p in  # <script>_w5: W5 on that script
      # tunix's train step at 2 prompts x 8 x 1280 tokens needs 59 GiB: 1 prompt per micro-batch
      tunix_grpo_w5) run "${LIMIT[$p]}" benchmarks.peers.tunix_grpo --ragged --micro 1 --logps_micro 2 ;;
      *_w5) run "${LIMIT[$p]}" "benchmarks.peers.${p%_w5}" --ragged ;;
      *) run "${LIMIT[$p]}" "benchmarks.peers.$p" ;;
    esac
  done
  "$PY" -m benchmarks.report "$REC" $SMOKE
} 2>&1 | tee "$RESULTS_DIR/log_peers.txt"
tar czf "$RESULTS_DIR/records_peers.tar.gz" -C "$REC" . && rm -rf "$REC"
