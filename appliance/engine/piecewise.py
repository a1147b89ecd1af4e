"""Steps that no other graph serves, as CUDA graphs cut at each layer's attention ("piecewise").

Decode graphs serve steps of one-token rows, lone-prefill graphs a single prompt. Everything else
(a chunked-prefill step with decodes riding along, several prompts at once) ran eagerly: every
kernel launched from Python, ~12 per layer. On an H200 a 135M W1 chunked-prefill step of 8,192
tokens spent ~40 ms of host time for ~6 ms of GPU work (bench/results/*-b78de70-profile-135m-w1*),
and the 8B's mixed steps of a Poisson load pay the same launch cost on every decode row's gap.

What varies between such steps is only the attention: which sequences, how many query tokens
each, their tables. Every other kernel of a layer (norms, projections, rotary + KV store, MLP)
depends on the token count alone. So for a ladder of token counts the forward is captured as
L + 1 graphs, cut where each layer attends:

    piece 0: embed, layer 0 up to its q (k/v stored through the static slot mapping) -> q buffer
    attention 0, eager, over the step's live metadata: q buffer -> out buffer
    piece 1: layer 0's o_proj and MLP, layer 1 up to its q -> q buffer
    ...
    piece L: layer L-1's o_proj and MLP, the final norm, the logits of the sampled rows

A step pads its tokens to the next size (padding tokens: slot -1, no store; never attended,
never sampled; rows are independent everywhere else) and replays the pieces with the attention
launches between them. All pieces (and the decode and lone-prefill graphs) share the runner's one
memory pool: a size's pieces always replay in their capture order, one step at a time on one
stream, and what one step leaves allocated in the pool (the residual stream between two pieces)
is dead by its end. q and the attention output cross each cut through static buffers shared by
every size, as do the logits of the sampled rows; so the pieces hold one layer's activations, not
one per layer.

On CPU (tests) nothing is captured: a "replay" runs the forward over the same static inputs with
the attention of each cut computed from the live metadata into the same buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from appliance.layers.attention import Attention, AttentionMetadata


def piecewise_sizes(max_tokens: int) -> list[int]:
    """The token-count ladder up to max_tokens, and max_tokens itself: 16..256 doubling (small steps
    are memory-bound: padding rows cost little), then steps of 128 to 1024, of 256 to 2048 and of 512
    (compute-bound from there: a step pads by less than a quarter of its tokens)."""
    sizes: list[int] = []
    size = 16
    while size < max_tokens:
        sizes.append(size)
        size = size * 2 if size < 256 else size + (128 if size < 1024 else 256 if size < 2048 else 512)
    return [*sizes, max_tokens] if max_tokens >= 1 else []


@dataclass
class _Cut:
    """One layer's attention between two pieces: q from `q`, the result into `out` (static views)."""

    attn: Attention
    q: torch.Tensor
    kv_cache: tuple[torch.Tensor, torch.Tensor]
    out: torch.Tensor


class PiecewiseForward:
    """One token count's forward: `pieces` (CUDA graphs; none on CPU, where `eager` runs it) around `cuts`."""

    def __init__(self, pieces: list[torch.cuda.CUDAGraph], cuts: list[_Cut], logits: torch.Tensor,
                 eager: Callable[[AttentionMetadata], None] | None = None) -> None:
        self.pieces = pieces
        self.cuts = cuts
        self.logits = logits  # [rows, vocab], the static logits of this size's sampled rows
        self._eager = eager

    def replay(self, meta: AttentionMetadata) -> torch.Tensor:
        """Run the forward for the step whose attention `meta` describes; the static logits."""
        if self._eager is not None:
            self._eager(meta)
            return self.logits
        for piece, cut in zip(self.pieces, self.cuts, strict=False):
            piece.replay()
            cut.attn.attend(cut.q, cut.kv_cache, meta, out=cut.out)
        self.pieces[-1].replay()
        return self.logits


class Recorder:
    """Installed as every attention module's `cut` while a size's forward is recorded.

    capture: each call ends the piece being captured (after copying q into the static q buffer)
    and begins the next one. Not capturing (the warm-up before a capture, and CPU replays): with
    `live` set, the attention runs over the live metadata into the out buffer; without, it is
    skipped (the warm-up only compiles the pieces' kernels).
    """

    def __init__(self, q_buf: torch.Tensor, out_buf: torch.Tensor, *, capture: bool = False,
                 pool: object = None) -> None:
        self.q_buf = q_buf  # flat, model dtype, at least max tokens x Hq x D
        self.out_buf = out_buf
        self.capture = capture
        self.pool = pool
        self.live: AttentionMetadata | None = None
        self.cuts: list[_Cut] = []
        self.pieces: list[torch.cuda.CUDAGraph] = []
        self.graph: torch.cuda.CUDAGraph | None = None

    def begin(self) -> None:
        if self.capture:
            if self.pool is None:  # one pool for every piece (CUDAGraph.pool() only exists after a capture)
                self.pool = torch.cuda.graph_pool_handle()
            self.graph = torch.cuda.CUDAGraph()
            self.graph.capture_begin(pool=self.pool)

    def end(self) -> None:
        if self.capture:
            assert self.graph is not None
            self.graph.capture_end()
            self.pieces.append(self.graph)
            self.graph = None

    def __call__(self, attn: Attention, q: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                 meta: AttentionMetadata) -> torch.Tensor:
        numel = q.numel()
        q_static = self.q_buf[:numel].view(q.shape)
        out = self.out_buf[:numel].view(q.shape)
        self.cuts.append(_Cut(attn, q_static, kv_cache, out))
        if self.capture:
            q_static.copy_(q)  # q itself is freed: one buffer for every layer's q
            self.end()
            self.begin()
        elif self.live is not None:  # a CPU replay: the same buffers, the attention run here
            q_static.copy_(q)
            attn.cut = None
            try:
                attn.attend(q_static, kv_cache, self.live, out=out)
            finally:
                attn.cut = self
        return out


def attention_modules(model: torch.nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


class cutting:  # noqa: N801 - a context manager used as a statement
    """`with cutting(model, recorder):` every attention module hands its calls to the recorder."""

    def __init__(self, model: torch.nn.Module, recorder: Recorder) -> None:
        self.modules = attention_modules(model)
        self.recorder = recorder

    def __enter__(self) -> Recorder:
        for m in self.modules:
            m.cut = self.recorder
        return self.recorder

    def __exit__(self, *exc: object) -> None:
        for m in self.modules:
            m.cut = None
