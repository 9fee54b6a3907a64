"""Per-domain length upsampling for long-context continual training (Fu et al. 2024, "Data
Engineering for Scaling Language Models to 128K Context": keep the domain mixture, up-weight
long documents within each domain).

For a domain d with token count T_d, of which L_d are in long documents (more than
`threshold` tokens) and S_d = T_d - L_d in the others, every document is drawn

    c_d * factor times if it is long, c_d times otherwise,  c_d = T_d / (factor * L_d + S_d)

in expectation, so the domain keeps T_d tokens in expectation (its share of the corpus is
unchanged) while a long document appears `factor` times as often as a short one: long
documents are repeated, short ones partly dropped. A domain with only long or only short
documents is unchanged. Expected counts are realized by systematic sampling in a seeded random
order within each (domain, long/short) group: every document gets floor or ceil of its
expected count and each group's total is within one document of its expectation.
"""

from __future__ import annotations

import numpy as np


def upsample_counts(domains: np.ndarray, content_lengths: np.ndarray, lengths: np.ndarray, *,
                    threshold: int, factor: float, seed: int) -> np.ndarray:
    """How many times each document appears (int64, same shape as `domains`).

    domains: per-document domain index; content_lengths: tokens without BOS/EOS (compared to
    `threshold`); lengths: packed tokens (the budget being kept).
    """
    n = len(domains)
    counts = np.ones(n, dtype=np.int64)
    if threshold <= 0 or factor == 1.0 or n == 0:
        return counts
    rng = np.random.default_rng([seed, 0x5eed])
    long = content_lengths > threshold
    lengths = lengths.astype(np.float64)
    for d in np.unique(domains):
        in_d = domains == d
        long_tokens = lengths[in_d & long].sum()
        short_tokens = lengths[in_d & ~long].sum()
        if long_tokens == 0 or short_tokens == 0:
            continue
        scale = (long_tokens + short_tokens) / (factor * long_tokens + short_tokens)
        for members, expected in ((in_d & long, scale * factor), (in_d & ~long, scale)):
            idx = np.flatnonzero(members)
            idx = idx[rng.permutation(len(idx))]
            cum = rng.random() + expected * np.arange(1, len(idx) + 1)
            counts[idx] = np.floor(cum).astype(np.int64) - np.floor(cum - expected).astype(np.int64)
    return counts
