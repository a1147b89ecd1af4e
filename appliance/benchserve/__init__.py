"""`llm-appliance bench serve`: load any OpenAI-compatible server through its HTTP API and measure
what it can promise its apps (throughput, TTFT/TPOT/ITL/E2E percentiles, goodput under SLOs, the
highest Poisson rate that still meets them).

It only talks HTTP (plus a local tokenizer to build prompts of exact lengths): nothing here imports
the engine, the server or torch, so it measures our daemon, vLLM or llama.cpp the same way.

Modules, one noun each: workload (the requests), arrivals (when they are sent), client (one
streamed request, timed), record (what a request left behind), metrics (the arithmetic),
server_metrics (the server's /metrics sampled during a run), runner (one load point), progress
(the bar), capacity (the rate search), report (JSON and text), plots (PNGs), command (the CLI).
"""
