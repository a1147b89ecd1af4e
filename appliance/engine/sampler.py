"""Turns one step's logits into tokens: penalties, greedy or random sampling, logprobs.

Works on CPU and CUDA tensors alike. Every per-row operation is a batched tensor operation; the
only device-to-host transfer is the final packed result (sampled ids, their logprobs and the
top alternatives travel together in one tensor). `sample_async` only starts that transfer (into
pinned memory, with an event) and hands back the sampled ids still on the device, so the engine
can launch the next step from them before the host has seen them (async scheduling).

Order (vLLM/OpenAI semantics): repetition penalty (prompt + output tokens), presence and
frequency penalties (output tokens), min_tokens (EOS and stop token ids masked), then greedy
(argmax) or temperature, top-k, top-p, min-p and a draw. Logprobs come from the raw model logits.
Before all of these, two per-row logits hooks ([apps]): `logit_bias` is added, and rows with a
grammar keep only the tokens their matcher allows (`grammar.bitmask(rows)`: a host bitmask filled
for this step, uploaded once and applied on the device; see appliance/structured/grammar.py).

NOTE: a seeded request is reproducible whatever the batch it lands in: its noise comes from its
own `torch.Generator`, seeded from (seed, choice index) and kept across steps under its seq_id
until `forget`. Sampling is an exponential race (argmax of probs / Exp(1) noise), which draws a
fixed-size noise vector per sample, so the generator's stream never depends on the batch.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import torch

from appliance.engine.sequence import Sequence, TokenLogprob

# Temperatures below this are treated as greedy: dividing by them overflows fp32 logits.
_GREEDY_TEMPERATURE = 1e-5
_MASK_64 = (1 << 64) - 1


# NOTE: rows and results are msgspec structs with gc=False (made for every row of every step;
# as tracked objects they drove the cyclic GC). Nothing refers back to them: no cycles.
class SampleRow(msgspec.Struct, gc=False):
    """One row of logits to sample from."""

    seq: Sequence
    num_samples: int = 1  # > 1 only for the first token of an n > 1 request (the lead forks the rest)


class SampleResult(msgspec.Struct, gc=False):
    token_ids: list[int]  # num_samples tokens
    logprobs: list[TokenLogprob] | None  # one per token, when params.logprobs is not None


@dataclass
class PendingSamples:
    """One step's samples on their way to the host.

    `token_ids` (int32 or int64 [draws], on the logits' device) can feed the next step before the host
    has them; row i's first draw is `token_ids[first_draw[i]]`. `results()` waits for the copy.
    """

    token_ids: torch.Tensor
    first_draw: list[int]
    _host: torch.Tensor
    _event: torch.cuda.Event | None
    _unpack: Callable[[list], list[SampleResult]]

    def results(self) -> list[SampleResult]:
        if self._event is not None:
            self._event.synchronize()
        return self._unpack(self._host.tolist())


def _start_download(t: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Device -> host without waiting: into pinned memory, then an event marks the copy done."""
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event
    return t.cpu(), None


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax; on CUDA the Triton kernel, straight from the model-dtype logits (int32)."""
    if logits.is_cuda:
        from appliance_kernels import sampling

        return sampling.argmax(logits)
    return logits.argmax(dim=-1)


def _greedy_results(values: list[int]) -> list[SampleResult]:
    """One result per row of plain greedy sampling (the struct type called from C, per row)."""
    return list(map(SampleResult, [[token] for token in values], itertools.repeat(None)))


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device without a host sync: from pinned memory, asynchronously on CUDA."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _tensor(values: list[int] | list[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _to_device(torch.tensor(values, dtype=dtype), device)


def _generator_seed(seed: int, index: int) -> int:
    """Mix (seed, choice index) so each of a request's n choices gets its own stream."""
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) & _MASK_64


class Sampler:
    """Samples one or more tokens per row of logits. Not thread-safe (one engine thread)."""

    def __init__(self, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self._generators: dict[int, torch.Generator] = {}
        self._token_arrays: dict[int, array] = {}  # seq_id -> token ids, for the penalties
        # The engine's StructuredOutputs (or None): bitmask(rows) before sampling, forget(seq_id).
        self.grammar: Any = None

    def forget(self, seq_id: int) -> None:
        """Drop per-sequence state (seeded generator, cached token ids) when a sequence finishes."""
        self._generators.pop(seq_id, None)
        self._token_arrays.pop(seq_id, None)
        if self.grammar is not None:
            self.grammar.forget(seq_id)

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> list[SampleResult]:
        return self.sample_async(logits, rows).results()

    @torch.inference_mode()
    def sample_async(self, logits: torch.Tensor, rows: list[SampleRow]) -> PendingSamples:
        """Enqueue the sampling of `rows`; nothing here waits for the device."""
        # logits: [N, V'] with V' >= vocab_size (the lm head may be padded)
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (tuple(logits.shape), len(rows))
        device = logits.device
        if not rows:
            empty = torch.empty(0, dtype=torch.long, device=device)
            return PendingSamples(empty, [], empty.cpu(), None, lambda values: [])
        # Padded lm-head columns (beyond vocab_size) are never tokens: a view drops them.
        logits = logits[:, : self.vocab_size]  # [N, V], the model's dtype

        # NOTE: one pass over the rows (this runs every step for the whole batch) finds out which
        # of the per-row features any row uses; those it does not are skipped.
        # Rows that share a SamplingParams object (LLM.generate's, a request's n choices) are
        # looked at once: only min_tokens and the sample count depend on the row.
        any_penalty = any_min_tokens = any_special = any_bias = any_grammar = False
        last = None
        for row in rows:
            seq = row.seq
            p = seq.sampling_params
            if row.num_samples > 1:
                any_special = True
            if p.min_tokens and seq.num_output_tokens < p.min_tokens:
                any_min_tokens = True
            if p is last:
                continue
            last = p
            if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
                any_penalty = True
            if p.temperature >= _GREEDY_TEMPERATURE or p.logprobs is not None:
                any_special = True
            if p.logit_bias:
                any_bias = True
            if p.structured is not None:
                any_grammar = True
        # [apps] logit_bias and grammar masks: `masked` feeds the sampling, `logits` the logprobs.
        masked = self._apply_logit_bias(logits, rows) if any_bias else logits
        masks = self.grammar.bitmask(rows) if any_grammar and self.grammar is not None else None
        if masks is not None:
            from appliance.structured.grammar import apply_token_bitmask

            mask_rows, bitmask = masks
            masked = apply_token_bitmask(masked, _tensor(mask_rows, torch.long, device), _to_device(bitmask, device))
        if not (any_penalty or any_min_tokens or any_special):
            # The common serving case, plain greedy decoding: one argmax, one transfer.
            tokens = _greedy(masked)
            host, event = _start_download(tokens)
            return PendingSamples(tokens, list(range(len(rows))), host, event, _greedy_results)
        params = [row.seq.sampling_params for row in rows]
        raw = logits.float()

        x = raw if masked is logits else masked.float()
        x = self._apply_penalties(x, rows) if any_penalty else x
        x = self._apply_min_tokens(x, rows) if any_min_tokens else x

        # Expand rows to one row per sample (n > 1 leads draw several tokens from one row).
        counts = [max(1, row.num_samples) for row in rows]
        num_draws = sum(counts)
        row_of_draw = list(itertools.chain.from_iterable([i] * c for i, c in enumerate(counts)))
        if num_draws != len(rows):
            x = x.index_select(0, _tensor(row_of_draw, torch.long, device))

        greedy = [params[r].temperature < _GREEDY_TEMPERATURE for r in row_of_draw]
        sampled = x.argmax(dim=-1)  # [M]: right for greedy draws, replaced for random ones
        random_draws = [d for d, g in enumerate(greedy) if not g]
        if random_draws:
            sampled = self._sample_random(x, sampled, random_draws, row_of_draw, rows)

        return self._gather_results(raw, sampled, rows, counts, row_of_draw)

    # -- logits processing ----------------------------------------------------------------------

    def _apply_penalties(self, x: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        pen_rows = [
            i
            for i, row in enumerate(rows)
            if row.seq.sampling_params.repetition_penalty != 1.0
            or row.seq.sampling_params.presence_penalty != 0.0
            or row.seq.sampling_params.frequency_penalty != 0.0
        ]
        if not pen_rows:
            return x
        device, width = x.device, x.shape[1]
        seqs = [rows[i].seq for i in pen_rows]
        lengths = [len(s.token_ids) for s in seqs]
        max_len = max(max(lengths), 1)
        # Padded [R, L] token ids built on the host; the pad id `width` lands in an extra column
        # that is dropped. The ids come from per-sequence arrays that grow by the new tokens only.
        flat_ids = array("q")
        for seq in seqs:
            flat_ids.extend(self._token_array(seq))
        positions = torch.arange(max_len)
        filled = positions[None, :] < torch.tensor(lengths)[:, None]
        ids = torch.full((len(seqs), max_len), width, dtype=torch.long)
        if flat_ids:
            ids[filled] = torch.frombuffer(flat_ids, dtype=torch.long)
        is_output = positions[None, :] >= torch.tensor([s.num_prompt_tokens for s in seqs])[:, None]
        out_ids = torch.where(is_output, ids, width)
        ids, out_ids = _to_device(ids, device), _to_device(out_ids, device)

        seen = torch.zeros(len(seqs), width + 1, dtype=torch.bool, device=device)
        seen.scatter_(1, ids, True)
        out_counts = torch.zeros(len(seqs), width + 1, dtype=x.dtype, device=device)
        out_counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=x.dtype))
        seen, out_counts = seen[:, :width], out_counts[:, :width]

        def per_row(name: str) -> torch.Tensor:
            return _tensor([getattr(s.sampling_params, name) for s in seqs], x.dtype, device)[:, None]

        index = _tensor(pen_rows, torch.long, device)
        xr = x.index_select(0, index)
        rep = per_row("repetition_penalty")
        xr = torch.where(seen, torch.where(xr > 0, xr / rep, xr * rep), xr)
        xr = xr - per_row("frequency_penalty") * out_counts
        xr = xr - per_row("presence_penalty") * (out_counts > 0).to(x.dtype)
        return x.index_copy(0, index, xr)

    def _apply_logit_bias(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """OpenAI's logit_bias: the row's bias added to the listed token ids (a new tensor)."""
        row_idx: list[int] = []
        col_idx: list[int] = []
        values: list[float] = []
        for i, row in enumerate(rows):
            bias = row.seq.sampling_params.logit_bias
            if bias:
                for token_id, value in bias.items():
                    row_idx.append(i)
                    col_idx.append(token_id)
                    values.append(value)
        if not row_idx:
            return logits
        device = logits.device
        return logits.index_put((_tensor(row_idx, torch.long, device), _tensor(col_idx, torch.long, device)),
                                _tensor(values, logits.dtype, device), accumulate=True)

    def _token_array(self, seq: Sequence) -> array:
        """seq.token_ids as a cached int64 array, extended by the tokens appended since last time."""
        cached = self._token_arrays.get(seq.seq_id)
        num_tokens = len(seq.token_ids)
        if cached is None or len(cached) > num_tokens:
            cached = self._token_arrays[seq.seq_id] = array("q", seq.token_ids)
        elif len(cached) < num_tokens:
            cached.extend(seq.token_ids[len(cached) :])
        return cached

    def _apply_min_tokens(self, x: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        row_idx: list[int] = []
        col_idx: list[int] = []
        for i, row in enumerate(rows):
            p = row.seq.sampling_params
            if row.seq.num_output_tokens >= p.min_tokens:
                continue
            banned = set(p.stop_token_ids)
            if not p.ignore_eos:
                banned.update(self.eos_token_ids)
            for tok in banned:
                if 0 <= tok < x.shape[1]:
                    row_idx.append(i)
                    col_idx.append(tok)
        if not row_idx:
            return x
        x = x.clone()
        x[_tensor(row_idx, torch.long, x.device), _tensor(col_idx, torch.long, x.device)] = float("-inf")
        return x

    # -- sampling -------------------------------------------------------------------------------

    def _sample_random(
        self,
        x: torch.Tensor,
        sampled: torch.Tensor,
        random_draws: list[int],
        row_of_draw: list[int],
        rows: list[SampleRow],
    ) -> torch.Tensor:
        device, width = x.device, x.shape[1]
        all_random = len(random_draws) == x.shape[0]
        draw_index = None if all_random else _tensor(random_draws, torch.long, device)
        xs = x if draw_index is None else x.index_select(0, draw_index)  # [R, V]
        ps = [rows[row_of_draw[d]].seq.sampling_params for d in random_draws]

        def per_draw(values: list[float] | list[int], dtype: torch.dtype) -> torch.Tensor:
            return _tensor(values, dtype, device)

        xs = xs / per_draw([p.temperature for p in ps], xs.dtype)[:, None]

        top_k = [p.top_k if 0 < p.top_k < width else width for p in ps]
        need_k = any(k < width for k in top_k)
        need_p = any(p.top_p < 1.0 for p in ps)
        if need_k or need_p:
            sorted_x, order = xs.sort(dim=-1, descending=True)
            if need_k:
                rank = torch.arange(width, device=device)
                sorted_x = sorted_x.masked_fill(
                    rank[None, :] >= per_draw(top_k, torch.long)[:, None], float("-inf")
                )
            if need_p:
                top_p = per_draw([p.top_p for p in ps], xs.dtype)
                probs = sorted_x.softmax(dim=-1)
                mass_before = probs.cumsum(dim=-1) - probs
                # Keep the smallest prefix whose mass reaches top_p; rows with top_p == 1 keep all
                # (rounding in the cumsum must not cut their tail).
                remove = (mass_before >= top_p[:, None]) & (top_p < 1.0)[:, None]
                remove[:, 0] = False
                sorted_x = sorted_x.masked_fill(remove, float("-inf"))
            xs = torch.empty_like(xs).scatter_(-1, order, sorted_x)

        if any(p.min_p > 0.0 for p in ps):
            probs = xs.softmax(dim=-1)
            threshold = probs.amax(dim=-1, keepdim=True) * per_draw([p.min_p for p in ps], xs.dtype)[:, None]
            xs = xs.masked_fill(probs < threshold, float("-inf"))

        probs = xs.softmax(dim=-1)
        noise = self._noise(random_draws, row_of_draw, rows, width, device)
        # Exponential race: argmax(p / E) with E ~ Exp(1) picks token i with probability p_i.
        tokens = probs.div_(noise.clamp_min_(torch.finfo(probs.dtype).tiny)).argmax(dim=-1)
        if draw_index is None:
            return tokens
        return sampled.index_copy(0, draw_index, tokens)

    def _noise(
        self,
        random_draws: list[int],
        row_of_draw: list[int],
        rows: list[SampleRow],
        width: int,
        device: torch.device,
    ) -> torch.Tensor:
        """Exp(1) noise [R, V]: seeded rows from their own generator, the rest from one batched draw."""
        noise = torch.empty(len(random_draws), width, device=device)
        seeded: dict[int, list[int]] = {}  # row -> positions of its draws in `random_draws`
        for pos, d in enumerate(random_draws):
            if rows[row_of_draw[d]].seq.sampling_params.seed is not None:
                seeded.setdefault(row_of_draw[d], []).append(pos)
        if sum(len(v) for v in seeded.values()) < len(random_draws):
            noise.exponential_()  # unseeded draws share one batched draw from the global RNG
        for r, positions in seeded.items():
            seq = rows[r].seq
            gen = self._generator(seq, device)
            # A row's draws are consecutive (rows expand in order), so one [k, V] draw serves them.
            draw = torch.empty(len(positions), width, device=device).exponential_(generator=gen)
            noise[positions[0] : positions[-1] + 1] = draw
        return noise

    def _generator(self, seq: Sequence, device: torch.device) -> torch.Generator:
        gen = self._generators.get(seq.seq_id)
        if gen is None or gen.device != device:
            gen = torch.Generator(device=device)
            assert seq.sampling_params.seed is not None
            gen.manual_seed(_generator_seed(seq.sampling_params.seed, seq.index))
            self._generators[seq.seq_id] = gen
        return gen

    # -- results --------------------------------------------------------------------------------

    def _gather_results(
        self,
        raw: torch.Tensor,
        sampled: torch.Tensor,
        rows: list[SampleRow],
        counts: list[int],
        row_of_draw: list[int],
    ) -> PendingSamples:
        device = raw.device
        lp_rows = [i for i, row in enumerate(rows) if row.seq.sampling_params.logprobs is not None]
        parts = [sampled.to(torch.float64)]  # ids < 2**53 are exact in float64
        num_alts = 0
        if lp_rows:
            lp_draws = [
                d for d, r in enumerate(row_of_draw) if rows[r].seq.sampling_params.logprobs is not None
            ]
            local = {r: j for j, r in enumerate(lp_rows)}
            # log_softmax = logits - logsumexp, taken only where needed (no [N, V] result).
            lp_logits = raw.index_select(0, _tensor(lp_rows, torch.long, device))
            log_norm = torch.logsumexp(lp_logits, dim=-1)  # [R]
            draw_rows = _tensor([local[row_of_draw[d]] for d in lp_draws], torch.long, device)
            draw_ids = sampled.index_select(0, _tensor(lp_draws, torch.long, device))
            parts.append((lp_logits[draw_rows, draw_ids] - log_norm[draw_rows]).to(torch.float64))
            num_alts = max(rows[r].seq.sampling_params.logprobs or 0 for r in lp_rows)
            if num_alts:
                top_vals, top_ids = lp_logits.topk(num_alts, dim=-1)
                top_vals = top_vals - log_norm[:, None]
                parts += [top_ids.flatten().to(torch.float64), top_vals.flatten().to(torch.float64)]
        # NOTE: the one device-to-host transfer of the step's sampling.
        host, event = _start_download(torch.cat(parts))
        first_draw = list(itertools.accumulate(counts, initial=0))[:-1]

        def unpack(packed: list) -> list[SampleResult]:
            return self._unpack(packed, rows, counts, row_of_draw, lp_rows, num_alts)

        return PendingSamples(sampled, first_draw, host, event, unpack)

    @staticmethod
    def _unpack(packed: list, rows: list[SampleRow], counts: list[int], row_of_draw: list[int],
                lp_rows: list[int], num_alts: int) -> list[SampleResult]:
        num_draws = len(row_of_draw)
        token_ids = [int(t) for t in packed[:num_draws]]
        results: list[SampleResult] = []
        draw = 0
        lp_pos = num_draws
        alt_ids_pos = num_draws + sum(counts[r] for r in lp_rows)
        alt_vals_pos = alt_ids_pos + len(lp_rows) * num_alts
        lp_row_number = 0
        for i, row in enumerate(rows):
            tokens = token_ids[draw : draw + counts[i]]
            draw += counts[i]
            k = row.seq.sampling_params.logprobs
            if k is None:
                results.append(SampleResult(tokens, None))
                continue
            base = lp_row_number * num_alts
            top = [(int(packed[alt_ids_pos + base + j]), packed[alt_vals_pos + base + j]) for j in range(k)]
            entries = [TokenLogprob(tok, packed[lp_pos + j], list(top)) for j, tok in enumerate(tokens)]
            lp_pos += counts[i]
            lp_row_number += 1
            results.append(SampleResult(tokens, entries))
        return results
