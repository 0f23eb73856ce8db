"""Folds (sets of observations to leave out) and bootstrap weights for `MEstimator`.

A fold is a set ``S`` of observation indices. Leaving it out is the weight
perturbation ``w -> w - w * 1_S``; a bootstrap draw is ``w -> w * counts``. Folds of
different sizes are padded to a common size ``m`` with a validity mask, so one
compiled kernel serves every fold: the padded slots carry weight zero.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._errors import OptsensError

__all__ = ["FoldIndex", "as_fold_index", "bootstrap_counts", "kfold", "leave_k_out"]

# `leave_k_out` refuses to enumerate more subsets than this.
_MAX_ENUMERATED = 1_000_000


class FoldIndex(NamedTuple):
    """Folds as a padded integer array.

    - `index`: ``(F, m)`` int array; row ``f`` lists the observations of fold ``f``
      in its first ``sizes[f]`` entries and is padded with index 0.
    - `valid`: ``(F, m)`` bool array, False on the padding.
    - `sizes`: ``(F,)`` int array, the number of observations of each fold.
    """

    index: np.ndarray
    valid: np.ndarray
    sizes: np.ndarray

    @property
    def n_folds(self) -> int:
        return int(self.index.shape[0])

    def members(self, f: int) -> np.ndarray:
        """The observation indices of fold `f`."""
        return self.index[f, : self.sizes[f]]


def _as_index_array(fold: Any, f: int, name: str) -> np.ndarray:
    arr = np.asarray(fold)
    if arr.dtype == bool:
        raise OptsensError(
            f"`{name}`[{f}] is a boolean mask; folds are arrays of observation indices. "
            "Convert a mask with np.flatnonzero(mask)."
        )
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise OptsensError(
            f"`{name}`[{f}] must be a 1-D array of observation indices; got shape {arr.shape}."
        )
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if (
            np.issubdtype(arr.dtype, np.floating)
            and np.all(np.isfinite(arr))
            and np.all(arr == np.round(arr))
        ):
            arr = arr.astype(np.int64)
        else:
            raise OptsensError(
                f"`{name}`[{f}] must hold integer observation indices; got dtype {arr.dtype} "
                f"(first entries {arr[:3].tolist()})."
            )
    return arr.astype(np.int64)


def as_fold_index(folds: Any, n_obs: int, *, name: str = "folds") -> FoldIndex:
    """Check and pad `folds` for `n_obs` observations.

    `folds` is ``"loo"`` (the `n_obs` singletons), a 2-D integer array (one fold per
    row) or a sequence of 1-D integer arrays (folds may differ in size). Raises an
    `OptsensError` naming the fold at fault for an empty fold, an index outside
    ``[0, n_obs)``, a repeated index within a fold, or a fold that holds every
    observation.
    """
    if isinstance(folds, str):
        if folds != "loo":
            raise OptsensError(
                f'`{name}` must be "loo" or index arrays; got the string {folds!r}. '
                "Use optsens.kfold(n, k) for k-fold cross-validation."
            )
        index = np.arange(n_obs, dtype=np.int64)[:, None]
        return FoldIndex(index, np.ones_like(index, dtype=bool), np.ones(n_obs, dtype=np.int64))
    if isinstance(folds, FoldIndex):
        return folds
    if isinstance(folds, (int, np.integer)):
        raise OptsensError(
            f"`{name}` must be index arrays, not the integer {folds}. For {folds}-fold "
            f"cross-validation pass optsens.kfold(n_obs, {folds})."
        )
    if isinstance(folds, (np.ndarray, jax.Array)) and np.ndim(folds) == 2:
        rows = list(np.asarray(folds))
    elif isinstance(folds, (Sequence, np.ndarray, jax.Array)):
        rows = list(folds)
    else:
        raise OptsensError(
            f'`{name}` must be "loo", a 2-D integer array or a list of index arrays; '
            f"got {type(folds).__name__}."
        )
    if not rows:
        raise OptsensError(f"`{name}` is empty: pass at least one fold.")
    arrays = [_as_index_array(fold, f, name) for f, fold in enumerate(rows)]
    for f, arr in enumerate(arrays):
        if arr.size == 0:
            raise OptsensError(f"`{name}`[{f}] is empty: every fold must leave out at least one observation.")
        bad = (arr < 0) | (arr >= n_obs)
        if bad.any():
            raise OptsensError(
                f"`{name}`[{f}] has indices outside [0, {n_obs}) (there are {n_obs} observations): "
                f"{arr[bad][:5].tolist()}. Negative indices are not accepted; index observations "
                f"0..{n_obs - 1}."
            )
        uniq, counts = np.unique(arr, return_counts=True)
        if (counts > 1).any():
            raise OptsensError(
                f"`{name}`[{f}] repeats the indices {uniq[counts > 1][:5].tolist()}; a fold is a set "
                "of observations. Remove the duplicates (np.unique), or use weights (e.g. "
                "`bootstrap`) to count an observation more than once."
            )
        if uniq.size == n_obs:
            raise OptsensError(
                f"`{name}`[{f}] holds all {n_obs} observations: leaving it out drops every "
                "observation and leaves nothing to fit."
            )
    sizes = np.array([a.size for a in arrays], dtype=np.int64)
    m = int(sizes.max())
    index = np.zeros((len(arrays), m), dtype=np.int64)
    valid = np.zeros((len(arrays), m), dtype=bool)
    for f, arr in enumerate(arrays):
        index[f, : arr.size] = arr
        valid[f, : arr.size] = True
    return FoldIndex(index, valid, sizes)


def kfold(n_obs: int, k: int, *, seed: int | None = None) -> list[np.ndarray]:
    """The `k` folds of k-fold cross-validation over `n_obs` observations.

    Contiguous blocks, sizes differing by at most one (as scikit-learn's `KFold`);
    with `seed`, the observations are shuffled first by `numpy.random.default_rng(seed)`.

    **Arguments:** `n_obs`, the number of observations; `k`, the number of folds
    (``2 <= k <= n_obs``); `seed`, optional shuffling seed.

    **Returns:** a list of `k` sorted integer arrays that partition ``range(n_obs)``.

    **Example:** ``model.cv_score(optsens.kfold(model.n_obs, 10), order=2)``.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 2 <= k <= n_obs:
        raise OptsensError(f"`k` must be an integer in [2, n_obs={n_obs}]; got {k!r}.")
    order = np.arange(n_obs)
    if seed is not None:
        order = np.random.default_rng(seed).permutation(n_obs)
    return [np.sort(block) for block in np.array_split(order, int(k))]


def leave_k_out(n_obs: int, k: int, *, count: int | None = None, seed: int = 0) -> np.ndarray:
    """Leave-`k`-out folds: every subset of size `k` (``count=None``) or `count`
    subsets drawn uniformly at random without repetition inside a subset.

    **Returns:** an integer array of shape ``(n_folds, k)``, rows sorted.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k < n_obs:
        raise OptsensError(f"`k` must be an integer in [1, n_obs={n_obs}); got {k!r}.")
    if count is None:
        total = math.comb(n_obs, int(k))
        if total > _MAX_ENUMERATED:
            raise OptsensError(
                f"there are C({n_obs}, {k}) = {total:.3g} subsets of size {k}; too many to enumerate. "
                "Pass `count` to draw that many at random."
            )
        return np.array(list(itertools.combinations(range(n_obs), int(k))), dtype=np.int64)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise OptsensError(f"`count` must be a positive integer; got {count!r}.")
    rng = np.random.default_rng(seed)
    return np.sort(
        np.stack([rng.choice(n_obs, size=int(k), replace=False) for _ in range(int(count))]), axis=1
    )


def _draw_counts(key: jax.Array, n_obs: int) -> jax.Array:
    """Multinomial(n_obs, 1/n_obs) counts: how often each observation is drawn."""
    draws = jax.random.randint(key, (n_obs,), 0, n_obs)
    return jnp.zeros((n_obs,), jnp.int32).at[draws].add(1)


def bootstrap_counts(key: jax.Array, n_obs: int, n_draws: int) -> jax.Array:
    """The resampling counts of `n_draws` nonparametric bootstrap draws.

    Draw ``b`` resamples `n_obs` observations with replacement; ``counts[b, n]`` is
    how often observation ``n`` was drawn. These are exactly the counts that
    `MEstimator.bootstrap(n_draws, key)` uses (keys ``jax.random.split(key, n_draws)``).

    **Returns:** an int32 array of shape ``(n_draws, n_obs)``.
    """
    keys = jax.random.split(key, n_draws)
    return jax.vmap(lambda k: _draw_counts(k, n_obs))(keys)
