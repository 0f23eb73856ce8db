"""Bounded-memory batching of per-observation and per-fold work.

Two shapes of batching keep memory from growing like N D^2 (or F N):

- `chunked_sum`: ``sum_c fn(data_c, w_c)`` over chunks of observations, as a loop
  inside one compiled kernel, so only one chunk's intermediates are alive;
- `map_blocks`: a compiled kernel over blocks of folds (or bootstrap draws), each
  block sized to a memory budget and to a power of two, so a kernel compiles once
  per block size, not once per number of folds.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["CHUNK_BUDGET", "chunked_sum", "default_chunk", "map_blocks"]

# Elements (float64) that one chunk of per-observation work may hold in a D x D or
# N x D intermediate: 2^23 * 8 bytes = 64 MiB.
CHUNK_BUDGET = 2**23
# Folds per compiled block, at most: bounds the padding of the last block.
MAX_BLOCK = 8192


def default_chunk(n_obs: int, width: int) -> int:
    """Observations per chunk when each holds `width` values."""
    return int(max(1, min(n_obs, CHUNK_BUDGET // max(width, 1))))


def chunked_sum(fn: Callable, data, w, chunk: int):
    """``sum_c fn(data_c, w_c)`` over chunks of `chunk` observations (a loop, so only
    one chunk's intermediates are alive); `fn` returns a pytree of arrays."""
    n = w.shape[0]
    if n <= chunk:
        return fn(data, w)
    n_full = n // chunk

    def take(start, size):
        return (
            jax.tree_util.tree_map(lambda a: lax.dynamic_slice_in_dim(a, start, size), data),
            lax.dynamic_slice_in_dim(w, start, size),
        )

    def body(i, acc):
        out = fn(*take(i * chunk, chunk))
        return jax.tree_util.tree_map(jnp.add, acc, out)

    shapes = jax.eval_shape(fn, *take(0, chunk))
    acc = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    acc = lax.fori_loop(0, n_full, body, acc)
    if n_full * chunk < n:
        tail = fn(*take(n_full * chunk, n - n_full * chunk))
        acc = jax.tree_util.tree_map(jnp.add, acc, tail)
    return acc


def block_size(rows: int, per_row: int) -> int:
    """Rows (folds, draws) per compiled block: as many as `CHUNK_BUDGET` allows, and
    for fewer rows the next power of two, so a kernel compiles once per block size,
    not once per number of folds."""
    cap = int(max(1, min(MAX_BLOCK, CHUNK_BUDGET // max(per_row, 1))))
    return min(cap, 1 << max(0, (rows - 1).bit_length()))


def map_blocks(kernel: Callable, rows: tuple, per_row: int):
    """``kernel(*block)`` over blocks of the leading axis of `rows` (padded with copies
    of the first row, then cut back), concatenated. `kernel` returns an array or a
    tuple of arrays, each with the block's leading axis."""
    n = int(rows[0].shape[0])
    block = block_size(n, per_row)
    pad = (-n) % block
    if pad:
        rows = tuple(jnp.concatenate([r, jnp.repeat(r[:1], pad, axis=0)]) for r in rows)
    outs = [kernel(*(r[s : s + block] for r in rows)) for s in range(0, n + pad, block)]
    if len(outs) == 1:
        return jax.tree_util.tree_map(lambda a: a[:n], outs[0])
    return jax.tree_util.tree_map(lambda *parts: jnp.concatenate(parts)[:n], *outs)
