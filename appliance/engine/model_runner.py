"""Runs the model over the paged KV cache for one scheduled step, then samples.

CPU: eager forward with the torch reference attention. CUDA: KV cache sized from
`gpu_memory_utilization` after a profiled peak, decode steps replayed from CUDA graphs captured
for a ladder of batch sizes (padded), a step that prefills one sequence alone replayed from a graph
captured for a ladder of token counts (padded), other prefill and mixed steps eager. `launch` enqueues a step and
returns at once; the only host<->device synchronisation is `StepHandle.results()` reading back
the sampled token ids. A decode row whose input token was sampled by the previous, still running
step (a `PLACEHOLDER_TOKEN_ID` on the host) takes it from that step's device tensor.
Decode steps whose rows share a long prefix of KV blocks (SchedulerOutput.common_prefix_blocks)
attend it once for all of them (cascade attention): eager, or from a second family of decode
graphs that reads the prefix from a static buffer filled by the step's one upload.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from appliance.config import EngineConfig
from appliance.engine.outputs import TokenLogprob
from appliance.engine.piecewise import PiecewiseForward, Recorder, attention_modules, cutting, piecewise_sizes
from appliance.engine.sampler import PendingSamples, Sampler, SampleResult, SampleRow
from appliance.engine.scheduler import SchedulerOutput
from appliance.engine.sequence import PLACEHOLDER_TOKEN_ID, Sequence
from appliance.layers.attention import AttentionMetadata, short_decode_bound

log = logging.getLogger(__name__)

_ALIGN = 16  # int32 elements: 64 bytes (see ModelRunner._upload)
_PROMPT_LOGPROB_ROWS = 256  # [apps] prompt positions per logits slice ([rows, V] fp32 at a time)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Cascade attention (engine.cascade_attention = "auto"): a decode step attends its shared prefix
# once for all rows that share it when the prefix has at least this many tokens (vLLM's bound
# too) and at least `ModelRunner.cascade_min_seqs` rows share it: CASCADE_MIN_SEQS, and on a GPU
# enough rows that their per-sequence suffix programs (one per sequence and kv head, no split-KV)
# fill every SM once.
CASCADE_MIN_PREFIX_TOKENS = 256
CASCADE_MIN_SEQS = 8


def resolve_device_dtype(config: EngineConfig) -> tuple[torch.device, torch.dtype]:
    want = config.model.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(want)
    if config.model.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif config.model.dtype in _DTYPES:
        dtype = _DTYPES[config.model.dtype]
    else:
        from appliance.errors import ConfigError

        raise ConfigError(f"model.dtype must be one of auto, {', '.join(_DTYPES)}; got {config.model.dtype!r}")
    return device, dtype


@dataclass
class _Batch:
    input_ids: torch.Tensor  # int32 [T]
    positions: torch.Tensor  # int32 [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # int32 [S]: rows of the hidden states to sample from


@dataclass
class _CascadePlan:
    """A decode step's shared prefix (SchedulerOutput.common_prefix_blocks) and each row's share."""

    blocks: list[int]  # the prefix's block ids
    tokens: int  # len(blocks) * block_size
    shares: list[int]  # per row (the step's order): tokens, or 0 (a row holding its own blocks)


@dataclass
class _HostBatch:
    """One step flattened on the host (plain lists), before the upload."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    q_lens: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    tables: np.ndarray | list[int] = field(default_factory=list)  # [B, width] row-major, zero-padded
    width: int = 0
    num_decodes: int = 0  # leading one-token rows
    logits_rows: list[int] = field(default_factory=list)
    rows: list[SampleRow] = field(default_factory=list)
    gather_dst: list[int] = field(default_factory=list)  # positions in ids fed by the step in flight
    gather_seqs: list[int] = field(default_factory=list)  # their seq ids
    # [apps] prefill chunks whose prompt logprobs are wanted: (seq, offset in ids, first position, length)
    prompt_lp: list[tuple[Sequence, int, int, int]] = field(default_factory=list)


class _TableRows:
    """The step's block tables as rows of one persistent host matrix, rewritten only where needed.

    A decode step of 512 sequences with ~50 blocks each used to flatten every table into a Python
    list and convert it (~25k ints: ~1 ms of host time per step on the 2-core CPU box, 1/5 of the
    step's host work), though between two decode steps of the same batch only the ~1/16 of the
    tables that crossed a block boundary change. A row is rewritten when another sequence holds it,
    or when its sequence's `table_version` moved (the block manager bumps it on every change:
    allocate, grow, copy-on-write, fork, sliding-window release, free). Past each row's table the
    matrix holds zeros, so `take` gives exactly the zero-padded [rows, width] tables."""

    def __init__(self, max_blocks: int, rows: int = 64) -> None:
        self.matrix = np.zeros((rows, max(1, max_blocks)), dtype=np.int32)
        self.seq_ids = [-1] * rows
        self.versions = [-1] * rows
        self.lengths = [0] * rows

    def reserve(self, rows: int) -> None:
        """Room for `rows` rows (once per step; grows only past the batch's high mark)."""
        have = len(self.seq_ids)
        if rows <= have:
            return
        grown = np.zeros((max(2 * have, rows), self.matrix.shape[1]), dtype=np.int32)
        grown[:have] = self.matrix
        extra = grown.shape[0] - have
        self.matrix = grown
        self.seq_ids += [-1] * extra
        self.versions += [-1] * extra
        self.lengths += [0] * extra

    def set(self, row: int, seq: Sequence) -> None:
        """Row `row` holds seq's table (after `reserve`)."""
        if self.seq_ids[row] == seq.seq_id and self.versions[row] == seq.table_version:
            return
        table = seq.block_table
        n, old = len(table), self.lengths[row]
        self.matrix[row, :n] = table
        if old > n:
            self.matrix[row, n:old] = 0
        self.seq_ids[row], self.versions[row], self.lengths[row] = seq.seq_id, seq.table_version, n

    def take(self, rows: int, width: int) -> np.ndarray:
        """The first `rows` rows' first `width` entries, row-major: a copy, or a view when width is
        the whole row (read it before the next step's `set`: the upload copies it at once)."""
        return self.matrix[:rows, :width].reshape(-1)


class _Staging:
    """Pinned host buffers for the per-step upload, used in turn: filling one never races the
    host->device copy of the other, which may still be queued behind the step in flight."""

    def __init__(self, device: torch.device, numel: int = 1 << 16) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self.bufs = [self._alloc(numel), self._alloc(numel)]
        self.events: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def _alloc(self, numel: int) -> torch.Tensor:
        return torch.empty(numel, dtype=torch.int32, pin_memory=self.pinned)

    def take(self, numel: int) -> tuple[torch.Tensor, np.ndarray]:
        """This turn's buffer, [:numel] as a tensor and as a numpy view (the same memory)."""
        event = self.events[self.turn]
        if event is not None:
            event.synchronize()  # the copy from it, two steps ago: long done in practice
        if self.bufs[self.turn].numel() < numel:
            self.bufs[self.turn] = self._alloc(max(numel, 2 * self.bufs[self.turn].numel()))
        host = self.bufs[self.turn][:numel]
        return host, host.numpy()

    def done(self) -> None:
        """The copy from this turn's buffer is queued: mark it, switch buffers."""
        event = torch.cuda.Event()
        event.record()
        self.events[self.turn] = event
        self.turn ^= 1


# How a launched step ran: a decode graph (plain or cascade attention), a lone-prefill graph, the
# piecewise graphs, or eagerly (CPU, enforce_eager, prompt logprobs, past the largest graph).
STEP_PATHS = ("decode_graph", "cascade_graph", "prefill_graph", "piecewise_graphs", "eager")


@dataclass
class StepHandle:
    """One launched step. Its sampled ids stay on the device until `results()` is called."""

    rows: list[SampleRow]
    pending: PendingSamples | None
    _results: dict[int, SampleResult] | None = None
    # [apps] launch(defer_sampling=True): the forward is enqueued, its sampling waits for
    # `ModelRunner.sample_deferred` (grammar masks that need the previous step's tokens first).
    deferred_logits: torch.Tensor | None = None

    def draw_index(self) -> dict[int, int]:
        """seq_id -> index of the row's (first) sampled id in `pending.token_ids`."""
        if self.pending is None:
            return {}
        return {row.seq.seq_id: d for row, d in zip(self.rows, self.pending.first_draw, strict=True)}

    def results(self) -> dict[int, SampleResult]:
        """Wait for the step's sampled tokens (once); seq_id -> result for the rows that sample."""
        if self._results is None:
            done = self.pending.results() if self.pending is not None else []
            self._results = {row.seq.seq_id: res for row, res in zip(self.rows, done, strict=True)}
        return self._results


class ModelRunner:
    def __init__(self, config: EngineConfig, model: torch.nn.Module, device: torch.device,
                 dtype: torch.dtype, eos_token_ids: list[int], max_model_len: int) -> None:
        self.config = config
        self.model = model
        self.device = device
        self.dtype = dtype
        self.block_size = config.cache.block_size
        self.max_model_len = max_model_len
        max_positions = getattr(model, "max_positions", None)
        if max_positions is not None and max_model_len > max_positions:
            from appliance.errors import ConfigError

            # Past its rope table a position would read another row's cos/sin: refuse, never guess.
            raise ConfigError(f"engine.max_model_len = {max_model_len} exceeds the {max_positions} positions this "
                              "model's rope scaling covers (max_position_embeddings, or the YaRN / dynamic NTK "
                              "extension); lower it")
        self.max_blocks_per_seq = (max_model_len + self.block_size - 1) // self.block_size
        self.sampler = Sampler(model.vocab_size, eos_token_ids)
        self.num_kv_blocks = self._decide_num_blocks()
        self.kv_caches = self._allocate_kv_cache(self.num_kv_blocks)
        self.graphs: dict[int, torch.cuda.CUDAGraph | _EagerReplay] = {}
        # Decode graphs with cascade attention, for the ladder's sizes >= cascade_min_seqs.
        self.cascade_graphs: dict[int, torch.cuda.CUDAGraph | _EagerReplay] = {}
        # Long-row decode graphs: for the small sizes whose split-KV partitions depend on the
        # rows' length (appliance.layers.attention.short_decode_bound), the plain graph serves
        # batches of rows shorter than its bound and this one the others (_setup_decode_graphs).
        self.long_graphs: dict[int, torch.cuda.CUDAGraph | _EagerReplay] = {}
        self._short_bound: dict[int, int] = {}
        self.long_row_steps = 0  # decode steps a long-row graph served (tests, logs)
        self.cascade_min_seqs = self._cascade_min_seqs()  # 0: cascade attention off
        self.cascade_steps = 0  # steps that attended a shared prefix once (tests, logs)
        self.prefill_graphs: dict[int, torch.cuda.CUDAGraph | _EagerReplay] = {}
        # Steps no other graph serves (mixed, several prompts): pieces cut at attention, by size.
        self.piecewise: dict[int, PiecewiseForward] = {}
        # Every launched step by how it ran (/metrics `llm_appliance_engine_steps_total{path}`):
        # a step that falls to eager on a GPU pays its launches from Python.
        self.step_paths = dict.fromkeys(STEP_PATHS, 0)
        self._graph_pool = None
        self._staging = _Staging(device)
        self._table_rows = _TableRows(self.max_blocks_per_seq)
        if device.type == "cuda" and not config.enforce_eager:
            self._setup_decode_graphs(capture=True)
            self._setup_prefill_graphs(capture=True)
            self._setup_piecewise_graphs(capture=True)

    @property
    def piecewise_steps(self) -> int:
        """Steps the piecewise graphs served (tests, bench/offline.py)."""
        return self.step_paths["piecewise_graphs"]

    def _cascade_min_seqs(self) -> int:
        """Rows that must share a prefix for a step to use cascade attention; 0: never (off, or
        every layer slides: those layers keep plain decode)."""
        windows = getattr(self.model, "sliding_windows", [None])
        if self.config.cascade_attention == "off" or all(w is not None for w in windows):
            return 0
        if self.device.type != "cuda":
            return CASCADE_MIN_SEQS
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        return max(CASCADE_MIN_SEQS, -(-sms // self.model.num_kv_heads))

    def _cascade_plan(self, out: SchedulerOutput) -> _CascadePlan | None:
        """The step's shared prefix and which rows share it (a row does when its table lists the
        prefix's last block at the same index: BlockManager.common_prefix), if worth it. O(rows)."""
        blocks = out.common_prefix_blocks
        if not self.cascade_min_seqs or len(blocks) * self.block_size < CASCADE_MIN_PREFIX_TOKENS:
            return None
        k, last, tokens = len(blocks), blocks[-1], len(blocks) * self.block_size
        shares = [tokens if len(table) >= k and table[k - 1] == last else 0
                  for table in (item.seq.block_table for item in out.scheduled)]
        if len(shares) - shares.count(0) < self.cascade_min_seqs:
            return None
        return _CascadePlan(blocks, tokens, shares)

    # ------------------------------------------------------------------ KV cache sizing
    @property
    def kv_bytes_per_block(self) -> int:
        from appliance.layers.attention import kv_cache_torch_dtype

        m = self.model
        kv_dtype = kv_cache_torch_dtype(self.config.cache.kv_cache_dtype, self.dtype, self.device)
        elem = torch.empty((), dtype=kv_dtype).element_size()  # fp8: 1 byte, half of bf16
        return 2 * m.num_layers * self.block_size * m.num_kv_heads * m.head_dim * elem

    def _decide_num_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_kv_blocks is not None:
            return cache.num_kv_blocks
        if self.device.type != "cuda":
            return max(1, cache.cpu_kv_cache_bytes // self.kv_bytes_per_block)
        peak = self._profile_peak_bytes()
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * cache.gpu_memory_utilization - used_by_others - peak
        num_blocks = int(budget // self.kv_bytes_per_block)
        log.info("KV cache: peak %.2f GiB (weights+activations), %d blocks = %.2f GiB",
                 peak / 2**30, num_blocks, num_blocks * self.kv_bytes_per_block / 2**30)
        if num_blocks < self.max_blocks_per_seq:
            from appliance.errors import ModelLoadError

            raise ModelLoadError(
                f"not enough GPU memory for one max_model_len sequence: {num_blocks} KV blocks; "
                "raise gpu_memory_utilization or lower max_model_len")
        return num_blocks

    def _profile_peak_bytes(self) -> int:
        """Peak memory of the largest step: max_num_batched_tokens of prefill + full logits."""
        sched = self.config.scheduler
        num_tokens = sched.max_num_batched_tokens
        num_seqs = max(1, min(sched.max_num_seqs, num_tokens))
        blocks_needed = num_seqs + (num_tokens + self.block_size - 1) // self.block_size
        tmp_caches = self._allocate_kv_cache(blocks_needed)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        per_seq = num_tokens // num_seqs
        lens = [per_seq] * num_seqs
        lens[-1] += num_tokens - per_seq * num_seqs
        qsl = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        block_tables = np.zeros((num_seqs, max(1, -(-max(lens) // self.block_size))), dtype=np.int32)
        next_block = 0
        for i, n in enumerate(lens):
            nb = -(-n // self.block_size)
            block_tables[i, :nb] = np.arange(next_block, next_block + nb)
            next_block += nb
        slots = np.concatenate([block_tables[i, np.arange(n) // self.block_size] * self.block_size
                                + np.arange(n) % self.block_size for i, n in enumerate(lens)])
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots.astype(np.int64)).to(self.device),
            query_start_loc=torch.from_numpy(qsl).to(self.device),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=self.device),
            block_tables=torch.from_numpy(block_tables).to(self.device),
            max_query_len=max(lens), max_seq_len=max(lens))
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        pos = torch.from_numpy(np.concatenate([np.arange(n) for n in lens])).to(self.device)
        with torch.inference_mode():
            hidden = self.model(ids, pos, tmp_caches, meta)
            logits = self.model.compute_logits(hidden[: sched.max_num_seqs])
            torch.softmax(logits, dim=-1)
        torch.cuda.synchronize(self.device)
        peak_activation = torch.cuda.max_memory_allocated(self.device) - base
        del tmp_caches, hidden, logits
        torch.cuda.empty_cache()
        weights = torch.cuda.memory_allocated(self.device)
        return weights + peak_activation

    def _allocate_kv_cache(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(k, v) caches per layer in the configured KV dtype; the kernels read fp8 from the dtype itself
        (scales: each layer's Attention.k_scale / v_scale)."""
        from appliance.layers.attention import kv_cache_torch_dtype

        m = self.model
        shape = (num_blocks, self.block_size, m.num_kv_heads, m.head_dim)
        kv_dtype = kv_cache_torch_dtype(self.config.cache.kv_cache_dtype, self.dtype, self.device)
        caches = []
        for _ in range(m.num_layers):
            caches.append((torch.zeros(shape, dtype=kv_dtype, device=self.device),
                           torch.zeros(shape, dtype=kv_dtype, device=self.device)))
        return caches

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, prev: StepHandle | None = None, *,
               defer_sampling: bool = False) -> StepHandle:
        """Enqueue the step (copies, forward, sampling) without waiting for the device.

        `prev`: the step launched before this one, whose sampled ids may still be on the device;
        rows whose input token is a placeholder read it from there.
        """
        if out.blocks_to_copy:
            self._copy_blocks(out.blocks_to_copy)
        if out.is_empty:
            return StepHandle([], None)
        hb = self._prepare(out)
        num_seqs = len(hb.q_lens)
        # Graphs serve decode steps in which every row samples (a 1-token prefill chunk that
        # does not reach the prompt's end samples nothing: eager).
        decode = len(hb.ids) == num_seqs == len(hb.logits_rows)
        # NOTE: the scheduler looks for a shared prefix only in steps of one-token rows, whose
        # order _prepare keeps.
        cascade = self._cascade_plan(out) if out.common_prefix_blocks and len(hb.ids) == num_seqs else None
        graph_size = self._graph_size_for(num_seqs) if decode else None
        prefill_size = None if decode else self._prefill_graph_size_for(hb)
        piecewise_size = None if graph_size or prefill_size or cascade else self._piecewise_size_for(hb)
        if graph_size is not None:
            self.step_paths["cascade_graph" if cascade else "decode_graph"] += 1
            logits = self._replay(hb, graph_size, prev, cascade)
        elif prefill_size is not None:
            self.step_paths["prefill_graph"] += 1
            logits = self._replay_prefill(hb, prefill_size)
        elif piecewise_size is not None:
            self.step_paths["piecewise_graphs"] += 1
            logits = self._replay_piecewise(hb, piecewise_size, prev)
        else:
            self.step_paths["eager"] += 1
            batch = self._upload_eager(hb, prev, cascade)
            self.cascade_steps += batch.meta.use_cascade
            hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)
            logits = self.model.compute_logits(hidden.index_select(0, batch.logits_indices))
            if hb.prompt_lp:
                self._prompt_logprobs(hidden, hb.prompt_lp)  # [apps]
        if not hb.rows:
            return StepHandle([], None)
        if defer_sampling:  # [apps] see StepHandle.deferred_logits
            return StepHandle(hb.rows, None, deferred_logits=logits)
        return StepHandle(hb.rows, self.sampler.sample_async(logits, hb.rows))

    def sample_deferred(self, handle: StepHandle) -> None:
        """[apps] Enqueue the sampling of a step launched with defer_sampling=True.
        NOTE: before the next launch (a graph's logits buffer is reused by its next replay)."""
        if handle.deferred_logits is not None:
            handle.pending = self.sampler.sample_async(handle.deferred_logits, handle.rows)
            handle.deferred_logits = None

    def _prompt_logprobs(self, hidden: torch.Tensor, chunks: list[tuple[Sequence, int, int, int]]) -> None:
        """[apps] Logprob of each prompt token given the ones before it (+ top-k), from this
        chunk's hidden states, into seq.prompt_logprobs. Waits for the device: only requests
        that ask for prompt logprobs (echo scoring) pay it."""
        vocab = self.sampler.vocab_size
        for seq, offset, start, n in chunks:
            k = seq.sampling_params.prompt_logprobs or 0
            if start == 0 or seq.prompt_logprobs is None:
                seq.prompt_logprobs = [None]  # the first token has no context (a recompute restarts)
            entries = seq.prompt_logprobs
            last = min(start + n, seq.num_prompt_tokens - 1)  # position p predicts token p + 1
            for lo in range(start, last, _PROMPT_LOGPROB_ROWS):
                hi = min(lo + _PROMPT_LOGPROB_ROWS, last)
                rows = hidden[offset + lo - start : offset + hi - start]
                logp = torch.log_softmax(self.model.compute_logits(rows)[:, :vocab].float(), dim=-1)
                targets = torch.tensor(seq.token_ids[lo + 1 : hi + 1], device=logp.device)
                chosen = logp.gather(1, targets[:, None])[:, 0].tolist()
                top_vals, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
                tops = zip(top_ids.tolist(), top_vals.tolist(), strict=True)
                for p, value, (ids_k, vals_k) in zip(range(lo, hi), chosen, tops, strict=True):
                    if len(entries) == p + 1:  # next expected (a preempted chunk may repeat)
                        entries.append(TokenLogprob(seq.token_ids[p + 1], value, list(zip(ids_k, vals_k, strict=True))))

    def _copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        host = torch.tensor(pairs, dtype=torch.long).T.contiguous()
        if self.device.type == "cuda":  # a pageable copy would wait for the step in flight
            host = host.pin_memory().to(self.device, non_blocking=True)
        src, dst = host[0], host[1]
        for k_cache, v_cache in self.kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]

    def _prepare(self, out: SchedulerOutput) -> _HostBatch:
        """Flatten the step into plain host lists.

        NOTE: this runs on the host every step (while the GPU idles, unless async scheduling has
        the previous step running): plain Python ints and list ops (no per-sequence numpy or
        tensor calls) keep it to a few us per sequence.
        """
        bs = self.block_size
        hb = _HostBatch()
        ids, positions, slots = hb.ids, hb.positions, hb.slots
        set_row = self._table_rows.set
        # One-token rows first (the attention kernel gives them decode tiles: AttentionMetadata
        # .num_decodes); the sampled rows keep their sequences, so the order is free.
        scheduled = [item for item in out.scheduled if item.num_new_tokens == 1]
        hb.num_decodes = len(scheduled)
        if hb.num_decodes < len(out.scheduled):
            scheduled += [item for item in out.scheduled if item.num_new_tokens != 1]
        hb.width = max(len(item.seq.block_table) for item in scheduled)
        table_rows = self._table_rows
        table_rows.reserve(len(scheduled))
        # The one-token rows, in a loop of their own (a decode step is nothing else: 512 rows): row
        # r is token r, and the table row is rewritten only when its sequence or table changed.
        num_decodes = hb.num_decodes
        row_seq_ids, row_versions = table_rows.seq_ids, table_rows.versions
        seq_lens, logits_rows, sample_rows = hb.seq_lens, hb.logits_rows, hb.rows
        gather_dst, gather_seqs = hb.gather_dst, hb.gather_seqs
        ids_append, positions_append, slots_append = ids.append, positions.append, slots.append
        for row in range(num_decodes):
            item = scheduled[row]
            seq, start = item.seq, item.start
            token = seq.token_ids[start]
            if token == PLACEHOLDER_TOKEN_ID:
                # Filled on the device from the step in flight (see _gather_placeholders).
                gather_dst.append(row)
                gather_seqs.append(seq.seq_id)
                token = 0
            if seq.sampling_params.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1:
                hb.prompt_lp.append((seq, row, start, 1))  # [apps] a one-token prompt chunk
            ids_append(token)
            positions_append(start)
            slots_append(seq.block_table[start // bs] * bs + start % bs)
            if row_seq_ids[row] != seq.seq_id or row_versions[row] != seq.table_version:
                set_row(row, seq)
            seq_lens.append(start + 1)
            if item.sample:
                logits_rows.append(row)
                sample_rows.append(SampleRow(seq, 1 + seq.pending_forks))
        hb.q_lens = [1] * num_decodes
        for row in range(num_decodes, len(scheduled)):
            item = scheduled[row]
            seq, n = item.seq, item.num_new_tokens
            start = item.start  # NOTE: the scheduler has already counted this step as computed
            table = seq.block_table
            # NOTE: only a decode may feed a placeholder: a sequence is never (re)prefilled
            # before its last sampled token has reached the host (it is the last token).
            assert seq.token_ids[start + n - 1] != PLACEHOLDER_TOKEN_ID, seq
            if seq.sampling_params.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1:
                hb.prompt_lp.append((seq, len(ids), start, n))  # [apps]
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            # A run of consecutive slots per block (a 512-token chunk: 32 ranges, not 512 ints
            # computed one by one in Python).
            p, end = start, start + n
            while p < end:
                off = p % bs
                take = min(bs - off, end - p)
                base = table[p // bs] * bs + off
                slots.extend(range(base, base + take))
                p += take
            set_row(row, seq)
            hb.q_lens.append(n)
            hb.seq_lens.append(start + n)
            if item.sample:
                hb.logits_rows.append(len(ids) - 1)
                hb.rows.append(SampleRow(seq, 1 + seq.pending_forks))
        hb.tables = self._table_rows.take(len(scheduled), hb.width)
        return hb

    def _gather_src(self, hb: _HostBatch, prev: StepHandle | None) -> list[int]:
        if not hb.gather_dst:
            return []
        assert prev is not None and prev.pending is not None, "a placeholder is fed but no step is in flight"
        draws = prev.draw_index()
        return [draws[seq_id] for seq_id in hb.gather_seqs]

    def _upload(self, parts: list[list[int] | np.ndarray], dst: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
        """Concatenate int32 parts in a staging buffer and copy them to the device in one go.

        Returns the device buffer and each part's offset in it. Every part starts on a 64-byte
        boundary: Triton specializes kernels on pointer alignment, so parts that moved with the
        step's sizes would compile a new kernel variant (0.4-0.8 s each) in the middle of serving.
        dst: where the copy lands (a persistent device buffer), else a fresh device tensor.
        """
        offsets = []
        total = 0
        for part in parts:
            offsets.append(total)
            total += -(-len(part) // _ALIGN) * _ALIGN
        host, arr = self._staging.take(total)
        for part, o in zip(parts, offsets, strict=True):
            arr[o : o + len(part)] = part
        if self.device.type != "cuda":
            return (host.clone() if dst is None else dst[:total].copy_(host)), offsets
        dev = torch.empty(total, dtype=torch.int32, device=self.device) if dst is None else dst[:total]
        dev.copy_(host, non_blocking=True)
        self._staging.done()
        return dev, offsets

    def _upload_eager(self, hb: _HostBatch, prev: StepHandle | None, cascade: _CascadePlan | None = None) -> _Batch:
        """Every input of an eager step in one int32 buffer: [ids | positions | slots | logits rows
        | query starts | seq lens | block tables | gather dst | gather src | cascade: prefix
        length, rows' shares, prefix blocks]."""
        num_tokens, num_seqs = len(hb.ids), len(hb.q_lens)
        qsl = np.zeros(num_seqs + 1, dtype=np.int32)
        np.cumsum(hb.q_lens, out=qsl[1:])
        src = self._gather_src(hb, prev)
        parts = [hb.ids, hb.positions, hb.slots, hb.logits_rows, qsl, hb.seq_lens, hb.tables, hb.gather_dst, src]
        if cascade is not None:
            parts += [[cascade.tokens], cascade.shares, cascade.blocks]
        dev, offsets = self._upload(parts)
        input_ids, pos_t, slot_t, logits_t, qsl_t, seq_lens_t, tables_t, dst_t, src_t, *cascade_t = (
            dev[o : o + len(part)] for part, o in zip(parts, offsets, strict=True))
        tables_t = tables_t.view(num_seqs, hb.width)
        if src:
            self._gather_placeholders(input_ids, dst_t, src_t, prev)
        meta = AttentionMetadata(
            slot_mapping=slot_t,
            query_start_loc=qsl_t,
            seq_lens=seq_lens_t,
            block_tables=tables_t,
            max_query_len=max(hb.q_lens),
            max_seq_len=max(hb.seq_lens),
            is_decode_only=num_tokens == num_seqs,
            num_decodes=hb.num_decodes,
            use_cascade=cascade is not None,
            cascade_prefix_len=cascade_t[0] if cascade_t else None,
            cascade_row_prefix_lens=cascade_t[1] if cascade_t else None,
            cascade_prefix_blocks=cascade_t[2] if cascade_t else None,
        )
        return _Batch(input_ids=input_ids, positions=pos_t, meta=meta, logits_indices=logits_t)

    @staticmethod
    def _gather_placeholders(input_ids: torch.Tensor, dst: torch.Tensor, src: torch.Tensor,
                             prev: StepHandle | None) -> None:
        """input_ids[dst] = the in-flight step's sampled ids[src], on the device."""
        assert prev is not None and prev.pending is not None
        input_ids.index_put_((dst,), prev.pending.token_ids.index_select(0, src).to(input_ids.dtype))

    # ------------------------------------------------------------------ CUDA graphs (decode)
    def _graph_sizes(self) -> list[int]:
        if self.config.cuda_graph_batch_sizes:
            sizes = list(self.config.cuda_graph_batch_sizes)
        else:
            sizes = [1, 2, 4, 8] + list(range(16, 513, 16))
        return sorted(s for s in sizes if s <= self.config.scheduler.max_num_seqs)

    def _graph_size_for(self, num_seqs: int) -> int | None:
        if not self.graphs:
            return None
        for size in self._graph_sizes():
            if size >= num_seqs and size in self.graphs:
                return size
        return None

    def _setup_decode_graphs(self, *, capture: bool) -> None:
        """Static inputs for the decode ladder, then a CUDA graph per size (capture=True, on CUDA)
        or a plain forward over the same static inputs (capture=False: CPU tests of this path),
        and the same for the cascade family (_capture_cascade_graphs)."""
        t0 = time.monotonic()
        sizes = self._graph_sizes()
        if not sizes:
            return
        max_bs = max(sizes)
        dev = self.device
        # The graphs' inputs live in one int32 buffer that one host->device copy per step fills:
        # [ids | positions | slots | seq_lens | query starts] (max_bs each, query starts max_bs + 1),
        # then room for the step's packed block tables and placeholder gather indices.
        self._g_host = np.zeros(5 * max_bs + 1, dtype=np.int32)
        self._g_host[4 * max_bs :] = np.arange(max_bs + 1)
        # Cascade graphs also read one static int32 buffer, filled by a device copy from the same
        # upload: [prefix length | pad to _ALIGN | the rows' shares (max_bs, aligned) | prefix blocks].
        self._gc_blocks_at = _ALIGN + -(-max_bs // _ALIGN) * _ALIGN
        self._gc_host = np.zeros(self._gc_blocks_at + self.max_blocks_per_seq, dtype=np.int32)
        self._gc_buf = torch.zeros(self._gc_host.shape[0], dtype=torch.int32, device=dev)
        self._g_buf = torch.zeros(5 * max_bs + 1 + max_bs * (self.max_blocks_per_seq + 2) + 5 * _ALIGN
                                  + self._gc_host.shape[0], dtype=torch.int32, device=dev)
        self._g_buf[: 5 * max_bs + 1].copy_(torch.from_numpy(self._g_host))
        self._g_input_ids, self._g_positions, self._g_slots, self._g_seq_lens = self._g_buf[: 4 * max_bs].view(4, max_bs)
        self._g_slots.fill_(-1)
        self._g_seq_lens.fill_(1)
        self._g_qsl = self._g_buf[4 * max_bs : 5 * max_bs + 1]
        self._g_block_tables = torch.zeros((max_bs, self.max_blocks_per_seq), dtype=torch.int32, device=dev)
        self._g_logits: dict[int, torch.Tensor] = {}
        for size in sizes:
            bound = short_decode_bound(size, self.model.num_kv_heads, self.max_model_len, dev)
            if bound is not None:
                self._short_bound[size] = bound
        if not capture:
            with torch.inference_mode():
                for size in sizes:
                    forward = functools.partial(self._static_decode, size, False)
                    self._g_logits[size] = forward()
                    self.graphs[size] = _EagerReplay(forward, self._g_logits[size])
                for size in self._short_bound:
                    self.long_graphs[size] = _EagerReplay(functools.partial(self._static_decode, size, False, True),
                                                          self._g_logits[size])
                for size in self._cascade_graph_sizes():
                    self.cascade_graphs[size] = _EagerReplay(functools.partial(self._static_decode, size, True),
                                                             self._g_logits[size])
            return
        pool = self._graph_pool
        stream = torch.cuda.Stream(dev)
        for size in reversed(sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: Triton autotune/compile outside the capture
                    self._static_decode(size, False)
            stream.synchronize()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self._g_logits[size] = self._static_decode(size, False)
            pool = graph.pool()
            self.graphs[size] = graph
        for size in sorted(self._short_bound, reverse=True):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._static_decode(size, False, True)
            stream.synchronize()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self._g_logits[size].copy_(self._static_decode(size, False, True))
            pool = graph.pool()
            self.long_graphs[size] = graph
        self._graph_pool = pool
        torch.cuda.synchronize(dev)
        log.info("captured %d CUDA graphs (batch %d..%d) in %.1f s; long-row graphs for batch %s",
                 len(sizes), sizes[0], max_bs, time.monotonic() - t0, sorted(self._short_bound) or "none")
        self._capture_cascade_graphs(stream)

    def _static_decode(self, size: int, cascade: bool, long: bool = False) -> torch.Tensor:
        """The forward a decode graph of `size` rows records, over the static inputs: logits. A size
        with a long-row graph records its plain graph for rows under its short bound."""
        bound = self.max_model_len if long or cascade else self._short_bound.get(size, self.max_model_len)
        hidden = self.model(self._g_input_ids[:size], self._g_positions[:size], self.kv_caches,
                            self._graph_meta(size, cascade=cascade, max_seq_len=bound))
        return self.model.compute_logits(hidden)

    def _cascade_graph_sizes(self) -> list[int]:
        return [size for size in self._graph_sizes() if self.cascade_min_seqs and size >= self.cascade_min_seqs]

    def _capture_cascade_graphs(self, stream: torch.cuda.Stream) -> None:
        """A second family of decode graphs, attention through the cascade kernels, for the
        ladder's sizes that cascade_min_seqs rows can reach. Warm-up and capture run at prefix
        length 0 (the kernels' loops read nothing); replays set the length. Each writes its logits
        into the plain graph's buffer of its size (one copy, no second set of logits held)."""
        sizes = self._cascade_graph_sizes()
        if not sizes:
            return
        t0 = time.monotonic()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        pool = self._graph_pool
        for size in reversed(sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(stream):
                for _ in range(2):  # Triton compiles outside the capture
                    self._static_decode(size, True)
            stream.synchronize()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self._g_logits[size].copy_(self._static_decode(size, True))
            pool = graph.pool()
            self.cascade_graphs[size] = graph
        self._graph_pool = pool
        torch.cuda.synchronize(self.device)
        log.info("captured %d cascade-attention decode graphs (batch %d..%d) in %.1f s, %.0f MiB",
                 len(sizes), sizes[0], sizes[-1], time.monotonic() - t0,
                 (free_before - torch.cuda.mem_get_info(self.device)[0]) / 2**20)

    def _graph_meta(self, size: int, cascade: bool = False, max_seq_len: int | None = None) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self._g_slots[:size],
            query_start_loc=self._g_qsl[: size + 1],
            seq_lens=self._g_seq_lens[:size],
            block_tables=self._g_block_tables[:size],
            max_query_len=1,
            # NOTE: the kernel grid must not depend on live lengths: a bound the replayed rows respect.
            max_seq_len=self.max_model_len if max_seq_len is None else max_seq_len,
            is_decode_only=True,
            use_cascade=cascade,
            cascade_prefix_len=self._gc_buf[:1] if cascade else None,
            cascade_row_prefix_lens=self._gc_buf[_ALIGN : _ALIGN + size] if cascade else None,
            cascade_prefix_blocks=self._gc_buf[self._gc_blocks_at :] if cascade else None,
        )

    def _replay(self, hb: _HostBatch, size: int, prev: StepHandle | None,
                cascade: _CascadePlan | None = None) -> torch.Tensor:
        """Fill the graph's inputs (one copy, padding rows included) and replay it (the cascade
        graph of the size when there is a plan and one)."""
        n = len(hb.ids)
        max_bs = self._g_input_ids.shape[0]
        host = self._g_host
        # Padding rows [n, size): token 0 at position 0, slot -1 (stores nothing), length 1.
        _fill_padded(host, max_bs, n, size, ((hb.ids, 0), (hb.positions, 0), (hb.slots, -1), (hb.seq_lens, 1)))
        src = self._gather_src(hb, prev)
        parts: list[list[int] | np.ndarray] = [host, hb.tables, hb.gather_dst, src]
        graph = self.graphs[size]
        if cascade is not None and size in self.cascade_graphs:
            graph = self.cascade_graphs[size]
            self.cascade_steps += 1
            # [prefix length | rows' shares, padding rows 0 | prefix blocks] (see _setup_decode_graphs)
            head, at = self._gc_host, self._gc_blocks_at
            head[0] = cascade.tokens
            head[_ALIGN : _ALIGN + n] = cascade.shares
            head[_ALIGN + n : _ALIGN + size] = 0
            head[at : at + len(cascade.blocks)] = cascade.blocks
            parts.append(head[: at + len(cascade.blocks)])
        elif size in self._short_bound and max(hb.seq_lens) > self._short_bound[size]:
            graph = self.long_graphs[size]
            self.long_row_steps += 1
        dev, (_, o_tables, o_dst, o_src, *o_cascade) = self._upload(parts, dst=self._g_buf)
        width = hb.width
        # Rows past n keep stale but valid block ids: padding rows read one key of them, harmlessly.
        self._g_block_tables[:n, :width].copy_(dev[o_tables : o_tables + n * width].view(n, width))
        if o_cascade:
            used = len(parts[-1])
            self._gc_buf[:used].copy_(dev[o_cascade[0] : o_cascade[0] + used])
        if src:
            self._gather_placeholders(self._g_input_ids, dev[o_dst : o_dst + len(src)],
                                      dev[o_src : o_src + len(src)], prev)
        graph.replay()
        return self._g_logits[size][: len(hb.logits_rows)]

    # ------------------------------------------------------------------ CUDA graphs (a lone prefill)
    # A step that prefills one sequence and nothing else (the prompt of a request that arrives at
    # an idle engine) is all host time when eager: an 8B model launches ~300 kernels from Python
    # (15 ms of launch against ~3 ms of device time for 256 tokens on an H100). Such steps replay a
    # graph captured for the next token count of a ladder: padding tokens have slot -1 (no KV
    # store), lie past query_start_loc[1] (attention leaves them out) and are never sampled; rows are
    # independent everywhere else, so they cost only their share of the GEMMs.
    def _prefill_graph_sizes(self) -> list[int]:
        cap = min(self.config.cuda_graph_prefill_max_tokens, self.config.scheduler.max_num_batched_tokens,
                  self.max_model_len)
        if cap < 2:
            return []
        sizes, size = [], 16
        while size < cap:
            sizes.append(size)
            size *= 2
        return [*sizes, cap]

    def _prefill_graph_size_for(self, hb: _HostBatch) -> int | None:
        if not self.prefill_graphs or len(hb.q_lens) != 1 or hb.prompt_lp or hb.gather_dst:
            return None
        return _first_at_least(self.prefill_graphs, len(hb.ids))

    def _setup_prefill_graphs(self, *, capture: bool) -> None:
        """Static inputs for every size, then a CUDA graph per size (capture=True, on CUDA) or a
        plain forward over the same static inputs (capture=False: CPU tests of this path).

        One int32 device buffer, one copy per step: [ids | positions | slots] (P each, P the
        largest size), [0, n, seq_len, logits row], then the sequence's block table."""
        sizes = self._prefill_graph_sizes()
        if not sizes:
            return
        t0 = time.monotonic()
        big, dev = sizes[-1], self.device
        fixed = -(-(3 * big + 4) // _ALIGN) * _ALIGN
        self._p_host = np.zeros(fixed, dtype=np.int32)
        self._p_buf = torch.zeros(fixed + self.max_blocks_per_seq + _ALIGN, dtype=torch.int32, device=dev)
        ids, pos, slots = self._p_buf[: 3 * big].view(3, big)
        slots.fill_(-1)
        tail = self._p_buf[3 * big : 3 * big + 4]
        tail.copy_(torch.tensor([0, big, big, 0], dtype=torch.int32))
        qsl, seq_lens, logits_row = tail[:2], tail[2:3], tail[3:4]
        tables = self._p_buf[fixed : fixed + self.max_blocks_per_seq].view(1, -1)
        self._p_logits: dict[int, torch.Tensor] = {}

        def forward(size: int) -> torch.Tensor:
            meta = AttentionMetadata(slot_mapping=slots[:size], query_start_loc=qsl, seq_lens=seq_lens,
                                     block_tables=tables, max_query_len=size, max_seq_len=self.max_model_len)
            hidden = self.model(ids[:size], pos[:size], self.kv_caches, meta)
            return self.model.compute_logits(hidden.index_select(0, logits_row))

        graphs: dict[int, torch.cuda.CUDAGraph | _EagerReplay] = {}
        if not capture:
            with torch.inference_mode():
                for size in sizes:
                    tail[1:3].fill_(size)  # a consistent whole padded chunk (slots -1: no stores)
                    self._p_logits[size] = forward(size)
                    graphs[size] = _EagerReplay(functools.partial(forward, size), self._p_logits[size])
        else:
            pool = self._graph_pool
            stream = torch.cuda.Stream(dev)
            with torch.inference_mode():
                for size in reversed(sizes):
                    tail[1:3].fill_(size)  # warm-up/capture values: the whole padded chunk, no stores
                    with torch.cuda.stream(stream):
                        for _ in range(2):  # Triton compiles outside the capture
                            forward(size)
                    stream.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=stream):
                        self._p_logits[size] = forward(size)
                    pool = graph.pool()
                    graphs[size] = graph
            self._graph_pool = pool
            torch.cuda.synchronize(dev)
        self.prefill_graphs = dict(sorted(graphs.items()))
        log.info("%s %d prefill graphs (%d..%d tokens) in %.1f s", "captured" if capture else "built",
                 len(sizes), sizes[0], big, time.monotonic() - t0)

    def _replay_prefill(self, hb: _HostBatch, size: int) -> torch.Tensor:
        """Fill the static inputs of a lone prefill (one copy, padding included) and replay."""
        n = len(hb.ids)
        host = self._p_host
        big = max(self.prefill_graphs)
        _fill_padded(host, big, n, size, ((hb.ids, 0), (hb.positions, 0), (hb.slots, -1)))
        host[3 * big + 1] = n
        host[3 * big + 2] = hb.seq_lens[0]
        host[3 * big + 3] = hb.logits_rows[0] if hb.logits_rows else n - 1
        # NOTE: the table lands right after the fixed part (its length is a multiple of _ALIGN).
        self._upload([host, hb.tables], dst=self._p_buf)
        self.prefill_graphs[size].replay()
        return self._p_logits[size][: len(hb.logits_rows)]

    # ------------------------------------------------------------------ piecewise graphs (the other steps)
    # appliance/engine/piecewise.py: every layer's non-attention work captured per token count,
    # attention launched eagerly between the pieces over the step's live metadata.
    def _piecewise_sizes(self) -> list[int]:
        cap = min(self.config.cuda_graph_piecewise_max_tokens, self.config.scheduler.max_num_batched_tokens)
        return piecewise_sizes(cap) if cap >= 16 else []

    def _piecewise_size_for(self, hb: _HostBatch) -> int | None:
        if not self.piecewise or hb.prompt_lp:
            return None
        return _first_at_least(self.piecewise, len(hb.ids))

    def _setup_piecewise_graphs(self, *, capture: bool) -> None:
        """Static inputs shared by every size, then each size's pieces (capture=True, on CUDA) or an
        eager stand-in over the same buffers (capture=False: CPU tests of this path).

        One int32 device buffer, one copy per step: [ids | positions | slots] (P each, P the largest
        size, aligned), the sampled rows (R = min(P, max_num_seqs)), then the step's attention
        metadata: query starts, sequence lengths, block tables, placeholder gather indices."""
        sizes = self._piecewise_sizes()
        if not sizes:
            return
        t0 = time.monotonic()
        big, dev = sizes[-1], self.device
        free_before = torch.cuda.mem_get_info(dev)[0] if capture else 0
        max_seqs = self.config.scheduler.max_num_seqs
        span = -(-big // _ALIGN) * _ALIGN
        rows = min(big, max_seqs)
        self._w_span, self._w_rows_at = span, 3 * span
        fixed = 3 * span + -(-rows // _ALIGN) * _ALIGN
        self._w_host = np.zeros(fixed, dtype=np.int32)
        self._w_host[2 * span : 3 * span] = -1
        meta_room = 5 * (max_seqs + 1 + _ALIGN) + max_seqs * self.max_blocks_per_seq + _ALIGN
        self._w_buf = torch.zeros(fixed + meta_room, dtype=torch.int32, device=dev)
        self._w_buf[:fixed].copy_(torch.from_numpy(self._w_host))
        ids, pos, slots = self._w_buf[: 3 * span].view(3, span)
        self._w_ids = ids
        sample_rows = self._w_buf[3 * span : 3 * span + rows]
        width = max(m.num_heads * m.head_dim for m in attention_modules(self.model))
        q_buf = torch.empty(big * width, dtype=self.dtype, device=dev)
        out_buf = torch.empty(big * width, dtype=self.dtype, device=dev)
        # Never read by the pieces (their attention is cut out), but a valid batch of one sequence.
        dummy_qsl = torch.tensor([0, 1], dtype=torch.int32, device=dev)
        dummy_lens = torch.ones(1, dtype=torch.int32, device=dev)
        dummy_tables = torch.zeros((1, 1), dtype=torch.int32, device=dev)
        logits_buf: list[torch.Tensor] = []

        def forward(size: int) -> None:
            meta = AttentionMetadata(slot_mapping=slots[:size], query_start_loc=dummy_qsl, seq_lens=dummy_lens,
                                     block_tables=dummy_tables, max_query_len=1, max_seq_len=1)
            hidden = self.model(ids[:size], pos[:size], self.kv_caches, meta)
            r = min(size, max_seqs)
            logits = self.model.compute_logits(hidden.index_select(0, sample_rows[:r]))
            if not logits_buf:  # the first (warm-up) call sizes the shared logits buffer
                logits_buf.append(torch.empty((rows, logits.shape[1]), dtype=logits.dtype, device=dev))
            logits_buf[0][:r].copy_(logits)

        num_attn = len(attention_modules(self.model))

        def check_cuts(recorder: Recorder) -> None:
            # A layer that attends outside Attention.attend would be captured inside a piece over
            # the capture's dummy metadata and replayed with it: wrong tokens, no error.
            if len(recorder.cuts) != num_attn:
                from appliance.errors import ModelLoadError

                raise ModelLoadError(
                    f"piecewise CUDA graphs: the forward attended through Attention.attend {len(recorder.cuts)} "
                    f"times for {num_attn} attention modules; set engine.cuda_graph_piecewise_max_tokens = 0")

        with torch.inference_mode():
            if not capture:
                with cutting(self.model, Recorder(q_buf, out_buf)) as first:
                    forward(sizes[0])
                check_cuts(first)
                for size in sizes:
                    def eager(meta: AttentionMetadata, size: int = size) -> None:
                        recorder = Recorder(q_buf, out_buf)
                        recorder.live = meta
                        with cutting(self.model, recorder):
                            forward(size)
                    self.piecewise[size] = PiecewiseForward([], [], logits_buf[0][: min(size, max_seqs)],
                                                            eager=eager)
            else:
                pool = self._graph_pool
                stream = torch.cuda.Stream(dev)
                for size in reversed(sizes):
                    recorder = Recorder(q_buf, out_buf, capture=True, pool=pool)
                    try:
                        with torch.cuda.stream(stream), cutting(self.model, Recorder(q_buf, out_buf)):
                            for _ in range(2):  # Triton compiles and cuBLAS picks outside the capture
                                forward(size)
                        stream.synchronize()
                        with torch.cuda.stream(stream), cutting(self.model, recorder):
                            recorder.begin()
                            forward(size)
                            recorder.end()
                    except (RuntimeError, torch.OutOfMemoryError) as exc:
                        from appliance.errors import ModelLoadError

                        raise ModelLoadError(
                            f"capturing the piecewise CUDA graphs of {size} tokens failed ({exc}); set "
                            "engine.cuda_graph_piecewise_max_tokens lower, or 0 to run those steps eagerly") from exc
                    check_cuts(recorder)
                    pool = recorder.pool
                    self.piecewise[size] = PiecewiseForward(recorder.pieces, recorder.cuts,
                                                            logits_buf[0][: min(size, max_seqs)])
                self._graph_pool = pool
                torch.cuda.synchronize(dev)
        self.piecewise = dict(sorted(self.piecewise.items()))
        # Device memory they hold (static buffers and the pool's growth): what a smaller GPU must spare.
        held = f", {(free_before - torch.cuda.mem_get_info(dev)[0]) / 2**20:.0f} MiB" if capture else ""
        log.info("%s piecewise graphs for %d sizes (%d..%d tokens, %d pieces each) in %.1f s%s",
                 "captured" if capture else "built", len(sizes), sizes[0], big, num_attn + 1,
                 time.monotonic() - t0, held)

    def _replay_piecewise(self, hb: _HostBatch, size: int, prev: StepHandle | None) -> torch.Tensor:
        """Fill the static inputs (one copy: padding, sampled rows and the attention metadata) and
        replay the size's pieces around the eager attention launches."""
        n, num_seqs, num_rows = len(hb.ids), len(hb.q_lens), len(hb.logits_rows)
        host, span, at = self._w_host, self._w_span, self._w_rows_at
        _fill_padded(host, span, n, size, ((hb.ids, 0), (hb.positions, 0), (hb.slots, -1)))
        host[at : at + num_rows] = hb.logits_rows
        host[at + num_rows : at + min(size, self.config.scheduler.max_num_seqs)] = 0
        qsl = np.zeros(num_seqs + 1, dtype=np.int32)
        np.cumsum(hb.q_lens, out=qsl[1:])
        src = self._gather_src(hb, prev)
        parts: list[list[int] | np.ndarray] = [host, qsl, hb.seq_lens, hb.tables, hb.gather_dst, src]
        dev, (_, o_qsl, o_lens, o_tables, o_dst, o_src) = self._upload(parts, dst=self._w_buf)
        if src:
            self._gather_placeholders(self._w_ids, dev[o_dst : o_dst + len(src)], dev[o_src : o_src + len(src)], prev)
        meta = AttentionMetadata(
            slot_mapping=self._w_buf[2 * span : 2 * span + size],
            query_start_loc=dev[o_qsl : o_qsl + num_seqs + 1],
            seq_lens=dev[o_lens : o_lens + num_seqs],
            block_tables=dev[o_tables : o_tables + num_seqs * hb.width].view(num_seqs, hb.width),
            max_query_len=max(hb.q_lens),
            max_seq_len=max(hb.seq_lens),
            is_decode_only=n == num_seqs,
            num_decodes=hb.num_decodes,
        )
        return self.piecewise[size].replay(meta)[:num_rows]


def _fill_padded(host: np.ndarray, stride: int, n: int, size: int,
                 columns: tuple[tuple[list[int], int], ...]) -> None:
    """A graph's static host inputs: column k's n values at k * stride, then its pad value up to size."""
    for k, (values, pad) in enumerate(columns):
        base = k * stride
        host[base : base + n] = values
        host[base + n : base + size] = pad


def _first_at_least(sizes: dict[int, object], n: int) -> int | None:
    """The smallest captured size (keys in ascending order) that holds n, if any."""
    for size in sizes:
        if size >= n:
            return size
    return None


class _EagerReplay:
    """A prefill "graph" on the CPU: the same static inputs, run eagerly into the same output."""

    def __init__(self, forward: Callable[[], torch.Tensor], out: torch.Tensor) -> None:
        self._forward = forward
        self._out = out

    def replay(self) -> None:
        self._out.copy_(self._forward())
