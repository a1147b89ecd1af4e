"""Grammar-constrained decoding (structured outputs, forced tool calls).

`spec.py` (no heavy imports; the server and SamplingParams use it): what a request asks for, as
a `GrammarSpec`, parsed and checked from `response_format` / `structured_outputs` with 400s that
name the unsupported parts. `grammar.py` (the engine core's process): compiles specs with
xgrammar on a thread pool, caches them, keeps one matcher per sequence and fills the token
bitmask the sampler applies on the device. Why xgrammar: bench/results/grammar_backends_cpu.json.
"""
