#!/usr/bin/env bash
# Issue 13's one GPU call (< 6 min on an H200): the kernel phase and the engine phase of
# bench/longctx.py (our daemon vs vLLM's server, the same in-process client), results to $OUT.
#
#   LLM_APPLIANCE_COMMIT=<sha> bash bench/longctx_gpu.sh [more python -m appliance_bench.longctx args]
#
# Run from the repository root as sent to the GPU machine, with .peer/ carried (tok/,
# llama-3.1-8b-config.json, vllm-setup.sh: ../shared/peer/README.md) and vLLM's parts already in
# $HOME/vl (earlier copy calls). vLLM is unpacked by its own server command, in the background,
# while the kernel phase runs. Everything is timed from this script's start ($LONGCTX_T0) and
# finishes or skips within --budget-s (345 s by default).
set -uo pipefail
export LONGCTX_T0=${LONGCTX_T0:-$(date +%s)}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
: "${OUT:=$PWD/longctx-out}"
export OUT
mkdir -p "$OUT" /tmp/pp
# The GPU copy has no installed package: kernels/ and bench/ by their import names (bench/NOTES.md).
ln -sfn "$PWD/kernels" /tmp/pp/appliance_kernels
ln -sfn "$PWD/bench" /tmp/pp/appliance_bench
export PYTHONPATH=$PWD:/tmp/pp
# Our runtime dependencies the GPU image lacks (msgspec, xgrammar, ...), carried as an unpacked
# site folder (bench/NOTES.md: build/gpu-deps).
[ -d "$PWD/build/gpu-deps" ] && export PYTHONPATH=$PYTHONPATH:$PWD/build/gpu-deps
# The daemons get the prefill switch from the script, never from the caller's environment.
unset APPLIANCE_LONG_PREFILL_MIN_QUERY_TOKENS APPLIANCE_PREFILL_TILE
missing=0
for f in .peer/tok/tokenizer.json .peer/llama-3.1-8b-config.json .peer/vllm-setup.sh; do
  [ -e "$f" ] || { echo "longctx_gpu: missing $f (carry .peer/tok and the peer files)" >&2; missing=1; }
done
if [ ! -d "$HOME/vsite" ] && ! ls "$HOME"/vl/part.* >/dev/null 2>&1; then
  echo "longctx_gpu: vLLM is neither unpacked (\$HOME/vsite) nor copied (\$HOME/vl/part.*)" >&2; missing=1
fi
[ "$missing" = 0 ] || exit 2
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.sm --format=csv,noheader || true
python3 -m appliance_bench.longctx --results-dir "$OUT" "$@" 2>&1 | tee "$OUT/longctx.log"
