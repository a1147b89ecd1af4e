"""Incremental detokenization and stop strings, with real tokenizers.

Two tokenizers: the default model's (SmolLM2: byte-level BPE, where emoji and CJK characters are
split over several tokens) and a small SentencePiece-style one built here with the `tokenizers`
library (Metaspace spaces, leading space stripped by the decoder, byte-fallback tokens).
"""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from appliance.engine.detokenizer import IncrementalDetokenizer
from appliance.engine.sequence import SamplingParams, Sequence
from appliance.models.fetch import ensure_default_model

TEXT = (
    "The capital of France is Paris. 日本の首都は東京です。 Emoji: 😀🎉👩‍💻 and flags 🇫🇷🇯🇵!\n"
    "Ünïcödé façade, naïve café — “quotes” and ‘more’. 中文测试：你好，世界！ 한국어 문장입니다.\n"
    "def f(x):\n    return x ** 2  # код на русском языке ✓ ∑ ≤ ∞\n"
    "Mixed: abc😀def世界ghi🎉🎉🎉 end. Numbers 1234567890 and symbols <>{}[]|\\~`.\n"
)


def build_sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer: '▁' for spaces, decoder strips the first leading space, bytes
    of characters outside the vocabulary become <0xNN> tokens."""
    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "Hello world, hello there!",
        "stop here STOP now",
    ]
    # Words split at spaces, which become '▁' glued to the next word (SentencePiece's pieces).
    pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizer
    trainer_tok.train_from_iterator(corpus * 20, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


@pytest.fixture(scope="module")
def smol() -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(ensure_default_model(progress=False))


@pytest.fixture(scope="module")
def sentencepiece() -> PreTrainedTokenizerFast:
    return build_sentencepiece_tokenizer()


@pytest.fixture(scope="module")
def detokenizers(
    smol: PreTrainedTokenizerFast, sentencepiece: PreTrainedTokenizerFast
) -> dict[str, IncrementalDetokenizer]:
    """SmolLM2 through both paths (byte-level fast path, general window decode), and the
    SentencePiece-style tokenizer (window decode only)."""
    made = {
        "smol-fast": IncrementalDetokenizer(smol),
        "smol-window": IncrementalDetokenizer(smol, byte_level_fast_path=False),
        "sentencepiece": IncrementalDetokenizer(sentencepiece),
    }
    assert [d.uses_byte_level_fast_path for d in made.values()] == [True, False, False]
    return made


@pytest.fixture(params=["smol-fast", "smol-window"])
def smol_detok(
    request: pytest.FixtureRequest, detokenizers: dict[str, IncrementalDetokenizer]
) -> IncrementalDetokenizer:
    return detokenizers[request.param]


@pytest.fixture
def sentencepiece_detok(detokenizers: dict[str, IncrementalDetokenizer]) -> IncrementalDetokenizer:
    return detokenizers["sentencepiece"]


@pytest.fixture(params=["smol-fast", "smol-window", "sentencepiece"])
def detok(
    request: pytest.FixtureRequest, detokenizers: dict[str, IncrementalDetokenizer]
) -> IncrementalDetokenizer:
    return detokenizers[request.param]


def stream(
    detok: IncrementalDetokenizer, prompt: list[int], output: list[int], **params: object
) -> tuple[Sequence, list[str], str | None, int | None]:
    """Feed `output` one token at a time. Returns the sequence (finalized when no stop matched), the
    emitted text after each update, the stop string and the number of tokens fed when it matched.
    Checks on the way that the emitted text only ever grows."""
    seq = Sequence("req", prompt, SamplingParams(**params))  # type: ignore[arg-type]
    emitted: list[str] = []
    for fed, tok in enumerate(output, start=1):
        seq.append_token(tok)
        before = seq.output_text
        stop = detok.update(seq)
        assert seq.output_text.startswith(before), (before, seq.output_text)
        emitted.append(seq.output_text)
        if stop is not None:
            return seq, emitted, stop, fed
    before = seq.output_text
    assert detok.finalize(seq) is None
    assert seq.output_text.startswith(before)
    return seq, emitted, None, None


def expected_text(
    tokenizer: PreTrainedTokenizerFast, prompt: list[int], output: list[int], skip: bool = True
) -> str:
    """What the output adds to the prompt's text: decode(prompt + output) minus decode(prompt)."""
    prompt_text = tokenizer.decode(prompt, skip_special_tokens=skip)
    full_text = tokenizer.decode(prompt + output, skip_special_tokens=skip)
    assert full_text.startswith(prompt_text)
    return full_text[len(prompt_text) :]


def char_boundary_splits(tokenizer: PreTrainedTokenizerFast, ids: list[int]) -> list[int]:
    """Token positions where the text so far ends on a whole character."""
    return [i for i in range(1, len(ids)) if not tokenizer.decode(ids[:i]).endswith("\ufffd")]


def test_text_equals_full_decode_for_real_text(detok: IncrementalDetokenizer) -> None:
    tokenizer = detok.tokenizer
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    # The tokenizer really splits characters: some tokens alone decode to an incomplete character.
    assert sum("\ufffd" in tokenizer.decode([t]) for t in ids) >= 10
    splits = char_boundary_splits(tokenizer, ids)
    rng = random.Random(0)
    for _ in range(25):
        start = rng.choice([0] + splits[: len(splits) // 2])
        cut = rng.choice([s for s in splits if s > start])
        # Ending inside a character is finalize()'s case (the byte-fallback decoder turns a whole
        # invalid byte run into U+FFFDs where we keep the characters completed before it).
        end = rng.choice([s for s in splits if s > cut] + [len(ids)])
        prompt, output = ids[start:cut], ids[cut:end]
        seq, emitted, stop, _ = stream(detok, prompt, output)
        want = expected_text(tokenizer, prompt, output)
        assert stop is None
        assert seq.output_text == want
        # Streaming never emits an incomplete character nor anything that is not final text.
        assert all(want.startswith(text) and not text.endswith("\ufffd") for text in emitted)


def test_sentencepiece_first_token_keeps_its_leading_space(
    sentencepiece_detok: IncrementalDetokenizer,
) -> None:
    sentencepiece = sentencepiece_detok.tokenizer
    prompt = sentencepiece.encode("The quick brown", add_special_tokens=False)
    output = sentencepiece.encode("The quick brown fox jumps", add_special_tokens=False)[len(prompt) :]
    assert (
        sentencepiece.decode(output[:1]) == "fox"[: len(sentencepiece.decode(output[:1]))]
    )  # stripped alone
    seq, emitted, _, _ = stream(sentencepiece_detok, prompt, output)
    assert seq.output_text == " fox jumps"
    assert emitted[0].startswith(" ")


def test_byte_level_output_equals_decode_of_output_ids(smol_detok: IncrementalDetokenizer) -> None:
    smol = smol_detok.tokenizer
    ids = smol.encode(TEXT, add_special_tokens=False)
    splits = char_boundary_splits(smol, ids)
    rng = random.Random(1)
    for _ in range(20):
        cut = rng.choice(splits)
        output = ids[cut : rng.randint(cut + 1, len(ids))]
        seq, _, _, _ = stream(smol_detok, ids[:cut], output)
        assert seq.output_text == smol.decode(output)


def test_random_token_ids(smol_detok: IncrementalDetokenizer) -> None:
    """Arbitrary ids (invalid UTF-8 and special tokens included) end up exactly as the full decode."""
    smol = smol_detok.tokenizer
    rng = random.Random(2)
    byte_tokens = [t for t in range(smol.vocab_size) if "\ufffd" in smol.decode([t])]
    for case in range(24):
        pool = [rng.randrange(smol.vocab_size) for _ in range(40)] + rng.sample(byte_tokens, 40)
        pool += smol.all_special_ids
        prompt = smol.encode("Say something:", add_special_tokens=False)
        output = [rng.choice(pool) for _ in range(rng.randint(1, 30))]
        skip = case % 2 == 0
        seq, emitted, _, _ = stream(smol_detok, prompt, output, skip_special_tokens=skip)
        want = expected_text(smol, prompt, output, skip=skip)
        assert seq.output_text == want
        assert all(want.startswith(text) for text in emitted)


def test_skip_special_tokens(smol_detok: IncrementalDetokenizer) -> None:
    smol = smol_detok.tokenizer
    prompt = smol.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    output = smol.encode("Hello 😀<|im_end|>\n<|im_start|>more", add_special_tokens=False)
    assert any(t in smol.all_special_ids for t in output)
    seq, _, _, _ = stream(smol_detok, prompt, output)
    assert seq.output_text == "Hello 😀\nmore"
    seq, _, _, _ = stream(smol_detok, prompt, output, skip_special_tokens=False)
    assert seq.output_text == "Hello 😀<|im_end|>\n<|im_start|>more"


def token_spans(tokenizer: PreTrainedTokenizerFast, prompt: list[int], output: list[int]) -> list[int]:
    """Character length of the expected text after each output token (on whole characters)."""
    return [
        len(expected_text(tokenizer, prompt, output[:i]).rstrip("\ufffd")) for i in range(1, len(output) + 1)
    ]


def test_stop_strings_spanning_token_boundaries(detok: IncrementalDetokenizer) -> None:
    tokenizer = detok.tokenizer
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    prompt, output = ids[:3], ids[3:]
    full = expected_text(tokenizer, prompt, output)
    ends = token_spans(tokenizer, prompt, output)
    rng = random.Random(3)
    checked = 0
    while checked < 30:
        start = rng.randrange(len(full) - 8)
        stop = full[start : start + rng.randint(2, 7)]
        # Only stops that start inside one token's text and end inside a later one.
        first = next(i for i, end in enumerate(ends) if end > start)
        last = next(i for i, end in enumerate(ends) if end >= start + len(stop))
        if first == last or "\ufffd" in stop:
            continue
        checked += 1
        index = full.find(stop)
        decoy = full[index + 1 : index + len(stop) + 3] + "\x00"  # never matches, overlaps the stop
        for include in (False, True):
            seq, emitted, matched, fed = stream(
                detok, prompt, output, stop=[decoy, stop], include_stop_str_in_output=include
            )
            assert matched == stop
            assert seq.output_text == (full[: index + len(stop)] if include else full[:index])
            # It matched at the token that completed the stop string's first occurrence.
            assert fed == 1 + next(i for i, end in enumerate(ends) if end >= index + len(stop))
            # A partial stop string never leaked while streaming.
            assert all(full[:index].startswith(text) for text in emitted[:-1])


def test_earliest_stop_string_wins(smol_detok: IncrementalDetokenizer) -> None:
    smol = smol_detok.tokenizer
    prompt = smol.encode("Count:", add_special_tokens=False)
    output = smol.encode(" one two three four", add_special_tokens=False)
    assert " three" in [smol.decode([t]) for t in output]  # both stops below complete on one token
    seq, _, matched, _ = stream(smol_detok, prompt, output, stop=["four", "ree", "thr"])
    assert (matched, seq.output_text) == ("thr", " one two ")


def test_held_back_prefix_is_released_when_it_diverges_and_flushed_at_finish(
    detok: IncrementalDetokenizer,
) -> None:
    tokenizer = detok.tokenizer
    prompt = tokenizer.encode("Say:", add_special_tokens=False)
    output = tokenizer.encode(" Hello world, hello there! Hel", add_special_tokens=False)
    full = expected_text(tokenizer, prompt, output)
    seq = Sequence("req", prompt, SamplingParams(stop=["Hello friend", "hello theX"]))
    seen = []
    for tok in output:
        seq.append_token(tok)
        assert detok.update(seq) is None
        seen.append(seq.output_text)
        assert not any(seq.output_text.endswith(p) for p in ("Hello", "Hello ", "hello the", "Hel"))
    assert any("Hello world" in text for text in seen)  # released once it diverged
    assert seq.output_text == full[: -len("Hel")]  # the tail could still become "Hello friend"
    assert detok.finalize(seq) is None
    assert seq.output_text == full


def test_finalize_flushes_an_incomplete_character(smol_detok: IncrementalDetokenizer) -> None:
    smol, detok = smol_detok.tokenizer, smol_detok
    prompt = smol.encode("Emoji:", add_special_tokens=False)
    output = smol.encode(" ok 😀", add_special_tokens=False)
    while not smol.decode(output).endswith("\ufffd"):
        output = output[:-1]  # cut inside the emoji's bytes
    seq = Sequence("req", prompt, SamplingParams())
    for tok in output:
        seq.append_token(tok)
        detok.update(seq)
    assert seq.output_text in (" ok", " ok ")  # the incomplete emoji (and its token) waits
    detok.finalize(seq)
    assert seq.output_text == smol.decode(output) and seq.output_text.endswith("\ufffd")


def test_min_tokens_defers_stop_strings(smol_detok: IncrementalDetokenizer) -> None:
    smol = smol_detok.tokenizer
    prompt = smol.encode("List:", add_special_tokens=False)
    output = smol.encode(" a, b, c, d, e", add_special_tokens=False)
    seq, _, matched, fed = stream(smol_detok, prompt, output, stop=[","])
    assert (matched, seq.output_text) == (",", " a")
    assert fed is not None
    seq, _, matched, _ = stream(smol_detok, prompt, output, stop=[","], min_tokens=fed + 1)
    assert matched == "," and seq.output_text.startswith(" a, b")


def test_forked_sequences_do_not_share_state(smol_detok: IncrementalDetokenizer) -> None:
    smol, detok = smol_detok.tokenizer, smol_detok
    prompt = smol.encode("Pick:", add_special_tokens=False)
    lead = Sequence("req", prompt, SamplingParams(n=2))
    first = smol.encode(" 😀", add_special_tokens=False)
    for tok in first[:-1]:  # mid-emoji: the state holds undecoded tokens
        lead.append_token(tok)
        detok.update(lead)
    fork = Sequence("req", prompt, SamplingParams(n=2), index=1)
    fork.token_ids = list(lead.token_ids)
    fork.detok_state, fork.output_text = lead.detok_state, lead.output_text
    lead.append_token(first[-1])
    detok.update(lead)
    for tok in smol.encode(" cat", add_special_tokens=False):
        fork.append_token(tok)
        detok.update(fork)
    detok.finalize(fork)
    assert lead.output_text == " 😀"
    assert fork.output_text == smol.decode(fork.token_ids[len(prompt) :])


def test_finalize_can_leave_out_a_stop_tokens_text(detok: IncrementalDetokenizer) -> None:
    tokenizer = detok.tokenizer
    prompt = tokenizer.encode("Say:", add_special_tokens=False)
    body = tokenizer.encode(" Hello 😀 world", add_special_tokens=False)
    stop_token = tokenizer.encode("!", add_special_tokens=False)[-1]
    seq = Sequence("req", prompt, SamplingParams(stop_token_ids=[stop_token]))
    for tok in body:
        seq.append_token(tok)
        detok.update(seq)
    seq.append_token(stop_token)  # the engine sees a stop token id: its text is left out
    detok.finalize(seq, drop_last_token=True)
    assert seq.output_text == expected_text(tokenizer, prompt, body)
    assert "!" not in seq.output_text
