"""Exact refits without each fold: serial with a progress bar, or through any
`concurrent.futures.Executor` (thread or process pool, a `dask.distributed`
client's ``get_executor()``).

Each refit is `newton_solve` on ``sum_n w_n loss_n + penalty`` (or ``G``) with the
fold's weights set to zero, warm-started from an approximation. What a worker
needs travels as one picklable `RefitPayload`; arrays travel as NumPy, so a fresh
worker process switches on float64 before it makes JAX arrays.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._errors import NotASolutionError
from ._newton import newton_solve
from ._pytree import TreeLayout
from ._weights_model import ObservationModel, TotalEquation, TotalObjective

__all__ = ["RefitPayload", "run_refits"]

# Tasks submitted to an executor by default: enough to balance the workers, few
# enough that each task's overhead (pickling the data, compiling) is paid rarely.
_DEFAULT_TASKS = 64


@dataclasses.dataclass(frozen=True)
class RefitPayload:
    """What a refit worker needs (picklable when the user's functions are)."""

    fn: Callable[..., Any]
    kind: str
    penalty: Callable[..., Any] | None
    theta0: Any
    data: Any
    weights: np.ndarray
    x64: bool
    tol: float
    max_steps: int

    @classmethod
    def of(cls, model: ObservationModel, theta0, data, weights, tol: float, max_steps: int) -> RefitPayload:
        return cls(
            model.fn,
            model.kind,
            model.penalty,
            theta0,
            data,  # JAX arrays: no transfer per refit in threads; they pickle as NumPy for processes
            np.asarray(weights),
            bool(jax.config.jax_enable_x64),
            float(tol),
            int(max_steps),
        )

    def __reduce__(self):
        # Pickle arrays as NumPy: a worker process must switch on float64 (x64) before it
        # makes JAX arrays, or they would be truncated to float32 on unpickling.
        to_numpy = lambda tree: jax.tree_util.tree_map(np.asarray, tree)  # noqa: E731
        fields = tuple(getattr(self, f.name) for f in dataclasses.fields(self))
        fields = fields[:3] + (to_numpy(self.theta0), to_numpy(self.data)) + fields[5:]
        return (RefitPayload, fields)


def refit_one(payload: RefitPayload, fold_number: int, members: np.ndarray, start: np.ndarray) -> np.ndarray:
    """The exact fit without `members`, from `start` (flat), as a flat NumPy vector."""
    if bool(jax.config.jax_enable_x64) != payload.x64:
        jax.config.update("jax_enable_x64", payload.x64)
    model = ObservationModel(payload.fn, payload.kind, payload.penalty, TreeLayout.of(payload.theta0))
    fn = TotalObjective(model) if payload.kind == "loss" else TotalEquation(model)
    weights = payload.weights.copy()
    weights[members] = 0.0
    try:
        solution = newton_solve(
            fn,
            model.theta.unravel(jnp.asarray(start)),
            0.0,
            args=(payload.data, jnp.asarray(weights)),
            objective=payload.kind == "loss",
            tol=payload.tol,
            max_steps=payload.max_steps,
        )
    except NotASolutionError as exc:
        raise NotASolutionError(f"the exact refit without fold {fold_number} failed: {exc}") from exc
    return np.asarray(model.theta.ravel(solution))


def refit_group(
    payload: RefitPayload, fold_numbers: Sequence[int], rows: Sequence[np.ndarray], starts
) -> np.ndarray:
    """`refit_one` over several folds: one executor task."""
    return np.stack(
        [refit_one(payload, int(f), r, s) for f, r, s in zip(fold_numbers, rows, starts, strict=True)]
    )


def run_refits(
    payload: RefitPayload,
    rows: Sequence[np.ndarray],
    starts: np.ndarray,
    executor: concurrent.futures.Executor | None,
    tasks: int | None,
    progress: bool,
) -> np.ndarray:
    """All refits, (F, D): serially, or as `tasks` groups submitted to `executor`."""
    n_folds = len(rows)
    results = np.empty((n_folds, starts.shape[1]), dtype=starts.dtype)
    bar = _progress_bar(n_folds, progress)
    try:
        if executor is None:
            for f in range(n_folds):
                results[f] = refit_one(payload, f, rows[f], starts[f])
                bar.update(1)
        else:
            n_tasks = min(n_folds, _DEFAULT_TASKS if tasks is None else max(1, int(tasks)))
            groups = np.array_split(np.arange(n_folds), n_tasks)
            futures = {
                executor.submit(refit_group, payload, g, [rows[f] for f in g], starts[g]): g
                for g in groups
                if g.size
            }
            for future in concurrent.futures.as_completed(futures):
                g = futures[future]
                results[g] = future.result()
                bar.update(g.size)
    finally:
        bar.close()
    return results


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="refits", unit="fold")
