"""FLOP formulas for MFU: the matmuls of every layer plus the attention each layer's family
really computes, causal-correct. A whole step's count, which reads the layer plan, is
`longtrain.model.flops.step_flops`; the backends use the per-layer formulas here.

Legend: T sequence length, h hidden size, I MLP width, V vocabulary, Hq / Hkv query / key-value
heads, D head dim. A multiply-add is 2 FLOPs; the backward counts twice the forward (so a step
is 3x its forward), recomputation is not counted (MFU counts the model's work, not the
policy's), nor are norms, RoPE, softmax exponentials or the optimizer.

Per token and layer, the projections: q|k|v 2h(Hq + 2Hkv)D, output 2 Hq D h, SwiGLU 6 h I
(a linear-attention layer's output gate adds 2 h Hq D); once per token the LM head 2 h V.

Attention per sequence and layer, forward (Q K^T and P V: 4 D per (query, key) pair and head):
- softmax (dense, ring, ulysses, ulysses_ring, allgather): the causal pairs, T (T + 1) / 2 per
  head. Every CP layout computes the same pairs (zigzag balances them, it does not add any).
  With packed documents the useful pairs are those within each document, the sum over
  documents of L (L + 1) / 2 (`document_pairs`); a token at position p of its document (0
  first) is the query of p + 1 of them, so the count is also the sum over tokens of p + 1
  (`pairs_of_positions`), which adds up over any split of the tokens (CP shards, DP ranks).
- s2: only the (query block, key block) pairs the head's pattern visits (a diagonal block has
  bs (bs + 1) / 2 pairs, any other bs^2); dense heads and the layers `attention.s2` keeps dense
  count as softmax.
- linear (lightning attention, LASP-1/2): the masked quadratic inside each block of C tokens,
  C (C + 1) / 2 pairs per block at 4 D each, plus per token the query-state product and the
  state update, 2 D^2 each.
"""

from __future__ import annotations

from typing import Any

# kernels/longtrain_kernels/lightning_attn's block (the chunk of its masked quadratic form)
LIGHTNING_BLOCK = 64


def causal_pairs(t: int) -> int:
    return t * (t + 1) // 2


def document_pairs(lengths: Any) -> int:
    """Causal (query, key) pairs within documents of the given lengths: sum L (L + 1) / 2."""
    return sum(causal_pairs(int(n)) for n in lengths)


def pairs_of_positions(positions: Any) -> int:
    """Causal same-document pairs whose query is one of the given tokens, from their positions
    within their documents (0 at each document's first token; a tensor of any shape):
    sum (p + 1). Over all the tokens of packed sequences it equals `document_pairs` of their
    documents, however the tokens are split."""
    return int((positions.long() + 1).sum())


def s2_pairs(pattern: Any, t: int) -> int:
    """(query, key) pairs S2 visits in a length-t sequence, summed over the pattern's heads."""
    bs = pattern.block_size
    n = -(-t // bs)
    full_blocks = t // bs
    total = 0
    for g in range(pattern.num_heads):
        if pattern.is_dense_head(g):
            total += causal_pairs(t)
            continue
        r, s, local = pattern.vertical_phase(g), pattern.vert_stride, pattern.local_blocks
        for i in range(n):
            rows = bs if i < full_blocks else t - i * bs
            near = min(local, i + 1)
            # vertical blocks: j in [0, i - local] with j % s == r
            far_end = i - local + 1
            far = max(0, (far_end - r + s - 1) // s) if far_end > 0 else 0
            # off-diagonal blocks are full (bs keys); the diagonal one is triangular
            total += (near - 1 + far) * rows * bs + causal_pairs(rows)
    return total


def linear_pairs(t: int, block: int = LIGHTNING_BLOCK) -> int:
    full, rest = divmod(t, block)
    return full * causal_pairs(block) + causal_pairs(rest)


def layer_attention_forward(kind: str, *, t: int, heads: int, head_dim: int,
                            pattern: Any = None) -> float:
    """Forward attention FLOPs of one layer on one length-t sequence (`kind`: softmax | s2 |
    linear; `pattern` for s2)."""
    d = head_dim
    if kind == "softmax":
        return 4.0 * d * heads * causal_pairs(t)
    if kind == "s2":
        return 4.0 * d * s2_pairs(pattern, t)
    if kind == "linear":
        return heads * (4.0 * d * linear_pairs(t) + 4.0 * d * d * t)
    raise ValueError(f"unknown attention kind {kind!r} (softmax | s2 | linear)")
