"""The GPU end-to-end check, run on the CPU at tiny sizes so it cannot rot."""

from __future__ import annotations

from appliance_bench import e2e_check


def test_engine_logprobs_match_hf_with_chunked_prefill_and_prefix_hits():
    report = e2e_check.check_model("tiny-llama", "cpu")
    assert report["cached_tokens_prefix_hit_request"] > 0
    assert report["steps"] > e2e_check.DECODE_STEPS + 1  # the long prompt took several chunks
    assert report["ok"], report


def test_fp8_kv_cache_run_reports_its_error():
    report = e2e_check.check_model("tiny-llama", "cpu", kv_cache_dtype="fp8")
    assert report["kv_cache_dtype"] == "fp8" and report["ok"]
    assert 0.0 < report["max_abs_logprob_err_ours_vs_hf_fp32"] < report["fp8_tolerance"]
