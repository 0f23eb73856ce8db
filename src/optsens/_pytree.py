"""Flattening pytrees of arrays to one vector and back, with a hashable layout.

`jax.flatten_util.ravel_pytree` returns a closure, which cannot key a compilation
cache. `TreeLayout` records the same information (tree structure, leaf shapes and
dtypes) as a hashable value, so compiled kernels are reused by every problem of the
same shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["TreeLayout", "as_float_tree"]


@dataclasses.dataclass(frozen=True)
class TreeLayout:
    """Structure, shapes and dtypes of a pytree of arrays (hashable)."""

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[Any, ...]

    @classmethod
    def of(cls, tree: Any) -> TreeLayout:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        return cls(
            treedef,
            tuple(tuple(np.shape(x)) for x in leaves),
            tuple(jnp.result_type(x) for x in leaves),
        )

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(np.prod(s, dtype=int)) for s in self.shapes)

    @property
    def size(self) -> int:
        return sum(self.sizes)

    @property
    def dtype(self) -> Any:
        return jnp.result_type(*self.dtypes) if self.dtypes else jnp.float64

    def ravel(self, tree: Any) -> jax.Array:
        """Concatenate the leaves of `tree` (laid out as `self`) into one vector."""
        leaves = jax.tree_util.tree_leaves(tree)
        if not leaves:
            return jnp.zeros((0,), self.dtype)
        if len(leaves) == 1:  # the common case: no concatenation (an eager call costs ~50 us)
            return jnp.ravel(jnp.asarray(leaves[0], self.dtype))
        return jnp.concatenate([jnp.ravel(jnp.asarray(x, self.dtype)) for x in leaves])

    def unravel(self, flat: jax.Array) -> Any:
        """Inverse of `ravel` along the last axis; leading axes are kept as batch axes."""
        batch = flat.shape[:-1]
        leaves, start = [], 0
        for shape, size, dtype in zip(self.shapes, self.sizes, self.dtypes, strict=True):
            piece = flat[..., start : start + size].reshape(batch + shape)
            leaves.append(piece.astype(jnp.result_type(dtype, flat.dtype)))
            start += size
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def leaf_names(self) -> list[str]:
        """A readable name for each flat coordinate, e.g. ``['beta'][3]``."""
        paths = jax.tree_util.tree_flatten_with_path(
            jax.tree_util.tree_unflatten(self.treedef, list(range(len(self.shapes))))
        )[0]
        names = []
        for (path, _), shape in zip(paths, self.shapes, strict=True):
            prefix = jax.tree_util.keystr(path) or "theta"
            for idx in np.ndindex(*shape) if shape else [()]:
                names.append(prefix + ("" if not idx else str(list(idx))))
        return names


def as_float_tree(tree: Any, name: str) -> Any:
    """Convert every leaf to an inexact JAX array (integers are promoted to float).

    Raises a `TypeError` naming `name` if a leaf is not array-like.
    """

    def convert(x):
        try:
            arr = jnp.asarray(x)
        except TypeError as exc:
            raise TypeError(
                f"`{name}` must be a pytree of arrays or numbers; it has a leaf of type "
                f"{type(x).__name__} ({exc}). Convert it with jnp.asarray first."
            ) from None
        if not jnp.issubdtype(arr.dtype, jnp.inexact):
            arr = arr.astype(jnp.result_type(float))
        return arr

    return jax.tree_util.tree_map(convert, tree)
