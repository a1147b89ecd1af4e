"""The sampler against direct small computations, on CPU (and CUDA when present).

Distribution checks draw many samples of one row (num_samples) under a fixed torch seed and compare
frequencies with probabilities computed here by hand, in plain Python.
"""

from __future__ import annotations

import math

import pytest
import torch

from appliance.engine.sampler import Sampler, SampleRow
from appliance.engine.sequence import SamplingParams, Sequence

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
EOS = 5
VOCAB = 8


def make_seq(prompt: list[int] | None = None, output: list[int] | None = None, **params: object) -> Sequence:
    seq = Sequence("req", prompt if prompt is not None else [1, 2, 3], SamplingParams(**params))  # type: ignore[arg-type]
    for tok in output or []:
        seq.append_token(tok)
    return seq


def softmax(values: list[float]) -> list[float]:
    finite = [v for v in values if v != -math.inf]
    top = max(finite)
    exps = [math.exp(v - top) if v != -math.inf else 0.0 for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def frequencies(
    sampler: Sampler, logits: list[float], seq: Sequence, device: str, n: int = 20000
) -> list[float]:
    torch.manual_seed(0)
    result = sampler(torch.tensor([logits], device=device), [SampleRow(seq, num_samples=n)])[0]
    assert len(result.token_ids) == n
    counts = [0] * len(logits)
    for tok in result.token_ids:
        counts[tok] += 1
    return [c / n for c in counts]


def assert_close_dist(observed: list[float], expected: list[float], tol: float = 0.02) -> None:
    for tok, (o, e) in enumerate(zip(observed, expected, strict=True)):
        if e == 0.0:
            assert o == 0.0, f"token {tok} has probability 0 but was sampled ({o})"
        else:
            assert abs(o - e) < tol, (
                f"token {tok}: observed {o:.4f}, expected {e:.4f}\n{observed}\n{expected}"
            )


LOGITS = [2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax(device: str) -> None:
    torch.manual_seed(1)
    logits = torch.randn(6, 50, device=device)
    rows = [SampleRow(make_seq(temperature=0.0)) for _ in range(6)]
    out = Sampler(50, [EOS])(logits, rows)
    assert [r.token_ids for r in out] == [[t] for t in logits.argmax(-1).tolist()]
    assert all(r.logprobs is None for r in out)


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_one_is_greedy(device: str) -> None:
    torch.manual_seed(2)
    logits = torch.randn(5, 40, device=device)
    out = Sampler(40, [EOS])(logits, [SampleRow(make_seq(temperature=1.3, top_k=1)) for _ in range(5)])
    assert [r.token_ids[0] for r in out] == logits.argmax(-1).tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_temperature_distribution(device: str) -> None:
    for temperature in (1.0, 0.5, 2.0):
        seq = make_seq(temperature=temperature)
        observed = frequencies(Sampler(VOCAB, [EOS]), LOGITS, seq, device)
        assert_close_dist(observed, softmax([v / temperature for v in LOGITS]))


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_top_p_min_p_distributions(device: str) -> None:
    scaled = [v / 0.8 for v in LOGITS]
    # top_k = 3: renormalised over the 3 best.
    expected = softmax([v if i < 3 else -math.inf for i, v in enumerate(scaled)])
    assert_close_dist(
        frequencies(Sampler(VOCAB, [EOS]), LOGITS, make_seq(temperature=0.8, top_k=3), device), expected
    )

    # top_p = 0.7: the smallest best-first prefix whose mass reaches 0.7.
    probs = softmax(scaled)
    keep, mass = [], 0.0
    for i, p in enumerate(probs):
        if mass >= 0.7:
            break
        keep.append(i)
        mass += p
    expected = softmax([v if i in keep else -math.inf for i, v in enumerate(scaled)])
    assert len(keep) < VOCAB - 1
    assert_close_dist(
        frequencies(Sampler(VOCAB, [EOS]), LOGITS, make_seq(temperature=0.8, top_p=0.7), device), expected
    )

    # min_p = 0.2: tokens below 0.2 * max prob are dropped.
    expected = softmax([v if probs[i] >= 0.2 * max(probs) else -math.inf for i, v in enumerate(scaled)])
    assert_close_dist(
        frequencies(Sampler(VOCAB, [EOS]), LOGITS, make_seq(temperature=0.8, min_p=0.2), device), expected
    )

    # top_k then top_p: top_p is computed on the top_k-renormalised distribution.
    topk_probs = softmax([v if i < 4 else -math.inf for i, v in enumerate(scaled)])
    keep, mass = [], 0.0
    for i, p in enumerate(topk_probs):
        if mass >= 0.8 or p == 0.0:
            break
        keep.append(i)
        mass += p
    expected = softmax([v if i in keep else -math.inf for i, v in enumerate(scaled)])
    seq = make_seq(temperature=0.8, top_k=4, top_p=0.8)
    assert_close_dist(frequencies(Sampler(VOCAB, [EOS]), LOGITS, seq, device), expected)


def penalised(
    logits: list[float], prompt: list[int], output: list[int], params: SamplingParams
) -> list[float]:
    """The OpenAI/vLLM penalties, one token at a time."""
    out = list(logits)
    for tok in range(len(out)):
        if tok in prompt or tok in output:
            r = params.repetition_penalty
            out[tok] = out[tok] / r if out[tok] > 0 else out[tok] * r
        count = output.count(tok)
        out[tok] -= params.frequency_penalty * count
        out[tok] -= params.presence_penalty * (1 if count else 0)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "penalties",
    [
        {"repetition_penalty": 1.8},
        {"repetition_penalty": 0.6},
        {"presence_penalty": 1.5},
        {"frequency_penalty": 0.7},
        {"presence_penalty": -0.5, "frequency_penalty": 0.4, "repetition_penalty": 1.3},
    ],
)
def test_penalties_distribution(device: str, penalties: dict[str, float]) -> None:
    prompt, output = [0, 6], [1, 1, 1, 6, 3]
    seq = make_seq(prompt, output, **penalties)
    expected = softmax(penalised(LOGITS, prompt, output, seq.sampling_params))
    assert expected != softmax(LOGITS)
    assert_close_dist(frequencies(Sampler(VOCAB, [EOS]), LOGITS, seq, device), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_penalties_apply_to_greedy_and_only_to_their_row(device: str) -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0, 0.0], [3.0, 2.9, 0.0, 0.0]], device=device)
    repeated = make_seq([0], [0], temperature=0.0, repetition_penalty=1.2, min_tokens=2)
    plain = make_seq([0], [0], temperature=0.0)
    before = logits.clone()
    out = Sampler(4, [EOS])(logits, [SampleRow(repeated), SampleRow(plain)])
    assert [r.token_ids for r in out] == [[1], [0]]  # 3.0 / 1.2 = 2.5 < 2.9
    assert torch.equal(logits, before)  # the caller's logits are left alone


@pytest.mark.parametrize("device", DEVICES)
def test_min_tokens_masks_eos_and_stop_token_ids(device: str) -> None:
    logits = torch.tensor([[0.0, 0.0, 3.0, 0.0, 0.0, 5.0, 1.0, 0.0]], device=device)  # EOS=5 best, then 2
    sampler = Sampler(VOCAB, [EOS])
    early = make_seq(output=[7], temperature=0.0, min_tokens=2, stop_token_ids=[2])
    assert sampler(logits, [SampleRow(early)])[0].token_ids == [6]
    early.append_token(6)  # two output tokens now: EOS allowed again
    assert sampler(logits, [SampleRow(early)])[0].token_ids == [EOS]
    ignoring = make_seq(output=[7], temperature=0.0, min_tokens=2, ignore_eos=True)
    assert sampler(logits, [SampleRow(ignoring)])[0].token_ids == [EOS]  # EOS does not stop it: no mask
    # Random sampling never picks a masked id either.
    seq = make_seq(temperature=1.0, min_tokens=3, stop_token_ids=[2])
    observed = frequencies(sampler, logits[0].tolist(), seq, device, n=5000)
    assert observed[EOS] == 0.0 and observed[2] == 0.0 and sum(observed) == pytest.approx(1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_log_softmax_of_raw_logits(device: str) -> None:
    torch.manual_seed(3)
    logits = torch.randn(4, 30, device=device) * 3
    seqs = [
        make_seq(temperature=0.0, logprobs=5, repetition_penalty=2.0),  # penalties do not change logprobs
        make_seq(temperature=1.0, logprobs=0),
        make_seq(temperature=0.7, top_k=3),
        make_seq(temperature=1.0, logprobs=2, seed=4),
    ]
    out = Sampler(30, [EOS])(logits, [SampleRow(s) for s in seqs])
    expected = torch.log_softmax(logits.double().cpu(), dim=-1)
    for row, (seq, result) in enumerate(zip(seqs, out, strict=True)):
        k = seq.sampling_params.logprobs
        if k is None:
            assert result.logprobs is None
            continue
        assert result.logprobs is not None and len(result.logprobs) == 1
        entry = result.logprobs[0]
        assert entry.token_id == result.token_ids[0]
        assert entry.logprob == pytest.approx(expected[row, entry.token_id].item(), abs=1e-5)
        best = expected[row].topk(k)
        assert [t for t, _ in entry.top] == best.indices.tolist()
        assert [v for _, v in entry.top] == pytest.approx(best.values.tolist(), abs=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_n_samples_per_row(device: str) -> None:
    torch.manual_seed(4)
    logits = torch.randn(3, 20, device=device)
    rows = [
        SampleRow(make_seq(temperature=1.0, n=4, logprobs=1), num_samples=4),
        SampleRow(make_seq(temperature=0.0, n=3), num_samples=3),
        SampleRow(make_seq(temperature=1.0)),
    ]
    out = Sampler(20, [EOS])(logits, rows)
    assert [len(r.token_ids) for r in out] == [4, 3, 1]
    assert out[1].token_ids == [int(logits[1].argmax())] * 3
    assert out[0].logprobs is not None and [e.token_id for e in out[0].logprobs] == out[0].token_ids
    lp = torch.log_softmax(logits[0].cpu(), -1)
    assert [e.logprob for e in out[0].logprobs] == pytest.approx(
        [lp[t].item() for t in out[0].token_ids], abs=1e-5
    )


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_sampling_is_independent_of_the_batch(device: str) -> None:
    vocab, steps = 64, 6
    gen = torch.Generator().manual_seed(5)
    step_logits = [torch.randn(vocab, generator=gen) for _ in range(steps)]

    def params(**extra: object) -> dict[str, object]:
        return {"temperature": 1.0, "top_p": 0.95, "seed": 1234, **extra}

    # Alone, one step at a time.
    alone_sampler = Sampler(vocab, [EOS])
    alone = make_seq(**params())
    lead_alone = make_seq(**params(n=3))
    alone_tokens, lead_tokens = [], []
    for t in range(steps):
        alone_tokens.append(
            alone_sampler(step_logits[t][None].to(device), [SampleRow(alone)])[0].token_ids[0]
        )
    lead_tokens = alone_sampler(step_logits[0][None].to(device), [SampleRow(lead_alone, 3)])[0].token_ids

    # The same requests inside a batch of 8 with other random rows, at a different row each step.
    batch_sampler = Sampler(vocab, [EOS])
    target = make_seq(**params())
    lead = make_seq(**params(n=3))
    others = [
        make_seq(temperature=1.0),
        make_seq(temperature=0.9, seed=99),
        make_seq(temperature=0.0),
        make_seq(temperature=1.2, top_k=5, seed=7),
        make_seq(temperature=1.0, repetition_penalty=1.1),
        make_seq(temperature=0.5, min_p=0.1),
        make_seq(temperature=1.0, seed=1234, n=2),  # same seed, other request: its own stream
    ]
    torch.manual_seed(6)
    batch_tokens = []
    for t in range(steps):
        position = (3 * t) % 8
        rows = [SampleRow(s) for s in others]
        rows.insert(position, SampleRow(target))
        logits = torch.randn(8, vocab)
        logits[position] = step_logits[t]
        out = batch_sampler(logits.to(device), rows)
        batch_tokens.append(out[position].token_ids[0])
        if t == 0:
            rows = [SampleRow(s) for s in others[:3]] + [SampleRow(lead, 3)]
            out = batch_sampler(torch.stack([torch.randn(vocab)] * 3 + [step_logits[0]]).to(device), rows)
            assert out[3].token_ids == lead_tokens
    assert batch_tokens == alone_tokens
    assert len(set(alone_tokens)) > 1  # really random, not argmax every time

    # A different choice index gives a different stream; forget() restarts it.
    other_index = Sequence("req", [1, 2, 3], SamplingParams(**params()), index=1)  # type: ignore[arg-type]
    sampler = Sampler(vocab, [EOS])
    tokens = [
        sampler(step_logits[t][None].to(device), [SampleRow(other_index)])[0].token_ids[0]
        for t in range(steps)
    ]
    assert tokens != alone_tokens
    sampler.forget(other_index.seq_id)
    again = [
        sampler(step_logits[t][None].to(device), [SampleRow(other_index)])[0].token_ids[0]
        for t in range(steps)
    ]
    assert again == tokens


@pytest.mark.parametrize("device", DEVICES)
def test_padded_vocab_columns_are_never_sampled(device: str) -> None:
    logits = torch.zeros(2, 12, device=device)
    logits[:, 10:] = 50.0  # padded lm head columns beyond vocab_size=10
    rows = [SampleRow(make_seq(temperature=0.0, logprobs=3)), SampleRow(make_seq(temperature=1.0), 50)]
    out = Sampler(10, [EOS])(logits, rows)
    assert out[0].token_ids[0] < 10 and all(t < 10 for t in out[1].token_ids)
    assert out[0].logprobs is not None and all(t < 10 for t, _ in out[0].logprobs[0].top)
    plain_greedy = Sampler(10, [EOS])(logits, [SampleRow(make_seq(temperature=0.0)) for _ in range(2)])
    assert all(r.token_ids[0] < 10 and r.logprobs is None for r in plain_greedy)
