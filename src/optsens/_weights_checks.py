"""Input checks of `MEstimator`: data, weights, the user's functions, folds.

Each check raises at once, naming the argument, what was received and the fix.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._batching import default_chunk
from ._errors import NonFiniteError, OptsensError
from ._folds import FoldIndex, as_fold_index
from ._pytree import TreeLayout

__all__ = [
    "check_chunk_size",
    "check_count",
    "check_data",
    "check_fold_index",
    "check_function",
    "check_loss_fn",
    "check_method",
    "check_order",
    "check_penalty",
    "check_predictor",
    "check_weights",
]


def _leaf_name(path) -> str:
    return "data" + jax.tree_util.keystr(path)


def check_data(data: Any) -> tuple[Any, int]:
    """`data` as JAX arrays with a common leading axis; returns it and that length N."""
    leaves_with_path = jax.tree_util.tree_flatten_with_path(data)[0]
    if not leaves_with_path:
        raise OptsensError(
            "`data` has no arrays in it; pass a pytree of arrays with a leading observation axis."
        )
    converted, n_obs = [], None
    for path, leaf in leaves_with_path:
        try:
            arr = jnp.asarray(leaf)
        except TypeError as exc:
            raise TypeError(
                f"`{_leaf_name(path)}` must be an array; got {type(leaf).__name__} ({exc})."
            ) from None
        if arr.ndim == 0:
            raise OptsensError(
                f"`{_leaf_name(path)}` is a scalar; every leaf of `data` needs a leading observation "
                "axis. Put constants in `loss` (or `penalty`) instead."
            )
        if n_obs is None:
            n_obs = int(arr.shape[0])
        elif arr.shape[0] != n_obs:
            raise OptsensError(
                f"the leaves of `data` disagree on the number of observations: `{_leaf_name(path)}` has "
                f"{arr.shape[0]} rows, the first leaf {n_obs}. Every leaf needs the same leading axis."
            )
        if jnp.issubdtype(arr.dtype, jnp.inexact):
            finite = np.isfinite(np.asarray(arr)).reshape(arr.shape[0], -1).all(axis=1)
            if not finite.all():
                bad = np.flatnonzero(~finite)
                raise NonFiniteError(
                    f"`{_leaf_name(path)}` has NaN or infinite values in {bad.size} observations "
                    f"(first: {bad[:5].tolist()}). Remove or impute them before fitting; optsens does "
                    "not drop observations silently."
                )
        converted.append(arr)
    if n_obs == 0:
        raise OptsensError("`data` has zero observations.")
    treedef = jax.tree_util.tree_structure(data)
    return jax.tree_util.tree_unflatten(treedef, converted), int(n_obs)


def check_weights(weights: Any, n_obs: int, dtype) -> jax.Array:
    """(N,) non-negative finite weights, not all zero (default ones)."""
    if weights is None:
        return jnp.ones((n_obs,), dtype)
    arr = np.asarray(weights, dtype=float)
    if arr.shape != (n_obs,):
        raise OptsensError(
            f"`weights` must have shape ({n_obs},), one weight per observation of `data`; got shape "
            f"{arr.shape}."
        )
    if not np.all(np.isfinite(arr)):
        raise NonFiniteError(
            f"`weights` has non-finite entries at {np.flatnonzero(~np.isfinite(arr))[:5].tolist()}."
        )
    if np.any(arr < 0):
        raise OptsensError(
            f"`weights` must be non-negative; entries {np.flatnonzero(arr < 0)[:5].tolist()} are negative."
        )
    if not np.any(arr > 0):
        raise OptsensError("`weights` are all zero: no observation is left to fit.")
    return jnp.asarray(arr, dtype)


def _first_datum(data):
    return jax.tree_util.tree_map(lambda a: a[0], data)


def check_function(fn, kind: str, theta0, data) -> None:
    """`loss(theta, datum)` returns a scalar; `g(theta, datum)` a pytree like `theta0`."""
    name = "loss" if kind == "loss" else "g"
    try:
        out = jax.eval_shape(fn, theta0, _first_datum(data))
    except Exception as exc:
        raise type(exc)(
            f"calling `{name}(theta0, datum)` on the first observation failed: {exc}. `{name}` takes "
            "the parameters and ONE observation (each leaf of `data` without its leading axis)."
        ) from exc
    if kind == "loss":
        if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
            raise OptsensError(
                f"`loss(theta, datum)` must return a scalar, the loss of one observation; it returned "
                f"{jax.tree_util.tree_map(lambda s: s.shape, out)}. optsens vmaps it over observations."
            )
        return
    if (
        TreeLayout.of(out).treedef != TreeLayout.of(theta0).treedef
        or tuple(s.shape for s in jax.tree_util.tree_leaves(out)) != TreeLayout.of(theta0).shapes
    ):
        raise OptsensError(
            "`g(theta, datum)` must return a pytree shaped like `theta0` (one observation's estimating "
            f"function); it returned {jax.tree_util.tree_map(lambda s: s.shape, out)}, `theta0` is "
            f"{jax.tree_util.tree_map(np.shape, theta0)}."
        )


def check_penalty(penalty, kind: str, theta0) -> None:
    if penalty is None:
        return
    if not callable(penalty):
        raise TypeError(f"`penalty` must be a function of theta or None; got {type(penalty).__name__}.")
    try:
        out = jax.eval_shape(penalty, theta0)
    except Exception as exc:
        raise type(exc)(f"calling `penalty(theta0)` failed: {exc}") from exc
    if kind == "loss" and (not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ()):
        raise OptsensError(f"`penalty(theta)` must return a scalar (added to the total loss); got {out}.")
    if kind == "equation" and TreeLayout.of(out).treedef != TreeLayout.of(theta0).treedef:
        raise OptsensError(
            "with `MEstimator(g, ...)`, `penalty(theta)` is added to G and must return a pytree shaped "
            f"like `theta0`; got {out}. For a scalar penalty use `MEstimator.from_loss`."
        )


def check_predictor(predictor, theta0, data) -> int:
    """`linear_predictor(theta, datum)` returns a real scalar or 1-D array; returns its length k."""
    if predictor is None:
        return 0
    if not callable(predictor):
        raise TypeError(
            f"`linear_predictor` must be a function (theta, datum) -> scalar or 1-D array, or None; got "
            f"{type(predictor).__name__}."
        )
    try:
        out = jax.eval_shape(predictor, theta0, _first_datum(data))
    except Exception as exc:
        raise type(exc)(
            f"calling `linear_predictor(theta0, datum)` on the first observation failed: {exc}"
        ) from exc
    if (
        not isinstance(out, jax.ShapeDtypeStruct)
        or out.ndim > 1
        or not jnp.issubdtype(out.dtype, jnp.floating)
    ):
        raise OptsensError(
            "`linear_predictor(theta, datum)` must return a real scalar or 1-D array (the linear "
            f"predictor of one observation, e.g. `datum['x'] @ theta`); it returned {out}."
        )
    return int(np.prod(out.shape, dtype=int))


def check_chunk_size(chunk_size: Any, n_obs: int, dim: int) -> tuple[int, int]:
    """Observations per chunk for Hessian-level and gradient-level work: `chunk_size`
    for both, or by default as many as fit `CHUNK_BUDGET` (D^2, resp. 4 D, values each)."""
    if chunk_size is None:
        return default_chunk(n_obs, dim**2), default_chunk(n_obs, 4 * dim)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise OptsensError(f"`chunk_size` must be a positive integer; got {chunk_size!r}.")
    return int(chunk_size), int(chunk_size)


def check_order(order: Any) -> int:
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
        raise OptsensError(f"`order` must be a positive integer; got {order!r}.")
    return int(order)


def check_method(method: Any, order: Any, allowed: tuple[str, ...]) -> int:
    """`method` one of `allowed`, and a positive `order` (1 for the Newton step); returns the order."""
    order = check_order(order)
    if method not in allowed:
        raise OptsensError(f"`method` must be one of {allowed}; got {method!r}.")
    if method == "newton" and order != 1:
        raise OptsensError(
            f"method='newton' is a single Newton step and has no order; got `order`={order}. Use "
            "method='ij' for higher orders."
        )
    return order


def check_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise OptsensError(f"`{name}` must be a positive integer; got {value!r}.")
    return int(value)


def check_loss_fn(loss_fn: Any, kind: str, default: Any) -> Any:
    """The held-out loss of `cv_score`: `loss_fn`, or the model's own loss."""
    if loss_fn is None:
        if kind != "loss":
            raise OptsensError(
                "`loss_fn` is required for an MEstimator built from an estimating function `g`: "
                "pass loss_fn(theta, datum) to score the held-out observations."
            )
        return default
    if not callable(loss_fn):
        raise TypeError(
            f"`loss_fn` must be a function (theta, datum) -> scalar; got {type(loss_fn).__name__}."
        )
    return loss_fn


def check_fold_index(folds: Any, weights: np.ndarray) -> FoldIndex:
    """`folds` checked and padded (`as_fold_index`), and no fold may hold every
    observation of nonzero weight."""
    fi = as_fold_index(folds, int(weights.shape[0]))
    positive = np.asarray(weights) > 0
    if positive.any():
        kept = positive.sum() - np.sum(positive[fi.index] & fi.valid, axis=1)
        empty = np.flatnonzero(kept == 0)
        if empty.size:
            raise OptsensError(
                f"leaving out `folds`[{int(empty[0])}] drops every observation with a nonzero weight; "
                "nothing is left to fit. Use smaller folds."
            )
    return fi
