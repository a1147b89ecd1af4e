#!/usr/bin/env bash
# Cross-check `llm-appliance bench serve` against `vllm bench serve` on one server, same workloads
# as ../shared/peer/serve-bench.sh (W1 lengths at rate inf; Poisson 24 req/s, 960 prompts, seed 1;
# one at a time), the two clients alternated ROUNDS times against the same server process.
#   usage: crosscheck_bench_serve.sh LABEL PORT TOKENIZER_DIR -- SERVER COMMAND...
# Needs `. .peer/vllm-setup.sh` first (vLLM's client); our client and the server run with
# SERVER_PYTHONPATH (as in serve-bench.sh), so vLLM's site stays out of them. Results go to $OUT
# (or ./crosscheck-out): <workload>_<client>_r<round>_<LABEL>.json, then compare_<workload>_<LABEL>.txt/json
# (medians over the rounds, bench/compare_bench_serve.py). ONLY="w1 rate24 c1" picks workloads.
set -u
L=$1; P=$2; TOK=$3; shift 4
O=${OUT:-$PWD/crosscheck-out}; mkdir -p "$O"
ROUNDS=${ROUNDS:-2}
HERE=$(cd "$(dirname "$0")" && pwd)
OURPP=${SERVER_PYTHONPATH-${PYTHONPATH:-}}
t0=$(date +%s)
PYTHONPATH=$OURPP "$@" >"$O/serve_$L.log" 2>&1 &
SP=$!
for _ in $(seq 600); do curl -fsS "localhost:$P/health" >/dev/null 2>&1 && break; kill -0 $SP 2>/dev/null || break; sleep 0.5; done
echo "$L: server healthy after $(( $(date +%s) - t0 )) s"

declare -A VLLM_ARGS OUR_ARGS
VLLM_ARGS[w1]="--request-rate inf --random-input-len 512 --random-output-len 256 --num-prompts 512"
OUR_ARGS[w1]="--rate inf --input-len 512 --output-len 256 --num-prompts 512"
VLLM_ARGS[rate24]="--request-rate 24 --random-input-len 512 --random-output-len 256 --num-prompts 960 --seed 1"
OUR_ARGS[rate24]="--rate 24 --input-len 512 --output-len 256 --num-prompts 960 --seed 1"
VLLM_ARGS[c1]="--max-concurrency 1 --random-input-len 256 --random-output-len 128 --num-prompts 16"
OUR_ARGS[c1]="--concurrency 1 --input-len 256 --output-len 128 --num-prompts 16"

# Our client sends the body vLLM's does (its completions client adds repetition_penalty 1.0).
ours() {  # workload round
  PYTHONPATH=$OURPP python3 -m appliance.cli bench serve --base-url "http://127.0.0.1:$P" --model m \
    --tokenizer "$TOK" --ignore-eos --extra-body '{"repetition_penalty": 1.0}' ${OUR_ARGS[$1]} --result-dir "$O" --result-name "$1_ours_r$2_$L" \
    --no-plots --no-progress >"$O/$1_ours_r$2_$L.log" 2>&1
  grep -E "^rate|^concurrency" "$O/$1_ours_r$2_$L.log" | sed "s/^/$1 ours r$2: /"
}
theirs() {
  python3 -m vllm.entrypoints.cli.main bench serve --backend vllm --base-url "http://127.0.0.1:$P" --model m \
    --tokenizer "$TOK" --dataset-name random --ignore-eos ${VLLM_ARGS[$1]} --metric-percentiles 50,99 \
    --save-result --result-dir "$O" --result-filename "$1_vllm_r$2_$L.json" --disable-tqdm \
    >"$O/$1_vllm_r$2_$L.log" 2>&1
  grep -E "Failed|Output token throughput|Median TTFT|P99 TTFT|P99 ITL" "$O/$1_vllm_r$2_$L.log" | sed "s/^/$1 vllm r$2: /"
}
for w in ${ONLY:-w1 rate24 c1}; do
  for r in $(seq "$ROUNDS"); do
    # Alternate which client goes first, so neither always meets a fresher server.
    if (( r % 2 )); then ours "$w" "$r"; theirs "$w" "$r"; else theirs "$w" "$r"; ours "$w" "$r"; fi
  done
  python3 "$HERE/compare_bench_serve.py" --ours "$O/${w}"_ours_r*_"$L".json \
    --vllm "$O/${w}"_vllm_r*_"$L".json --json "$O/compare_${w}_$L.json" | tee "$O/compare_${w}_$L.txt"
done
kill $SP; wait $SP 2>/dev/null
echo "$L: done after $(( $(date +%s) - t0 )) s"
