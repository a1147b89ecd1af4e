"""Benchmark harnesses, imported as `appliance_bench` (`llm-appliance bench ...`)."""
