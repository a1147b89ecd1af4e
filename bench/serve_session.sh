#!/usr/bin/env bash
# One device call of a serve-bench session on the lent GPU: our daemon and vLLM 0.26.0 driven by the
# same client (`vllm bench serve`, ../shared/peer/serve-bench.sh), run by run, each run's JSON and
# log under $OUT/<run>/ (what bench/serve_pairs.py reads), packed at the end into one $OUT/session.tgz
# (a call returns at most 8 files).
#   usage: bench/serve_session.sh STEP [STEP ...]
#   STEP:  check           the GPU engine tests (graphs vs eager, lone-prefill graphs, same-step prefix hits)
#          ours8b:RUN      our daemon, 8B shape, the whole suite (W1, prefix, c1, rate24) into $OUT/RUN
#          vllm8b:RUN      vLLM, the same
#          ours135m:RUN    our daemon, 135M shape, W1 lengths with 1,024 prompts at once, into $OUT/RUN
#          vllm135m:RUN    vLLM, the same
#          crosscheck      issue 14: `llm-appliance bench serve` against `vllm bench serve`, one daemon (8B)
#          offline         bench/offline.py W1 + batch-1 for both shapes (ours only); offline135m, offline8b: one
#                          (offline135m:RUN: results into $OUT/RUN; OFFLINE_EXTRA: more arguments, e.g.
#                          "--piecewise-max-tokens 8192")
#          profile135m:RUN bench/profile_step.py on the 135M W1 (a prefill window and a decode window; OFFLINE_EXTRA)
#          sse             bench/sse_capacity.py: the HTTP side alone on this host's CPU (no GPU), 3 loads
# Needs, carried: .peer (minus the parts: p1..p3 copied to $HOME/vl by earlier calls), build/gpu-deps.
# GPU_DEPS: that folder under another name (default build/gpu-deps; the engine tests need only msgspec
# and gguf, so a lighter one fits beside a 42 MiB part). Set LLM_APPLIANCE_COMMIT to the short sha.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
O=${OUT:-$PWD/session-out}; mkdir -p "$O"
mkdir -p /tmp/pp && ln -sfn "$PWD/kernels" /tmp/pp/appliance_kernels && ln -sfn "$PWD/bench" /tmp/pp/appliance_bench
OURS_PP=$PWD:/tmp/pp:$PWD/${GPU_DEPS:-build/gpu-deps}
for shape in llama-3.1-8b smollm2-135m; do mkdir -p "/tmp/m-$shape" && cp ".peer/$shape-config.json" "/tmp/m-$shape/config.json"; done
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader | tee "$O/gpu.txt"
pack() { (cd "$O" && tar -czf /tmp/session.tgz --exclude=session.tgz . && mv /tmp/session.tgz "$O/session.tgz"); }
trap pack EXIT
ours_cmd() {  # shape port (OURS_EXTRA: more daemon arguments, e.g. "--set engine.max_prefill_tokens_with_decodes=1024")
  echo python3 -m appliance.cli serve --model "$1" --set model.load_format=dummy --set model.tokenizer=.peer/tok \
    --served-model-name m --port "$2" --max-model-len 4096 ${OURS_EXTRA:-}
}
vllm_cmd() {  # shape port
  echo python3 -m vllm.entrypoints.cli.main serve "/tmp/m-$1" --load-format dummy --tokenizer .peer/tok \
    --dtype bfloat16 --max-model-len 4096 --gpu-memory-utilization 0.9 --port "$2" --served-model-name m
}
# W1 lengths, 1,024 prompts at once (the 135M shape: issue 9's "HTTP, 135M shape" row).
w1_135m() {  # label port dir -- server command
  local L=$1 P=$2 D=$3; shift 4
  local t0; t0=$(date +%s)
  PYTHONPATH=$SP "$@" >"$D/serve_$L.log" 2>&1 &
  local pid=$!
  for _ in $(seq 600); do curl -fsS "localhost:$P/health" >/dev/null 2>&1 && break; kill -0 $pid 2>/dev/null || break; sleep 0.5; done
  echo "$L: server healthy after $(( $(date +%s) - t0 )) s"
  python3 -m vllm.entrypoints.cli.main bench serve --backend vllm --base-url "http://127.0.0.1:$P" --model m \
    --tokenizer .peer/tok --dataset-name random --ignore-eos --save-result --result-dir "$D" \
    --request-rate inf --random-input-len 512 --random-output-len 256 --num-prompts 1024 \
    --result-filename "w1_$L.json" >"$D/w1_$L.log" 2>&1
  grep -E "Failed|Output token throughput|Median TTFT|P99 TTFT|Median TPOT|Median ITL|P99 ITL" "$D/w1_$L.log" | sed "s/^/w1_$L /"
  kill $pid; wait $pid 2>/dev/null
}
for step in "$@"; do
  name=${step%%:*}; run=${step#*:}; D=$O/$run
  echo "=== $step ($(date -u +%T))"
  case $name in
    check)
      PYTHONPATH=$OURS_PP timeout 400 python3 -m pytest -q -x -p no:cacheprovider tests/engine/test_gpu_engine.py 2>&1 | tail -15 | tee "$O/check.txt" ;;
    ours8b|vllm8b)
      mkdir -p "$D"; ( . .peer/vllm-setup.sh >/dev/null
        if [ "$name" = ours8b ]; then
          OUT=$D SERVER_PYTHONPATH=$OURS_PP bash .peer/serve-bench.sh ours 8000 .peer/tok -- $(ours_cmd llama-3.1-8b 8000)
        else
          OUT=$D bash .peer/serve-bench.sh vllm 8001 .peer/tok -- $(vllm_cmd llama-3.1-8b 8001)
        fi ) ;;
    ours135m|vllm135m)
      mkdir -p "$D"; ( SP=${PYTHONPATH:-}; . .peer/vllm-setup.sh >/dev/null
        if [ "$name" = ours135m ]; then SP=$OURS_PP w1_135m ours 8000 "$D" -- $(ours_cmd smollm2-135m 8000)
        else SP=$PYTHONPATH w1_135m vllm 8001 "$D" -- $(vllm_cmd smollm2-135m 8001); fi ) ;;
    crosscheck)  # issue 14: our client against vLLM's on one daemon (bench/crosscheck_bench_serve.sh)
      mkdir -p "$O/crosscheck"; ( . .peer/vllm-setup.sh >/dev/null
        OUT=$O/crosscheck SERVER_PYTHONPATH=$OURS_PP bash bench/crosscheck_bench_serve.sh h200 8000 .peer/tok -- \
          $(ours_cmd llama-3.1-8b 8000) --set engine.enable_prefix_caching=false ) 2>&1 | tail -40 ;;
    offline|offline135m|offline8b)
      models=smollm2-135m,llama-3.1-8b; [ "$name" = offline135m ] && models=smollm2-135m
      [ "$name" = offline8b ] && models=llama-3.1-8b
      # a folder per step: the result file is named by date, device and commit only
      mkdir -p "$O/$run"; PYTHONPATH=$OURS_PP python3 -m appliance_bench.offline offline --no-hf \
        --models "$models" --tokenizer .peer/tok --results-dir "$O/$run" ${OFFLINE_EXTRA:-} 2>&1 | tail -25 ;;
    profile135m)  # where the 135M W1's steps spend their time (host phases, GPU kernels, host ops)
      mkdir -p "$O/$run"; PYTHONPATH=$OURS_PP python3 -m appliance_bench.profile_step --model smollm2-135m \
        --num-requests 512 --max-num-seqs 512 --tokenizer .peer/tok --profile-prefill-steps 4 --profile-prefill-at 4 \
        --top 20 --results-dir "$O/$run" ${OFFLINE_EXTRA:-} 2>&1 | grep -v "^$" | tail -60 ;;
    sse)
      mkdir -p "$O/sse"; for load in 256:8 512:6 512:4; do
        PYTHONPATH=$OURS_PP python3 -m appliance_bench.sse_capacity --streams "${load%%:*}" --step-ms "${load#*:}" \
          --tokens 256 --tokenizer .peer/tok --out "$O/sse/sse_${load%%:*}_${load#*:}.json" 2>&1 | tail -13
      done ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
