"""Global decode batches: which of them this rank runs, and the seed each one samples with.

A single process decodes prompts in consecutive batches of ``batch_size``; under ``mlx.launch``
each rank takes a contiguous block of those same batches (:func:`mlxgate.distributed.shard`), so
greedy output is identical token for token. Sampled output (temp > 0) is too only if a batch's
random stream does not depend on which batches ran before it in the same process: a seeded call
therefore reseeds before every batch with :func:`batch_seed` of (seed, global batch index).
"""

from __future__ import annotations

import numpy as np

from mlxgate import distributed


def rank_batches(n_items: int, batch_size: int) -> list[tuple[int, list[int]]]:
    """This rank's global decode batches as (batch index b, item indices) pairs; batch b holds
    items [b * batch_size, (b + 1) * batch_size). Size 1: every batch."""
    size = max(batch_size, 1)
    batches = [(b, list(range(s, min(s + size, n_items)))) for b, s in enumerate(range(0, n_items, size))]
    return distributed.shard(batches)[1]


def batch_seed(seed: int | None, b: int) -> int | None:
    """The seed of global batch ``b`` in a call seeded with ``seed`` (None: unseeded, None).

    Batch 0 keeps ``seed`` itself, so a one-batch run samples exactly as an unsharded seeded call
    always did; later batches get a 64-bit hash of (seed, b) (numpy's SeedSequence), distinct per
    batch and independent of how the batches are dealt to ranks."""
    if seed is None:
        return None
    if b == 0:
        return seed
    return int(np.random.SeedSequence([seed % 2**64, b]).generate_state(1, np.uint64)[0])
