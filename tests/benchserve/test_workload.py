"""Workloads: random prompts of exact token counts (the default model's tokenizer), shared prefixes,
conversation files, and a client process that never loads torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.benchserve import workload
from appliance.benchserve.workload import LengthRange, WorkloadSpec
from appliance.models.fetch import default_model_dir


@pytest.fixture(scope="module")
def tok() -> workload.Tokenizer:
    return workload.load_tokenizer(str(default_model_dir()))


def test_random_prompts_have_exact_token_counts(tok: workload.Tokenizer) -> None:
    spec = WorkloadSpec("random", 40, LengthRange.parse("20:90", "in"), LengthRange.parse("3:7", "out"), seed=5)
    requests = workload.build(spec, tok)
    assert len(requests) == 40 and [r.index for r in requests] == list(range(40))
    for r in requests:
        # What the server will count: the text encoded with its special tokens.
        assert len(tok.encode(r.prompt, add_special_tokens=True)) == r.prompt_len
        assert 20 <= r.prompt_len <= 90 and 3 <= r.max_tokens <= 7
    assert len({r.prompt_len for r in requests}) > 10  # a range, not one length
    assert workload.build(spec, tok) == requests  # seeded
    other = workload.build(WorkloadSpec(**{**spec.__dict__, "seed": 6}), tok)
    assert [r.prompt for r in other] != [r.prompt for r in requests]


def _blocks(tok: workload.Tokenizer, r: workload.BenchRequest, size: int = 16) -> list[tuple[int, ...]]:
    """The prompt's leading full blocks, each with everything before it (a prefix cache's keys)."""
    ids = tok.encode(r.prompt or "", add_special_tokens=True)
    return [tuple(ids[: size * (i + 1)]) for i in range(len(ids) // size)]


def test_no_run_warms_the_prefix_cache_for_another(tok: workload.Tokenizer) -> None:
    """Prompts of one seed at two lengths, two sweep points, or the warm-up share no 16-token
    block with each other (they used to: seed 0's 256-token prompts began as its 512-token ones,
    and a cross-check run at 256 found half its prompt in the server's cache); the same spec still
    draws the same prompts."""
    def spec(n_in: int, stream: str = "point 0", seed: int = 0) -> WorkloadSpec:
        return WorkloadSpec("random", 8, LengthRange(n_in, n_in), LengthRange(8, 8), seed=seed, stream=stream)

    long = workload.build(spec(96), tok)
    cached = {b for r in long for b in _blocks(tok, r)}
    for other in (spec(48), spec(96, "point 1"), spec(96, "warmup"), spec(96, seed=1)):
        requests = workload.build(other, tok)
        assert not cached & {b for r in requests for b in _blocks(tok, r)}, other
    assert workload.build(spec(96), tok) == long
    assert _blocks(tok, long[0])[0] in cached  # the check sees a shared block when there is one


def test_shared_prefix(tok: workload.Tokenizer) -> None:
    spec = WorkloadSpec("shared-prefix", 6, LengthRange(16, 16), LengthRange(4, 4), prefix_len=200, seed=1)
    requests = workload.build(spec, tok)
    prefix = requests[0].prefix
    assert len(tok.encode(prefix, add_special_tokens=False)) == 200
    assert all(r.prefix == prefix for r in requests) and len({r.body for r in requests}) == 6
    for r in requests:
        assert len(tok.encode(r.prompt, add_special_tokens=True)) == r.prompt_len == 216
        assert r.chat_messages() == [{"role": "system", "content": prefix}, {"role": "user", "content": r.body}]


def test_conversation_files(tok: workload.Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    lines = [
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9},
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why?"}],
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "one two three"}]},
        {"messages": [{"role": "assistant", "content": "nothing to answer"}]},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    spec = WorkloadSpec("chat", 10, LengthRange(1, 1), None, chat_path=path)
    with pytest.raises(ValueError, match=r"c.jsonl:2: no max_tokens"):
        workload.build(spec, tok)
    requests = workload.build(WorkloadSpec(**{**spec.__dict__, "output_len": LengthRange(5, 5)}), tok)
    assert [r.max_tokens for r in requests] == [5, 5, 5]
    assert requests[2].chat_messages() == [{"role": "user", "content": "a"}]  # the answer turn dropped
    assert requests[0].prompt is None
    # Without --output-len: the file's max_tokens, else the dropped answer's length in tokens.
    path.write_text("\n".join(json.dumps(x) for x in (lines[0], lines[2])) + "\n")
    requests = workload.build(spec, tok)
    assert [r.max_tokens for r in requests] == [9, len(tok.encode("one two three", add_special_tokens=False))]
    path.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="expected"):
        workload.build(spec, tok)


def test_lengths_parse() -> None:
    assert LengthRange.parse("512", "x") == LengthRange(512, 512)
    assert LengthRange.parse("8:16", "x") == LengthRange(8, 16)
    for bad in ("0", "9:8", "a", "1:b"):
        with pytest.raises(ValueError):
            LengthRange.parse(bad, "--input-len")


def test_the_client_never_loads_torch() -> None:
    """Building prompts and the whole CLI path of `bench serve` leave torch (and the engine) unloaded."""
    code = (
        "import sys\n"
        "from appliance.cli import build_parser\n"
        "from appliance.benchserve import command, workload, plots\n"
        "from appliance.benchserve.workload import WorkloadSpec, LengthRange\n"
        f"tok = workload.load_tokenizer({str(default_model_dir())!r})\n"
        "workload.build(WorkloadSpec('random', 2, LengthRange(30, 30), LengthRange(2, 2)), tok)\n"
        "bad = [m for m in ('torch', 'triton', 'transformers', 'appliance.engine', 'appliance.server')"
        " if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


class _OneByOne:
    """The tokenizer without its batch methods (as a transformers tokenizer would come)."""

    def __init__(self, tok: workload.Tokenizer) -> None:
        self._tok = tok
        self.vocab_size, self.all_special_ids = tok.vocab_size, tok.all_special_ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], **kwargs: object) -> str:
        return self._tok.decode(ids, **kwargs)


def test_batch_encoding_draws_the_same_prompts(tok: workload.Tokenizer) -> None:
    spec = WorkloadSpec("random", 12, LengthRange(24, 80), LengthRange(4, 4), seed=3)
    assert hasattr(tok, "encode_batch")
    assert workload.build(spec, _OneByOne(tok)) == workload.build(spec, tok)


def test_a_tokenizer_name_out_of_reach_fails_without_trying_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a local dir, not in the Hugging Face cache, the hub marked offline: the error names the
    flag to pass, and no download is attempted (an offline box used to sit in the hub's retries)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tried: list[str] = []
    import transformers

    real = transformers.AutoTokenizer.from_pretrained

    def recording(name, *args, **kwargs):  # noqa: ANN001, ANN202 - the real loader, recorded
        tried.append("local" if kwargs.get("local_files_only") else "hub")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recording)
    with pytest.raises(ValueError, match=r"no-such-org/no-such-tokenizer.*pass --tokenizer DIR"):
        workload.load_tokenizer("no-such-org/no-such-tokenizer")
    assert tried == ["local"]
