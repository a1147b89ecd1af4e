#!/usr/bin/env bash
# Cross-check `llm-appliance bench serve` against `vllm bench serve` (vLLM 0.26.0): ONE server
# process, the same workloads, the two clients alternated ROUNDS times each, one JSON verdict.
#   usage: crosscheck_bench_serve.sh LABEL PORT TOKENIZER_DIR -- SERVER COMMAND...
# Needs `. .peer/vllm-setup.sh` first (vLLM's client). The server and our client run with
# SERVER_PYTHONPATH (as in serve-bench.sh), so vLLM's site stays out of them. Start the server
# with the served name "m" and prefix caching OFF (ours: --set engine.enable_prefix_caching=false;
# vLLM: --no-enable-prefix-caching): each client then costs the server the same work whatever its
# prompts, and no run finds its prompts cached by an earlier one (docs/bench-serve.md). The exact
# call for the lent GPU is in bench/NOTES.md ("bench serve against vllm bench serve").
#
# Workloads (deterministic: fixed lengths, ignore_eos, no arrival randomness):
#   w1c64  W1 lengths 512 -> 256 at concurrency 64 (W1_PROMPTS, default 512)
#   c1     256 -> 128 one at a time (C1_PROMPTS, default 16)
#   c8     128 -> 128 at concurrency 8 (C8_PROMPTS, default 256): a workload whose percentiles the
#          server holds steady (a new prompt's 128-token prefill joins a step of 7 decodes, ~1 step
#          in 16), where w1c64's TTFT p50 and ITL p99 fall between clusters of the server's own
#          distribution and move by more than 3% from run to run (docs/bench-serve.md)
# Per workload: one unmeasured warm-up pass (the shapes' first-use costs), then rounds
# (odd: ours, vLLM; even: vLLM, ours), each run with its own seed; /metrics is read before and after
# every run (outside both clients' clocks) for the server's own token counts and latency sums.
# Side by side (SIDE, default "c8 w1c64 p12"; "" for none): after the alternated rounds, the workload
# again as workload "<w>s", both clients at once against the server, each with half the prompts and
# half the concurrency, ROUNDS times. Both then measure the same server in the same seconds, so the
# server's run-to-run spread (which alternated runs cannot separate from the clients: c8's TTFT p50
# moved 31% between two runs of ours at b78de70, the server's own mean TTFT 38%) is common to both.
# The /metrics scrapes around such a round are the two clients' load together.
#   p12s   side by side only: W1 prompts 512 -> 128, each client its own Poisson arrivals at 6 req/s
#          (P12_PROMPTS / 2 each, default 144). A closed loop (a concurrency limit) ties each client's
#          next request to its own last answer: at w1c64s the 64 streams run in waves, a wave's prompts
#          are prefilled in arrival order, and the client that turns its slots around later queues
#          behind the other (83c6700: our half's mean TTFT 13 ms above vLLM's half, and more prefill
#          steps inside its streams). Two independent open-loop processes interleave at random: each
#          half is a random sample of one server's service, whatever either client's turnaround.
# vLLM's client is imported once, while the server starts (bench/vllm_bench_client.py); if it
# fails to come up, each run falls back to `python3 -m vllm.entrypoints.cli.main bench serve`.
# BUDGET_S (default 225) stops starting runs that would not finish within it.
# Output in $OUT (or ./crosscheck-out): every run's JSON and log, the scrapes, runs.tsv, and
# crosscheck_<LABEL>.json from bench/compare_bench_serve.py --crosscheck (exit 1: not within 3%), and
# crosscheck_server_view_<LABEL>.json from bench/crosscheck_server_view.py (our daemon only).
set -u
L=$1; P=$2; TOK=$3; shift 4
O=${OUT:-$PWD/crosscheck-out}; mkdir -p "$O"
ROUNDS=${ROUNDS:-2}; W1_PROMPTS=${W1_PROMPTS:-512}; C1_PROMPTS=${C1_PROMPTS:-16}; C8_PROMPTS=${C8_PROMPTS:-256}
BUDGET_S=${BUDGET_S:-330}
WARM_W1=${WARM_W1_PROMPTS:-128}; WARM_C1=${WARM_C1_PROMPTS:-4}; WARM_C8=${WARM_C8_PROMPTS:-16}
P12_PROMPTS=${P12_PROMPTS:-288}
ONLY=${ONLY:-w1c64 c1 c8}; SIDE=${SIDE-c8 w1c64 p12}; RUN_TIMEOUT_S=${RUN_TIMEOUT_S:-150}  # a run past it is stopped (status 124)
HERE=$(cd "$(dirname "$0")" && pwd)
OURPP=${SERVER_PYTHONPATH-${PYTHONPATH:-}}
URL="http://127.0.0.1:$P"
T0=$(date +%s%3N)
ms() { echo $(( $(date +%s%3N) - T0 )); }  # since the start, ms
el() { local m; m=$(ms); printf "%d.%03d" $((m / 1000)) $((m % 1000)); }

PYTHONPATH=$OURPP "$@" >"$O/serve_$L.log" 2>&1 &
SP=$!
coproc VC { exec python3 -u "$HERE/vllm_bench_client.py" 2>"$O/vllm_client_$L.err"; }
VC_IN=${VC[1]}; VC_OUT=${VC[0]}; LOOP_PID=$VC_PID
for _ in $(seq 600); do curl -fsS "$URL/health" >/dev/null 2>&1 && break; kill -0 $SP 2>/dev/null || break; sleep 0.5; done
if ! curl -fsS "$URL/health" >/dev/null 2>&1; then
  echo "$L: the server never answered /health (serve_$L.log):"; tail -20 "$O/serve_$L.log"
  kill $SP 2>/dev/null; echo quit >&"$VC_IN" 2>/dev/null; exit 1
fi
echo "$L: server healthy after $(el) s"
VLLM_VERSION=unknown; LOOP=0
if read -r -t 120 word ver <&"$VC_OUT" && [ "$word" = ready ]; then LOOP=1; VLLM_VERSION=$ver
else echo "vLLM's client loop did not start (see vllm_client_$L.err): one process per run"; fi
(( LOOP )) && echo "$L: vLLM $VLLM_VERSION's client imported after $(el) s"

declare -A OURS VLLM WARM
OURS[w1c64]="--concurrency 64 --input-len 512 --output-len 256 --num-prompts $W1_PROMPTS"
VLLM[w1c64]="--max-concurrency 64 --request-rate inf --random-input-len 512 --random-output-len 256 --num-prompts $W1_PROMPTS"
WARM[w1c64]="--concurrency 64 --input-len 512 --output-len 256 --num-prompts $WARM_W1"
OURS[c1]="--concurrency 1 --input-len 256 --output-len 128 --num-prompts $C1_PROMPTS"
VLLM[c1]="--max-concurrency 1 --request-rate inf --random-input-len 256 --random-output-len 128 --num-prompts $C1_PROMPTS"
WARM[c1]="--concurrency 1 --input-len 256 --output-len 128 --num-prompts $WARM_C1"
OURS[c8]="--concurrency 8 --input-len 128 --output-len 128 --num-prompts $C8_PROMPTS"
VLLM[c8]="--max-concurrency 8 --request-rate inf --random-input-len 128 --random-output-len 128 --num-prompts $C8_PROMPTS"
WARM[c8]="--concurrency 8 --input-len 128 --output-len 128 --num-prompts $WARM_C8"
# Side by side: each client half of the workload, at the same time.
OURS[w1c64s]="--concurrency 32 --input-len 512 --output-len 256 --num-prompts $((W1_PROMPTS / 2))"
VLLM[w1c64s]="--max-concurrency 32 --request-rate inf --random-input-len 512 --random-output-len 256 --num-prompts $((W1_PROMPTS / 2))"
OURS[c8s]="--concurrency 4 --input-len 128 --output-len 128 --num-prompts $((C8_PROMPTS / 2))"
OURS[p12s]="--rate 6 --input-len 512 --output-len 128 --num-prompts $((P12_PROMPTS / 2))"
VLLM[p12s]="--request-rate 6 --burstiness 1.0 --random-input-len 512 --random-output-len 128 --num-prompts $((P12_PROMPTS / 2))"
VLLM[c8s]="--max-concurrency 4 --request-rate inf --random-input-len 128 --random-output-len 128 --num-prompts $((C8_PROMPTS / 2))"
# Both send vLLM's completions body: ignore_eos, stream_options.include_usage, repetition_penalty 1.
# Ours without its warm-up request (vLLM 0.26 sends none by default) and without sampling /metrics
# (the script reads it between runs instead, for both clients alike).
OURS_COMMON=(--base-url "$URL" --model m --tokenizer "$TOK" --ignore-eos --extra-body '{"repetition_penalty": 1.0}'
             --warmup 0 --no-server-metrics --no-plots --no-progress --percentiles 50,90,99 --save-itls)
VLLM_COMMON=(--backend vllm --base-url "$URL" --model m --tokenizer "$TOK" --dataset-name random --ignore-eos
             --metric-percentiles 50,90,99 --percentile-metrics ttft,tpot,itl,e2el --save-result --save-detailed
             --disable-tqdm)
printf "workload\tclient\tround\tseed\tstart_ms\tend_ms\tstatus\n" >"$O/runs.tsv"

ours() {  # NAME SEED ARGS...
  local name=$1 seed=$2; shift 2
  PYTHONPATH=$OURPP timeout "$RUN_TIMEOUT_S" python3 -m appliance.cli bench serve "${OURS_COMMON[@]}" "$@" \
    --seed "$seed" --result-dir "$O" --result-name "$name.json" >"$O/$name.log" 2>&1
}
theirs() {  # NAME SEED ARGS...
  local name=$1 seed=$2; shift 2
  local args=("${VLLM_COMMON[@]}" "$@" --seed "$seed" --result-dir "$O" --result-filename "$name.json")
  if (( LOOP )); then
    local word status
    if ! { printf '%q ' "$O/$name.log" "${args[@]}"; echo; } >&"$VC_IN" 2>/dev/null; then
      echo "vLLM's client loop is gone (see vllm_client_$L.err): one process per run from here"; LOOP=0
    elif read -r -t "$RUN_TIMEOUT_S" word status <&"$VC_OUT" && [ "$word" = done ]; then
      return "$status"
    else  # hung past the limit, or died in the run: not to be asked again
      echo "vLLM's client loop did not answer within $RUN_TIMEOUT_S s: stopped; one process per run from here"
      kill "$LOOP_PID" 2>/dev/null; LOOP=0; return 124
    fi
  fi
  timeout "$RUN_TIMEOUT_S" python3 -m vllm.entrypoints.cli.main bench serve "${args[@]}" >>"$O/$name.log" 2>&1
}
declare -A LAST_MS
measure() {  # WORKLOAD CLIENT ROUND SEED
  local w=$1 c=$2 r=$3 seed=$4 name="$1_$2_r$3" start end status
  start=$(ms)
  if (( start + ${LAST_MS[$w]:-0} > BUDGET_S * 1000 )); then
    echo "$name: skipped (would end past ${BUDGET_S} s)"
    printf "%s\t%s\t%s\t%s\t%s\t\tskipped\n" "$w" "$c" "$r" "$seed" "$start" >>"$O/runs.tsv"; return
  fi
  curl -fsS "$URL/metrics" >"$O/$name.before.prom" 2>/dev/null
  if [ "$c" = ours ]; then ours "$name" "$seed" ${OURS[$w]}; else theirs "$name" "$seed" ${VLLM[$w]}; fi
  status=$?
  curl -fsS "$URL/metrics" >"$O/$name.after.prom" 2>/dev/null
  end=$(ms); LAST_MS[$w]=$((end - start))
  printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$w" "$c" "$r" "$seed" "$start" "$end" "$status" >>"$O/runs.tsv"
  echo "$name: exit $status, $((LAST_MS[$w] / 1000)) s"
}

side() {  # WORKLOAD ROUND SEED_OURS SEED_VLLM: both clients at once (workload "<w>s")
  local w=$1s r=$2 a=$3 b=$4 start end so sv pid
  local no="${w}_ours_r$r" nv="${w}_vllm_r$r"
  start=$(ms)
  if (( start + ${LAST_MS[$w]:-0} > BUDGET_S * 1000 )); then
    echo "$w round $r: skipped (would end past ${BUDGET_S} s)"
    printf "%s\t%s\t%s\t%s\t%s\t\tskipped\n" "$w" ours "$r" "$a" "$start" >>"$O/runs.tsv"
    printf "%s\t%s\t%s\t%s\t%s\t\tskipped\n" "$w" vllm "$r" "$b" "$start" >>"$O/runs.tsv"; return
  fi
  curl -fsS "$URL/metrics" >"$O/$no.before.prom" 2>/dev/null; cp "$O/$no.before.prom" "$O/$nv.before.prom"
  ours "$no" "$a" ${OURS[$w]} &
  pid=$!
  theirs "$nv" "$b" ${VLLM[$w]}; sv=$?
  wait $pid; so=$?
  curl -fsS "$URL/metrics" >"$O/$no.after.prom" 2>/dev/null; cp "$O/$no.after.prom" "$O/$nv.after.prom"
  end=$(ms); LAST_MS[$w]=$((end - start))
  printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$w" ours "$r" "$a" "$start" "$end" "$so" >>"$O/runs.tsv"
  printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$w" vllm "$r" "$b" "$start" "$end" "$sv" >>"$O/runs.tsv"
  echo "$w round $r: exit $so (ours) $sv (vLLM), $((LAST_MS[$w] / 1000)) s side by side"
}

wi=0
for w in $ONLY; do
  wi=$((wi + 1))
  ours "${w}_warmup" $((1000 * wi)) ${WARM[$w]}; echo "$w: warm-up pass done at $(el) s"
  for r in $(seq "$ROUNDS"); do  # a seed per run: no run meets another's prompts (vLLM's: at one seed
    a=$((1000 * wi + 10 * r + 1)); b=$((1000 * wi + 10 * r + 2))  # its short prompts head its long ones)
    if (( r % 2 )); then measure "$w" ours "$r" $a; measure "$w" vllm "$r" $b
    else measure "$w" vllm "$r" $b; measure "$w" ours "$r" $a; fi
  done
done
for w in $SIDE; do
  wi=$((wi + 1))
  for r in $(seq "$ROUNDS"); do side "$w" "$r" $((1000 * wi + 10 * r + 1)) $((1000 * wi + 10 * r + 2)); done
done
(( LOOP )) && echo quit >&"$VC_IN"
kill $SP; wait $SP 2>/dev/null
cat >"$O/meta.json" <<EOF
{"label": "$L", "vllm_version": "$VLLM_VERSION", "vllm_client": "$( (( LOOP )) && echo "one process (bench/vllm_bench_client.py)" || echo "one process per run")",
 "device": "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)",
 "commit": "${LLM_APPLIANCE_COMMIT:-$(git -C "$HERE" rev-parse --short HEAD 2>/dev/null || echo unknown)}", "date": "$(date -u +%FT%TZ)",
 "server_command": $(python3 -c 'import json,sys; print(json.dumps(" ".join(sys.argv[1:])))' "$@"), "rounds": $ROUNDS,
 "w1_prompts": $W1_PROMPTS, "c1_prompts": $C1_PROMPTS, "side_by_side": "$SIDE", "wall_s": $(el)}
EOF
PYTHONPATH=$OURPP python3 "$HERE/compare_bench_serve.py" --crosscheck "$O" --json "$O/crosscheck_$L.json"
status=$?
# Each request against the server's own record of it (our daemon's request log; another server
# has none): the ratios split into the service each half got and the clients' measurement.
if grep -q "appliance.requests:" "$O/serve_$L.log" 2>/dev/null; then
  PYTHONPATH=$OURPP python3 "$HERE/crosscheck_server_view.py" --crosscheck "$O" --json "$O/crosscheck_server_view_$L.json" \
    || echo "$L: crosscheck_server_view failed (the verdict above stands)"
fi
echo "$L: done after $(el) s"
exit $status
