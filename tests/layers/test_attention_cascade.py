"""The attention layer's cascade path: metadata with a shared prefix gives plain decode's result
(the torch reference on CPU, the Triton kernels on CUDA); sliding-window layers ignore it."""

from __future__ import annotations

import pytest
import torch

from appliance.layers.attention import Attention, AttentionMetadata

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _decode_batch(block_size: int = 4, shared: int = 3, own: tuple[int, ...] = (2, 5, 1, 7)):
    """Four decode rows whose tables start with the same `shared` blocks (ids 0..shared-1)."""
    generator = torch.Generator().manual_seed(0)
    num_seqs = len(own)
    seq_lens = [shared * block_size + n for n in own]
    width = max(-(-n // block_size) for n in seq_lens)
    tables = torch.zeros((num_seqs, width), dtype=torch.int32)
    next_block = shared
    for b, n in enumerate(seq_lens):
        tables[b, :shared] = torch.arange(shared)
        extra = -(-n // block_size) - shared
        tables[b, shared : shared + extra] = torch.arange(next_block, next_block + extra)
        next_block += extra
    shape = (next_block, block_size, 2, 16)
    caches = (torch.randn(shape, generator=generator).to(DEVICE), torch.randn(shape, generator=generator).to(DEVICE))
    q = torch.randn((num_seqs, 4, 16), generator=generator).to(DEVICE)
    plain = AttentionMetadata(
        slot_mapping=torch.full((num_seqs,), -1, dtype=torch.int64, device=DEVICE),
        query_start_loc=torch.arange(num_seqs + 1, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=tables.to(DEVICE), max_query_len=1, max_seq_len=max(seq_lens), is_decode_only=True,
        num_decodes=num_seqs)
    return q, caches, plain


def _with_cascade(meta: AttentionMetadata, prefix_blocks: torch.Tensor, prefix_len: int,
                  row_prefix_lens: list[int] | None = None) -> AttentionMetadata:
    rows = None if row_prefix_lens is None else torch.tensor(row_prefix_lens, dtype=torch.int32, device=DEVICE)
    return AttentionMetadata(**{**meta.__dict__, "use_cascade": True, "cascade_prefix_blocks": prefix_blocks.to(DEVICE),
                                "cascade_prefix_len": torch.tensor([prefix_len], dtype=torch.int32, device=DEVICE),
                                "cascade_row_prefix_lens": rows})


@pytest.mark.parametrize("prefix_len", [0, 5, 12])
def test_cascade_metadata_gives_plain_decode(prefix_len: int) -> None:
    q, caches, plain = _decode_batch()
    layer = Attention(4, 2, 16, 0.25)
    expected = layer.attend(q, caches, plain)
    out = layer.attend(q, caches, _with_cascade(plain, torch.arange(3, dtype=torch.int32), prefix_len))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_a_wrong_prefix_changes_the_answer_so_the_cascade_path_runs() -> None:
    q, caches, plain = _decode_batch()
    layer = Attention(4, 2, 16, 0.25)
    wrong = _with_cascade(plain, torch.tensor([3, 4, 5], dtype=torch.int32), 12)  # not the rows' blocks
    assert not torch.allclose(layer.attend(q, caches, wrong), layer.attend(q, caches, plain), atol=1e-3)
    # ... unless no row shares it (row_prefix_lens 0): then each row's whole context is its suffix
    none_share = _with_cascade(plain, torch.tensor([3, 4, 5], dtype=torch.int32), 12, [0, 0, 0, 0])
    torch.testing.assert_close(layer.attend(q, caches, none_share), layer.attend(q, caches, plain),
                               rtol=1e-4, atol=1e-5)


def test_sliding_window_layers_ignore_the_cascade() -> None:
    q, caches, plain = _decode_batch()
    layer = Attention(4, 2, 16, 0.25, sliding_window=6)
    wrong = _with_cascade(plain, torch.tensor([3, 4, 5], dtype=torch.int32), 12)
    torch.testing.assert_close(layer.attend(q, caches, wrong), layer.attend(q, caches, plain))


def test_cascade_metadata_needs_its_fields_and_a_decode_batch() -> None:
    _, _, plain = _decode_batch()
    with pytest.raises(ValueError, match="use_cascade needs"):
        AttentionMetadata(**{**plain.__dict__, "use_cascade": True})
    with pytest.raises(ValueError, match="use_cascade needs"):
        _with_cascade(AttentionMetadata(**{**plain.__dict__, "is_decode_only": False}),
                      torch.arange(3, dtype=torch.int32), 4)
