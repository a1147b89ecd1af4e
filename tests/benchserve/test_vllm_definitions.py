"""Our metric path against `vllm bench serve`'s definitions (vLLM 0.26.0), on identical synthetic
streams: the same SSE payloads at the same timestamps go through our client's event handling
(`consume_event`, `finish_record`) and `metrics.summarize`, and through vllm_reference.py, a
reference written from vLLM's definitions (vllm/benchmarks/lib/endpoint_request_func.py and
calculate_metrics in vllm/benchmarks/serve.py, read, not copied):

- the clock starts just before the POST (after any concurrency slot);
- a payload whose `choices` list is not empty is a token chunk, even with empty text; the first is
  TTFT, every later one adds the gap since the previous one to the pooled ITLs; the last one ends
  the request (E2E), so the trailing usage chunk and [DONE] count for nothing;
- output tokens: the usage chunk's completion_tokens, else the tokenizer's count of the text
  (special tokens not added); input tokens: usage prompt_tokens, else the dataset's length;
- TPOT: (E2E - TTFT) / (output tokens - 1), only for answers of more than one token;
- throughput: completed requests, output tokens and input + output tokens over the run's wall time;
- mean, numpy median, population std and numpy's (linear) percentiles, in ms.

Where the two differ on purpose (a chat stream's role-only first chunk; usage riding on a token
chunk) the last tests pin our choice. Timestamps: our client stamps the moment a network read
returns, vLLM's after parsing each payload of it; both are fed the same stamps here, so what the
GPU cross-check can still find between them is the parsing time of a read (microseconds).
"""

from __future__ import annotations

import json
import random

import pytest
from vllm_reference import (
    Stream,
    count_words,
    done,
    token,
    usage,
    vllm_metrics,
    vllm_request,
    vllm_result_doc,
)

from appliance.benchserve import metrics
from appliance.benchserve.client import consume_event, finish_record
from appliance.benchserve.record import RequestRecord

# --- ours --------------------------------------------------------------------------------------

def our_record(i: int, s: Stream) -> RequestRecord:
    record = RequestRecord(index=i, due_s=s.start, start_s=s.start, prompt_tokens=s.prompt_len)
    if s.http_status != 200:
        record.error_kind = f"http_{s.http_status}"
        return record
    parts: list[str] = []
    for t, payload in s.events:
        consume_event(payload, t, record, parts, "completions")
    finish_record(record, parts, count_words)
    return record


def our_metrics(streams: list[Stream], duration: float, percentiles: list[float]) -> dict[str, float]:
    s = metrics.summarize([our_record(i, st) for i, st in enumerate(streams)], duration, percentiles=percentiles)
    res = {k: s[k] for k in ("completed", "failed", "total_input_tokens", "total_output_tokens",
                             "request_throughput", "output_throughput", "total_token_throughput")}
    for name in ("ttft", "tpot", "itl", "e2el"):
        d = s["latency_ms"][name]
        res[f"mean_{name}_ms"], res[f"median_{name}_ms"], res[f"std_{name}_ms"] = d["mean"], d["p50"], d["std"]
        for p in percentiles:
            res[f"p{p:g}_{name}_ms"] = d[metrics.percentile_key(p)]
    return res


def assert_same(ours: dict[str, float], theirs: dict[str, float]) -> None:
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, rel=1e-12, abs=1e-9), key


PCTS = [50.0, 90.0, 99.0]


def hand_streams() -> list[Stream]:
    return [
        # Usage after the finish, then [DONE]: neither moves E2E. 5 tokens in 4 chunks (one held 2).
        Stream(10.0, [token(10.20, "a"), token(10.30, "b c"), token(10.50, "d"), token(10.60, "e", "length"),
                      usage(10.61, 12, 5), done(10.62)], prompt_len=11),
        # An empty-text chunk (a token that decodes to nothing yet) is a token chunk on both sides.
        Stream(10.1, [token(10.50, ""), token(10.60, "x"), token(10.70, "y", "length"), usage(10.70, 20, 3),
                      done(10.71)], prompt_len=20),
        # One token: TTFT = E2E, no ITL, no TPOT.
        Stream(10.2, [token(11.00, "z", "stop"), usage(11.0, 30, 1), done(11.0)], prompt_len=30),
        # No usage: both count the text with the tokenizer (4 words), the prompt is the client's.
        Stream(10.3, [token(10.40, "one two"), token(10.45, " three"), token(10.55, " four", "length"),
                      done(10.56)], prompt_len=7),
        # Failed: counts as failed, in no figure.
        Stream(10.4, [], prompt_len=40, http_status=503),
        # The stream ended before any token: failed on both sides.
        Stream(10.5, [usage(10.9, 9, 0), done(10.9)], prompt_len=9),
    ]


def test_hand_made_streams_give_vllms_figures() -> None:
    streams = hand_streams()
    duration = 1.25
    theirs = vllm_metrics([vllm_request(s) for s in streams], duration, PCTS)
    ours = our_metrics(streams, duration, PCTS)
    assert_same(ours, theirs)
    # And by hand: 4 completed of 6; TTFTs 200, 400, 800, 100 ms; output 5 + 3 + 1 + 4 tokens.
    assert (ours["completed"], ours["failed"], ours["total_output_tokens"]) == (4, 2, 13)
    assert ours["total_input_tokens"] == 12 + 20 + 30 + 7
    assert ours["median_ttft_ms"] == pytest.approx(300.0)
    assert ours["request_throughput"] == pytest.approx(4 / 1.25)


def random_streams(rng: random.Random, n: int) -> list[Stream]:
    streams = []
    for _ in range(n):
        start = rng.uniform(0.0, 5.0)
        s = Stream(start, prompt_len=rng.randint(1, 2048))
        kind = rng.random()
        if kind < 0.05:
            s.http_status = rng.choice([429, 500, 503])
            streams.append(s)
            continue
        t = start + rng.uniform(0.005, 3.0)  # the first token, after queueing and prefill
        chunks = 1 if kind < 0.15 else rng.randint(2, 60)
        tokens = 0
        for c in range(chunks):
            k = rng.choice([1, 1, 1, 2, 3])  # a chunk may carry several tokens
            tokens += k
            text = "" if rng.random() < 0.05 else " ".join("w" for _ in range(k))
            s.events.append(token(t, text, "length" if c == chunks - 1 else None))
            # ITLs: decode steps, a few long (a prefill chunk in the batch), some two-in-one-read (0)
            t += rng.choice([0.0, rng.uniform(0.003, 0.03), rng.uniform(0.003, 0.03), rng.uniform(0.05, 0.4)])
        if rng.random() < 0.8:
            s.events.append(usage(t, s.prompt_len + rng.randint(0, 2), tokens))
        s.events.append(done(t))
        streams.append(s)
    return streams


@pytest.mark.parametrize("seed", range(5))
def test_random_streams_give_vllms_figures(seed: int) -> None:
    rng = random.Random(seed)
    streams = random_streams(rng, rng.randint(1, 300))
    end = max((t for s in streams for t, _ in s.events), default=5.0)
    percentiles = [50.0, 90.0, 99.0, 99.9, 25.0]
    theirs = vllm_metrics([vllm_request(s) for s in streams], end + 0.01, percentiles)
    ours = our_metrics(streams, end + 0.01, percentiles)
    assert_same(ours, theirs)


def test_the_reference_would_catch_a_different_definition() -> None:
    """The comparison can fail: an E2E that ran to [DONE] (not to the last token) is caught."""
    streams = hand_streams()
    theirs = vllm_metrics([vllm_request(s) for s in streams], 1.25, PCTS)
    late = [Stream(s.start, [*s.events[:-1], (s.events[-1][0] + 0.05, "[DONE]")] if s.events else [],
                   s.prompt_len, s.http_status) for s in streams]
    assert_same(our_metrics(late, 1.25, PCTS), theirs)  # [DONE] later: nothing moves
    shifted = [Stream(s.start - 0.01, s.events, s.prompt_len, s.http_status) for s in streams]
    with pytest.raises(AssertionError, match="ttft"):
        assert_same(our_metrics(shifted, 1.25, PCTS), theirs)


def test_usage_on_a_token_chunk_is_still_the_servers_count() -> None:
    """On purpose unlike vLLM 0.26 (which reads usage only from a chunk without choices and would
    re-tokenize the text): a server sending continuous usage keeps its own count."""
    s = Stream(0.0, [(0.1, json.dumps({"choices": [{"text": "a b c", "finish_reason": "length"}],
                                       "usage": {"prompt_tokens": 5, "completion_tokens": 7}})), done(0.1)])
    record = our_record(0, s)
    assert (record.output_tokens, record.output_tokens_source, record.prompt_tokens) == (7, "usage", 5)
    assert vllm_request(s).output_tokens == 0  # vLLM would count 3 words with its tokenizer


def test_a_chat_role_chunk_is_not_the_first_token() -> None:
    """On purpose unlike vLLM 0.26's chat client (any chunk with choices starts the answer): a
    role-only delta carries no token, so TTFT waits for content."""
    record = RequestRecord(index=0, due_s=0.0, start_s=0.0)
    parts: list[str] = []
    role = json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    content = json.dumps({"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}]})
    consume_event(role, 0.01, record, parts, "chat")
    consume_event(content, 0.30, record, parts, "chat")
    finish_record(record, parts, count_words)
    assert record.ttft_s == pytest.approx(0.30) and record.output_tokens == 1


def test_vllms_own_records_through_our_arithmetic_give_its_figures() -> None:
    """What the GPU cross-check does with every vLLM run (`--save-detailed`): our summarize on
    vLLM's per-request records must reproduce vLLM's reported figures to rounding."""
    from appliance_bench.compare_bench_serve import arithmetic_check

    rng = random.Random(7)
    streams = random_streams(rng, 200)
    doc = vllm_result_doc(streams, 9.5, [50.0, 90.0, 99.0])
    check = arithmetic_check(doc)
    assert check["ok"] and check["figures"] == 6 + 4 * 5 and check["max_rel_diff"] < 1e-12
    doc["p99_itl_ms"] *= 1.001  # a figure vLLM computed differently (another percentile rule) would show
    check = arithmetic_check(doc)
    assert not check["ok"] and check["worst"] == "p99_itl_ms"
    del doc["itls"]
    with pytest.raises(ValueError, match="save-detailed"):
        arithmetic_check(doc)
