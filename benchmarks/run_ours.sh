#!/usr/bin/env bash
# floors and W1-W4 of jaxrl_llm on one GPU, each workload in its own process
# (peak memory is a per-process high-water mark), under one wall-clock deadline.
#
#   JAXRL_COMMIT=<sha> RESULTS_DIR=<dir> BUDGET_S=540 PLAN=core bash benchmarks/run_ours.sh [--smoke]
#
# PLAN=core: floors, W1, W4, W2 (remat dots, 2 micro-batches), W3 at batch 1/64/512.
# PLAN=variants: floors and W1 again (same machine as the variants), then the
#   variants the notes in BENCHMARKS.md compare.
# PLAN=rollout: floors, decode attention alone, W5 with the rollout engine and
#   with the static sampler, W3 at batch 64/512.
# PLAN=w1: floors, W1 with the prompt prefilled once per group and once per sample.
# PLAN=lora_w1: floors, W1 with LoRA (r = 64, seven projections) next to
#   full-parameter W1 (benchmarks/lora_bench.py --workload w1), then W5 with the
#   length-bucketed update (the baseline for a tunix W5 run on the same machine).
# PLAN=buckets: floors, W5 with the length-bucketed update (rl.length_buckets 4),
#   then W3's decode step at batch 64/512 with XLA's defaults and with the
#   decode loop captured as CUDA graphs (CMDBUF_FLAGS: while loops and conditionals
#   as command buffers).
# PLAN=decode_gemm: floors, W3 at batch 64 with and without the Pallas decode
#   matmul (at batch 512 the model keeps XLA's GEMMs), the kernel
#   profile of a b64 decode step with and without it, and the decode step's
#   weight products alone (XLA against the kernel, benchmarks/decode_gemm.py);
#   W3 at batch 512 as 64 prompts x 8 with and without cascade attention.
# PLAN=cascade: floors, W3 at batch 512 as 64 prompts x 8 with and without
#   cascade attention, and the kernel profile of both steps.
# PLAN=sampling: floors, W3 at batch 64/512 with each token drawn through a Gumbel
#   draw per logit (jax.random.categorical) and through the inverse CDF (one
#   uniform per row), the kernel profile of the b512 step with the latter, and
#   the b64 step's kernel profile with its optimized HLO (what each small
#   per-layer kernel, e.g. input_concatenate_fusion, computes).
# PLAN=update: floors, W1 as in its record, with its training layers unrolled
#   (--scan_layers 0) and with the cuDNN attention forward kept for the backward
#   (--remat dots_no_batch_attention), with the head's GEMM writing float32 logits
#   (--float32_logprob_head 1), with each group's prompt run once in the update
#   (--update_shared_prompt 1), and the kernel profile of its learn half.
# PLAN=shared_prompt: floors, W1 and W4 with each group's (pair's) prompt run once in the
#   update (rl.update_shared_prompt, preference.shared_prompt) and without.
# PLAN=partition: the compile-only check of the 1.5B W2 step for 8 mock GPUs on
#   one real GPU (FSDP and data meshes, the library's attention routing and
#   XLA's partitioner), then cuDNN attention alone for 2 mock GPUs.
# PLAN=multi_w2 / multi_w1 / multi_w5 / multi_async (several GPUs of one host;
#   NGPU, default: the GPUs nvidia-smi lists; N below): W2, W1 and W5 on 1 GPU
#   and on N with FSDP (1,N,1), data (N,1,1) and FSDP x tensor (1,N/2,2) (W2,
#   W1); the actor-learner step (benchmarks/async_step.py) against the one-jit
#   step on the same N GPUs, 2 actor + N-2 learner GPUs (1 + 1 on 2 GPUs),
#   lag 0 and 1. Each plan fits one 10-minute call on 8 H100s / H200s.
# Compilations share XLA's per-fusion autotuning results through a persistent
# cache ($JAX_COMPILATION_CACHE_DIR, default /tmp/jax_cache): the W5 step reuses
# what its rollout compile tuned. Timed calls are unaffected.
# Writes RESULTS_DIR/records_ours_$PLAN.tar.gz (the JSON records) and RESULTS_DIR/log_ours_$PLAN.txt.
set -u
SMOKE=${1:-}
PLAN=${PLAN:-core}
RESULTS_DIR=${RESULTS_DIR:-benchmarks/results}
REC=$RESULTS_DIR/rec_ours
PY=${PY:-python3}
mkdir -p "$REC"
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-540} ))
# W2 (1.5B, f32 master weights + AdamW) needs more than JAX's default 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}

run() {  # run MAX_SECONDS MODULE [ARGS...]
  local max=$1; shift
  local left=$(( DEADLINE - $(date +%s) ))
  if (( left < 30 )); then echo "=== SKIPPED (deadline): $*"; return; fi
  local t=$(( max < left ? max : left ))
  echo "=== [$(date +%T)] (limit ${t}s) $PY -m $*"
  timeout -k 5 "$t" "$PY" -m "$@" --out "$REC" $SMOKE || echo "=== FAILED rc=$?: $*"
}

NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | wc -l)}
NGPU=$(( NGPU > 0 ? NGPU : 1 )); HALF=$(( NGPU > 1 ? NGPU / 2 : 1 ))
{
  # The library imports qwix (jaxrl_llm.quantize, jaxrl_llm.lora); a GPU image without it
  # gets it from the wheel in WHEELS (runs/bench_wheels, benchmarks/peers/wheels.txt).
  if ! "$PY" -c "import qwix" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/our_site "${WHEELS:-runs/bench_wheels}"/qwix-*.whl \
      && export PYTHONPATH=/tmp/our_site:${PYTHONPATH:-}
  fi
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null
  "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
  run 60 benchmarks.floors
  case "$PLAN" in
    core)
      run 210 benchmarks.w1_grpo_step --repeats 3
      run 100 benchmarks.w4_dpo_step
      run 100 benchmarks.w2_train_step --variant dots_mb2 --tag dots_mb2
      run 150 benchmarks.w3_decode --variants b1,b64,b512 ;;
    variants)
      run 150 benchmarks.w1_grpo_step --repeats 3  # same machine as the variants
      run 150 benchmarks.w3_decode --repeats 3 --tag cache2x \
        --variants b64_cache2x,b512_cache2x
      run 150 benchmarks.w3_decode --repeats 3 --tag extra \
        --variants b512_f32params,b512_greedy,b512_xla,b64_xla
      run 60 benchmarks.w4_dpo_step --microbatches 1 --tag mb1
      run 60 benchmarks.w2_train_step --variant none_mb4 --tag none_mb4
      run 60 benchmarks.w2_train_step --variant full_mb1 --tag full_mb1 ;;
    rollout)
      run 60 benchmarks.decode_attention --repeats 3
      run 250 benchmarks.w5_ragged_grpo_step --variant engine --tag engine --repeats 3
      run 160 benchmarks.w5_ragged_grpo_step --variant static --tag static --repeats 2
      run 130 benchmarks.w3_decode --variants b64,b512 --repeats 3 ;;
    buckets)
      run 170 benchmarks.w5_ragged_grpo_step --variant engine --tag buckets4 --repeats 3
      run 90 benchmarks.w3_decode --variants b64_np,b512_np --repeats 3
      XLA_FLAGS="${CMDBUF_FLAGS:---xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE --xla_gpu_graph_min_graph_size=1}" \
        run 90 benchmarks.w3_decode --variants b64_np,b512_np --repeats 3 --tag cmdbuf ;;
    lora_w1)
      run 420 benchmarks.lora_bench --workload w1 --repeats 3
      run 170 benchmarks.w5_ragged_grpo_step --variant engine --tag buckets4 --repeats 3 ;;
    decode_gemm)
      run 230 benchmarks.w3_decode --variants b64,b64_pallas,b512_g8,b512_g8_cascade --repeats 3
      run 90 benchmarks.profile_decode --batches 64 --decode_matmul pallas --tag pallas
      run 150 benchmarks.decode_gemm
      run 90 benchmarks.profile_decode --batches 64 ;;
    cascade)
      run 150 benchmarks.w3_decode --variants b512_g8,b512_g8_cascade --repeats 3
      run 120 benchmarks.profile_decode --batches 512 --group_size 8 --shared_prefix_attention 1 --tag cascade
      run 120 benchmarks.profile_decode --batches 512 --group_size 8 --tag g8 ;;
    update)
      run 120 benchmarks.w1_grpo_step --repeats 3
      run 200 benchmarks.w1_grpo_step --repeats 3 --scan_layers 0 --tag unrolled
      run 120 benchmarks.w1_grpo_step --repeats 3 --remat dots_no_batch_attention --tag attn
      run 120 benchmarks.w1_grpo_step --repeats 3 --update_shared_prompt 1 --tag shared_prompt
      run 120 benchmarks.w1_grpo_step --repeats 3 --float32_logprob_head 1 --tag f32head
      run 120 benchmarks.profile_update --repeats 2 ;;
    shared_prompt)
      run 120 benchmarks.w1_grpo_step --repeats 3
      run 120 benchmarks.w1_grpo_step --repeats 3 --update_shared_prompt 1 --tag shared_prompt
      run 90 benchmarks.w4_dpo_step
      run 90 benchmarks.w4_dpo_step --shared_prompt 1 --tag shared_prompt ;;
    partition)  # its own --out files; on CPU (--smoke) N fake devices stand in for the mock GPUs
      for n in 8 2; do
        sizes=""; (( n == 8 )) && sizes=$([ -n "$SMOKE" ] && echo smoke || echo 1.5b)
        echo "=== [$(date +%T)] partition_check --mock_devices $n"
        XLA_FLAGS="${XLA_FLAGS:-}${SMOKE:+ --xla_force_host_platform_device_count=$n}" \
          timeout -k 5 300 "$PY" -m benchmarks.partition_check --mock_devices "$n" \
          --sizes "$sizes" --meshes "N,1,1;1,N,1" --impls auto --routes shard_map,partitioner \
          --out "$REC/partition_$n.json" || echo "=== FAILED rc=$?: partition_check $n"
      done ;;
    sampling)
      run 200 benchmarks.w3_decode --variants b64,b64_cdf,b512,b512_cdf --repeats 3
      run 100 benchmarks.profile_decode --batches 512 --categorical inverse_cdf --tag cdf
      run 100 benchmarks.profile_decode --batches 64 --dump_hlo 1 --tag hlo ;;
    multi_w2)
      for m in 1,1,1 1,$NGPU,1 $NGPU,1,1 1,$HALF,2; do
        run 120 benchmarks.w2_train_step --variant dots_mb2 --mesh "$m" --tag "dots_mb2_${m//,/x}"
      done ;;
    multi_w1)
      for m in 1,1,1 1,$NGPU,1 $NGPU,1,1 1,$HALF,2; do
        run 150 benchmarks.w1_grpo_step --repeats 3 --mesh "$m" --tag "${m//,/x}"
      done ;;
    multi_w5)
      for m in 1,1,1 1,$NGPU,1 $NGPU,1,1; do
        run 190 benchmarks.w5_ragged_grpo_step --variant engine --repeats 3 --mesh "$m" \
          --tag "engine_${m//,/x}"
      done ;;
    multi_async)
      # The batch splits over both groups' shards: 96 prompts for 2 + 6, 64 otherwise.
      ACTORS=$(( NGPU > 2 ? 2 : 1 )); PROMPTS=$(( NGPU == 8 ? 96 : 64 ))
      run 150 benchmarks.async_step --mode sync --prompts $PROMPTS --repeats 5
      for k in 0 1; do
        run 200 benchmarks.async_step --mode async --actor_devices $ACTORS --lag $k \
          --prompts $PROMPTS --repeats 5
      done ;;
    w1)
      run 200 benchmarks.w1_grpo_step --repeats 3
      run 200 benchmarks.w1_grpo_step --repeats 3 --shared_prefix 0 --tag prefill_per_sample
      run 200 benchmarks.w1_grpo_step --repeats 3 --shared_prefix_attention 1 --tag cascade ;;
  esac
  "$PY" -m benchmarks.report "$REC" $SMOKE
} 2>&1 | tee "$RESULTS_DIR/log_ours_$PLAN.txt"
tar czf "$RESULTS_DIR/records_ours_$PLAN.tar.gz" -C "$REC" . && rm -rf "$REC"
