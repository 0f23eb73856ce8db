"""`MEstimator`: data-weight sensitivity of an M-estimator, from one fit.

The class holds the fit, its checks and the public methods; the work lives in the
layers below it: `_weights_model` (the per-observation problem), `_weights_checks`
(input checks), `_weights_hessian` (``G``, ``H`` and its factorisation),
`_weights_kernels` (first-order kernels), `_weights_series` (the core Taylor engine
per fold), `_newton_step` (dense and Woodbury Newton steps), `_approximate_fits`
(blocks of folds and draws), `_refit` (exact refits, executors), `_batching`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._approximate_fits import (
    FitAtTheta0,
    bootstrap_series,
    bootstrap_steps,
    fold_coef,
    held_out_losses,
    ij_steps,
    leave_out_series,
    newton_steps,
    path_equation,
    uses_woodbury,
    warm_starts,
)
from ._errors import OptsensError
from ._folds import FoldIndex
from ._newton import newton_solve
from ._newton_step import check_curvature_factors
from ._problem import EstimatingEquation
from ._pytree import TreeLayout, as_float_tree
from ._refit import RefitPayload, run_refits
from ._weights_checks import (
    check_chunk_size,
    check_count,
    check_data,
    check_fold_index,
    check_function,
    check_loss_fn,
    check_method,
    check_order,
    check_penalty,
    check_predictor,
    check_weights,
)
from ._weights_hessian import FullDataHessian, full_data_hessian
from ._weights_kernels import influence_kernel, qoi_influence_kernel
from ._weights_model import ObservationModel, TotalEquation, TotalObjective
from ._weights_series import fold_equation

__all__ = ["MEstimator"]

_LEAVE_OUT_METHODS = ("ij", "newton")
_CV_METHODS = ("ij", "newton", "exact")


class MEstimator:
    """An M-estimator with observation weights, and how its fit moves with them.

    The estimating equation is

        G(theta, w) = sum_n w_n g_n(theta) + penalty(theta),      w = `weights` (default 1),

    solved by ``theta0``. ``g_n`` is the estimating function of observation ``n``:
    `g(theta, datum_n)`, or ``grad_theta loss(theta, datum_n)`` for `from_loss`
    (then ``G`` is the gradient of ``sum_n w_n loss_n + penalty``). With
    ``H = dG/dtheta (theta0)``, factorised once (Cholesky for a loss, LU otherwise):

    - `influence()`: ``d theta_hat / d w_n = -H^{-1} g_n(theta0)`` for all ``n``;
    - `leave_out(folds, order=K)`: Taylor series of ``theta_hat`` along
      ``w - t w 1_S`` at ``t = 1``, to order K (the infinitesimal jackknife), or the
      Newton step (``method="newton"``);
    - `bootstrap`, `cv_score`, `refit` (exact, warm-started).

    `theta0` is not checked at construction; the optimality check (the Newton step
    ``H^{-1} G(theta0)`` must be small) runs when a derivative is first asked for.
    Use `.fit()` to solve for ``theta0``.

    **Arguments:**

    - `g`: ``g(theta, datum)`` returning a pytree shaped like `theta` (one
      observation's estimating function; `datum` is each leaf of `data` without its
      leading axis).
    - `data`: a pytree of arrays with a common leading observation axis of length N.
    - `theta0`: the parameters (the solution, or a starting point for `.fit()`).
    - `penalty`: optional ``penalty(theta)`` added to ``G`` (a pytree like `theta`;
      with `from_loss`, a scalar added to the loss).
    - `weights`: optional (N,) non-negative observation weights (default ones).
    - `linear_predictor`: optional ``eta(theta, datum)``, a scalar or (k,) array
      affine in `theta` (``datum["x"] @ theta + offset``), declaring that each
      observation's loss (or ``g``) depends on `theta` only through it, as in a GLM.
      Then every per-observation Hessian has rank <= k and the Newton step solves
      by a Woodbury update of ``H``'s factorisation (k x k systems per observation
      of a fold) instead of a D x D factorisation per fold. The declaration is
      checked once against ``H``. `from_statsmodels` and `from_sklearn` set it.
    - `chunk_size`: observations per chunk of vectorised per-observation work
      (default: about 64 MiB of intermediates, i.e. 2^23 / D^2 observations for
      Hessian-level work and 2^21 / D for gradient-level work).
    - `residual_rtol`, `cond_max`: the optimality and conditioning checks, as for
      `EstimatingEquation` (`cond_max` also bounds the Hessian without a fold).

    **Example:**

    ```python
    def loss(theta, d):                         # logistic log-loss of one observation
        z = d["x"] @ theta
        return jnp.logaddexp(0.0, z) - d["y"] * z
    model = optsens.MEstimator.from_loss(loss, {"x": X, "y": y}, jnp.zeros(D),
                                         penalty=lambda th: 0.5 * th @ th,
                                         linear_predictor=lambda th, d: d["x"] @ th).fit()
    model.influence()                           # (N, D)
    model.leave_out("loo", order=2)             # (N, D): approximate LOO fits
    model.cv_score(optsens.kfold(model.n_obs, 10), order=2)
    ```
    """

    def __init__(
        self,
        g: Callable[..., Any],
        data: Any,
        theta0: Any,
        *,
        penalty: Callable[..., Any] | None = None,
        weights: Any = None,
        linear_predictor: Callable[..., Any] | None = None,
        chunk_size: int | None = None,
        residual_rtol: float = 1e-6,
        cond_max: float = 1e12,
        _kind: str = "equation",
    ):
        name = "loss" if _kind == "loss" else "g"
        if not callable(g):
            raise TypeError(f"`{name}` must be a function of (theta, datum); got {type(g).__name__}.")
        theta0 = as_float_tree(theta0, "theta0")
        if not jax.tree_util.tree_leaves(theta0):
            raise OptsensError("`theta0` has no arrays in it; it must hold the parameters.")
        data, n_obs = check_data(data)
        layout = TreeLayout.of(theta0)
        check_function(g, _kind, theta0, data)
        check_penalty(penalty, _kind, theta0)
        self._predictor_size = check_predictor(linear_predictor, theta0, data)
        chunk, chunk_g = check_chunk_size(chunk_size, n_obs, layout.size)
        # kernels that do not use the predictor get a model without it, so they compile
        # once for a model with or without a declared predictor
        self._model = ObservationModel(g, _kind, penalty, layout)
        self._predictor = linear_predictor
        self._theta0 = theta0
        self._theta0_flat = layout.ravel(theta0)
        self._data = data
        self._n_obs = n_obs
        self._weights = check_weights(weights, n_obs, self._theta0_flat.dtype)
        self._chunk, self._chunk_g = chunk, chunk_g
        self._chunk_size = chunk_size
        self._residual_rtol = float(residual_rtol)
        self._cond_max = float(cond_max)
        self._fit_cache: FitAtTheta0 | None = None
        self._equation_cache: EstimatingEquation | None = None
        self._low_rank_checked = False

    @classmethod
    def from_loss(
        cls,
        loss: Callable[..., Any],
        data: Any,
        theta0: Any,
        penalty: Callable[..., Any] | None = None,
        **kwargs: Any,
    ) -> MEstimator:
        """The M-estimator minimising ``sum_n w_n loss(theta, datum_n) + penalty(theta)``.

        ``G`` is its gradient, ``g_n = grad_theta loss(theta, datum_n)`` and ``H`` its
        Hessian, which must be positive definite at ``theta0``.

        **Arguments:** `loss(theta, datum)` returns the scalar loss of one observation;
        `penalty(theta)` a scalar (or None); the rest (`weights`, `linear_predictor`,
        ...) as for `MEstimator`.
        """
        return cls(loss, data, theta0, penalty=penalty, _kind="loss", **kwargs)

    @classmethod
    def from_statsmodels(cls, results: Any, *, polish: bool = True, **kwargs: Any) -> MEstimator:
        """From fitted statsmodels OLS / WLS / GLM results; see `optsens._interop`."""
        from ._interop import from_statsmodels

        return from_statsmodels(cls, results, polish=polish, **kwargs)

    @classmethod
    def from_sklearn(
        cls, estimator: Any, X: Any, y: Any, *, sample_weight: Any = None, polish: bool = True, **kwargs: Any
    ) -> MEstimator:
        """From a fitted scikit-learn `LogisticRegression`, `Ridge` or `LinearRegression`
        and its training data; see `optsens._interop`."""
        from ._interop import from_sklearn

        return from_sklearn(cls, estimator, X, y, sample_weight=sample_weight, polish=polish, **kwargs)

    # ---------------------------------------------------------- attributes
    @property
    def theta(self) -> Any:
        """``theta0``, the fitted parameters."""
        return self._theta0

    @property
    def data(self) -> Any:
        return self._data

    @property
    def weights(self) -> jax.Array:
        return self._weights

    @property
    def n_obs(self) -> int:
        return self._n_obs

    @property
    def kind(self) -> str:
        """``"loss"`` (from `from_loss`) or ``"equation"``."""
        return self._model.kind

    @property
    def condition_number(self) -> float:
        return self._base().condition_number

    @property
    def newton_step_norm(self) -> float:
        """``||H^{-1} G(theta0)||_inf``: how far ``theta0`` is from the exact solution."""
        return self._base().newton_step_norm

    def __repr__(self) -> str:
        shapes = jax.tree_util.tree_map(lambda x: f"{x.dtype}{list(x.shape)}", self._theta0)
        base = self._fit_cache.base if self._fit_cache is not None else None
        checked = (
            f", newton_step={base.newton_step_norm:.2e}, cond={base.condition_number:.2e}" if base else ""
        )
        predictor = f", linear_predictor=k{self._predictor_size}" if self._predictor_size else ""
        return (
            f"MEstimator(kind={self.kind}, n_obs={self._n_obs}, theta={shapes}, "
            f"penalty={'yes' if self._model.penalty is not None else 'no'}{predictor}{checked})"
        )

    def _replace(self, theta0: Any = None, weights: Any = None) -> MEstimator:
        return type(self)(
            self._model.fn,
            self._data,
            self._theta0 if theta0 is None else theta0,
            penalty=self._model.penalty,
            weights=self._weights if weights is None else weights,
            linear_predictor=self._predictor,
            chunk_size=self._chunk_size,
            residual_rtol=self._residual_rtol,
            cond_max=self._cond_max,
            _kind=self._model.kind,
        )

    # ------------------------------------------------------------- fitting
    def _tol(self, tol: float | None) -> float:
        """Newton's step tolerance: 1e-12 in float64; float32 cannot get below ~1e-6."""
        if tol is not None:
            return float(tol)
        return 1e-12 if self._theta0_flat.dtype == jnp.float64 else 1e-5

    def fit(self, theta_init: Any = None, *, tol: float | None = None, max_steps: int = 100) -> MEstimator:
        """Solve ``G(theta, w) = 0`` by damped Newton steps (`newton_solve`) from
        `theta_init` (default the current ``theta0``).

        **Returns:** a new `MEstimator` at the solution. Raises `NotASolutionError`
        if Newton does not converge.
        """
        start = self._theta0 if theta_init is None else as_float_tree(theta_init, "theta_init")
        objective = self._model.kind == "loss"
        solution = newton_solve(
            TotalObjective(self._model) if objective else TotalEquation(self._model),
            start,
            0.0,
            args=(self._data, self._weights),
            objective=objective,
            tol=self._tol(tol),
            max_steps=max_steps,
        )
        return self._replace(theta0=solution)

    # -------------------------------------------------------------- checks
    def _fit(self) -> FitAtTheta0:
        """The checked fit at ``theta0`` (``H`` formed, checked and factorised once)."""
        if self._fit_cache is None:
            m, fitted = self._model, (self._theta0_flat, self._data, self._weights)
            base = full_data_hessian(m, *fitted, self._chunk, self._residual_rtol, self._cond_max)
            low_rank = None if self._predictor is None else dataclasses.replace(m, predictor=self._predictor)
            self._fit_cache = FitAtTheta0(
                m, *fitted, base, self._chunk, self._chunk_g, low_rank, self._predictor_size
            )
        return self._fit_cache

    def _base(self) -> FullDataHessian:
        return self._fit().base

    def _checked_fit(self, fi: FoldIndex) -> FitAtTheta0:
        """`_fit`, with the declared `linear_predictor` checked against ``H`` once the
        Newton step is about to rely on it (Woodbury)."""
        fit = self._fit()
        if uses_woodbury(fit, fi) and not self._low_rank_checked:
            check_curvature_factors(
                fit.low_rank_model, fit.th, fit.data, fit.weights, fit.base.hessian, fit.chunk
            )
            self._low_rank_checked = True
        return fit

    def hessian(self) -> jax.Array:
        """The dense ``H = dG/dtheta`` at ``theta0`` over the flattened parameters (D x D)."""
        return self._base().hessian

    # ----------------------------------------------------------- influence
    def influence(self, qoi: Callable[..., Any] | None = None) -> Any:
        """First-order influence of every observation's weight, at ``w``.

        Without `qoi`: ``d theta_hat / d w_n = -H^{-1} g_n(theta0)``, n = 1..N
        (one solve with N right-hand sides). With `qoi` (``f(theta)`` returning any
        pytree, typically a scalar): ``d f(theta_hat) / d w_n =
        -(H^{-T} grad f(theta0))^T g_n(theta0)`` — one solve per output of `f`, then
        one forward pass over the data; nothing of size N x D is formed.

        Dropping observation ``n`` changes ``theta_hat`` by about ``-w_n`` times its
        influence (``+w_n H^{-1} g_n``): see `leave_out` for the fold version.

        **Returns:** a pytree shaped like `theta` (or like `qoi`'s output) whose
        leaves carry a leading axis of length N.

        **Example:** ``model.influence(qoi=lambda th: th[1])``, shape (N,).
        """
        base = self._base()
        if qoi is None:
            flat = influence_kernel(self._model, base.inverse, self._theta0_flat, self._data, self._chunk_g)
            return self._model.theta.unravel(flat)
        if not callable(qoi):
            raise TypeError(f"`qoi` must be a function f(theta); got {type(qoi).__name__}.")
        try:
            out = jax.eval_shape(qoi, self._theta0)
        except Exception as exc:
            raise type(exc)(f"calling `qoi(theta0)` failed: {exc}") from exc
        out_layout = TreeLayout.of(out)
        flat = qoi_influence_kernel(
            self._model, base.solver, self._theta0_flat, self._data, qoi, out_layout, self._chunk_g
        )
        return out_layout.unravel(flat)

    # ---------------------------------------------------------- leave-out
    def _fold_index(self, folds: Any) -> FoldIndex:
        return check_fold_index(folds, np.asarray(self._weights))

    def _equation(self) -> EstimatingEquation:
        if self._equation_cache is None:
            # After MEstimator's checks on H, and reusing that H.
            self._equation_cache = path_equation(self._fit(), self._theta0, self._residual_rtol)
        return self._equation_cache

    def fold_equation(self, fold: Any) -> EstimatingEquation:
        """The core `EstimatingEquation` of leaving out `fold` (a 1-D index array).

        Its ``eps`` is the scalar ``t``, ``eps0 = 0``, and
        ``G(theta, t) = sum_n w_n g_n(theta) + penalty - t sum_{n in fold} w_n g_n(theta)``:
        ``t = 1`` leaves the fold out. Use it with `taylor_expansion` or
        `implicit_optimum` (e.g. ``taylor_expansion(model.fold_equation(S), 4)(1.0)``).
        Built with the core's own checks (eagerly; for small problems).
        """
        fi = self._fold_index([fold])
        fit = self._fit()
        idx, delta = jnp.asarray(fi.index[0], jnp.int32), fold_coef(fit, fi)[0]
        return fold_equation(fit.model, self._theta0, fit.data, fit.weights, idx, delta,
                             residual_rtol=self._residual_rtol, cond_max=self._cond_max)  # fmt: skip

    def leave_out_coefficients(
        self, folds: Any = "loo", order: int = 2, *, taylor_method: str = "auto"
    ) -> Any:
        """The Taylor coefficients ``theta_1, ..., theta_K`` of ``theta_hat`` along each
        fold's path ``w(t) = w - t w 1_S`` (so ``theta_hat(-S) ~ theta0 + sum_k theta_k``).

        From the core engine: ``theta_k = -H^{-1} r_k``, ``r_k`` the ``t^k`` coefficient
        of ``G(theta0 + ... + theta_{k-1} t^{k-1}, t)``, vmapped over folds in one
        compiled kernel. ``|theta_k|^{-1/k}`` estimates the radius of convergence in
        ``t``: below 1, the series at ``t = 1`` should not be trusted.

        **Returns:** a pytree shaped like `theta` whose leaves carry leading axes
        ``(F, K)``.
        """
        order = check_order(order)
        fi = self._fold_index(folds)
        flat = leave_out_series(self._fit(), self._equation(), fi, order, taylor_method)
        return self._model.theta.unravel(flat)

    def leave_out(
        self, folds: Any = "loo", order: int = 1, *, method: str = "ij", taylor_method: str = "auto"
    ) -> Any:
        """Predicted fits without each fold, from the one fit at ``theta0``.

        Leaving out ``S`` moves the weights along ``w(t) = w - t w 1_S`` to ``t = 1``:

        - ``method="ij"`` (infinitesimal jackknife), order ``K``:
          ``theta_hat(-S) ~ theta0 + sum_{k=1..K} theta_k``; order 1 is
          ``theta0 + H^{-1} sum_{n in S} w_n g_n(theta0)``; higher orders from the
          core Taylor engine (`leave_out_coefficients`).
        - ``method="newton"`` (Newton step, "approximate leave-one-out"): one Newton
          step from ``theta0`` on the problem without ``S``,
          ``theta0 - (H - H_S)^{-1} (G(theta0) - g_S)``, with
          ``g_S = sum_{n in S} w_n g_n(theta0)`` and the rank-``|S|`` downdate
          ``H_S = sum_{n in S} w_n dg_n/dtheta(theta0)``. With a `linear_predictor`
          of k outputs and ``|S| k < D``, ``H_S = U C U^T`` and the solve is a
          Woodbury update of ``H``'s factorisation (an ``|S| k`` square system per
          fold); otherwise a fresh D x D factorisation per fold. Exact when the
          objective is quadratic (least squares); for GLMs with canonical link and
          LOO it is statsmodels' ``GLMInfluence.params_one``. Raises
          `SingularHessianError` / `IndefiniteHessianError`, naming the fold, where
          ``H - H_S`` is singular or indefinite (the fit without the fold is not
          identified).

        **Arguments:** `folds`: ``"loo"``, a 2-D integer array (one fold per row), or a
        list of index arrays (see `optsens.kfold`, `optsens.leave_k_out`); `order`:
        the order of the IJ series (1 for ``"newton"``); `taylor_method`: the core
        engine's method for orders >= 2.

        **Returns:** a pytree shaped like `theta` with a leading fold axis.
        """
        return self._model.theta.unravel(self._leave_out_flat(folds, order, method, taylor_method))

    def _leave_out_flat(self, folds, order, method, taylor_method="auto") -> jax.Array:
        order = check_method(method, order, _LEAVE_OUT_METHODS)
        fi = self._fold_index(folds)
        if method == "newton":
            return self._theta0_flat + newton_steps(self._checked_fit(fi), fi)[0]
        if order >= 2:
            series = leave_out_series(self._fit(), self._equation(), fi, order, taylor_method)
            return self._theta0_flat + jnp.sum(series, axis=1)
        return self._theta0_flat + ij_steps(self._fit(), fi)

    # ----------------------------------------------------------- bootstrap
    def bootstrap(
        self, n_draws: int, key: jax.Array, order: int = 1, *, method: str = "ij", taylor_method: str = "auto"
    ) -> Any:
        """Approximate nonparametric bootstrap: ``theta_hat`` at the weights
        ``w * counts_b`` of each draw, along ``v = w (counts_b - 1)`` from ``w``.

        ``method="ij"``: the order-`order` Taylor series at ``t = 1`` (order 1:
        ``theta0 - H^{-1} sum_n w_n (counts_n - 1) g_n(theta0)``); ``method="newton"``:
        one Newton step with the reweighted Hessian (a fresh D x D factorisation per
        draw; an error names a draw whose reweighted Hessian is singular or
        indefinite). Counts are those of ``optsens.bootstrap_counts(key, N, n_draws)``.

        **Returns:** a pytree shaped like `theta` with a leading axis of length `n_draws`.
        """
        n_draws = check_count(n_draws, "n_draws")
        order = check_method(method, order, _LEAVE_OUT_METHODS)
        keys = jax.random.split(key, int(n_draws))
        fit = self._fit()
        if method == "ij" and order >= 2:
            out = jnp.sum(bootstrap_series(fit, self._equation(), keys, order, taylor_method), axis=1)
        else:
            out = bootstrap_steps(fit, keys, newton=method == "newton")
        return self._model.theta.unravel(self._theta0_flat + out)

    # ------------------------------------------------------------------ CV
    def cv_score(
        self,
        folds: Any = "loo",
        loss_fn: Callable[..., Any] | None = None,
        order: int = 1,
        *,
        method: str = "ij",
        per_fold: bool = False,
        executor: concurrent.futures.Executor | None = None,
        progress: bool = False,
    ) -> Any:
        """Approximate cross-validation loss:
        ``sum_S sum_{n in S} w_n loss_fn(theta_hat(-S), datum_n) / sum_S sum_{n in S} w_n``,
        with ``theta_hat(-S)`` from `leave_out` (``method="ij"`` at `order`, or
        ``"newton"``) or from exact refits (``method="exact"``, see `refit`).

        **Arguments:** `loss_fn(theta, datum)`: the held-out loss of one observation
        (default the model's own `loss` for `from_loss`); `per_fold=True` returns the
        mean held-out loss of each fold instead.

        **Returns:** a scalar (or an (F,) array with `per_fold`).

        **Example:** choose a penalty by ``min(lams, key=lambda l: fit(l).cv_score(folds, order=2))``.
        """
        loss_fn = check_loss_fn(loss_fn, self._model.kind, self._model.fn)
        if method not in _CV_METHODS:
            raise OptsensError(f"`method` must be one of {_CV_METHODS}; got {method!r}.")
        fi = self._fold_index(folds)
        if method == "exact":
            thetas = self._model.theta.ravel(self.refit(fi, executor=executor, progress=progress))
            thetas = jnp.asarray(np.asarray(thetas).reshape(fi.n_folds, -1))
        else:
            thetas = self._leave_out_flat(fi, order, method)
        sums, held = held_out_losses(self._fit(), loss_fn, thetas, fi)
        if per_fold:
            return sums / held
        return jnp.sum(sums) / jnp.sum(held)

    # --------------------------------------------------------------- refits
    def refit(
        self,
        folds: Any = "loo",
        executor: concurrent.futures.Executor | None = None,
        *,
        start: str = "newton",
        progress: bool = True,
        tol: float | None = None,
        max_steps: int = 100,
        tasks: int | None = None,
    ) -> Any:
        """Exact fits without each fold, by damped Newton (`newton_solve`) warm-started
        from an approximation.

        **Arguments:**

        - `folds`: as for `leave_out`.
        - `executor`: None (serial, with a progress bar) or any
          `concurrent.futures.Executor` (thread or process pool, a
          `dask.distributed` client's ``get_executor()``); the folds are split into
          `tasks` groups (default ``min(F, 64)``) submitted to it. With a process
          pool the `loss`/`g`/`penalty` functions must be picklable (defined at
          module level).
        - `start`: ``"newton"`` (the Newton-step prediction, default), ``"ij"``
          (first-order IJ) or ``"theta0"``; folds whose prediction is not finite,
          or whose Hessian without the fold is singular or indefinite, start at
          ``theta0``.
        - `progress`: show a tqdm progress bar.
        - `tol`, `max_steps`: passed to `newton_solve` (`tol` default: 1e-12 in float64, 1e-5 in float32).

        **Returns:** a pytree shaped like `theta` with a leading fold axis.
        """
        fi = self._fold_index(folds)
        starts = warm_starts(self._checked_fit(fi) if start == "newton" else self._fit(), fi, start)
        m = self._model
        payload = RefitPayload.of(m, self._theta0, self._data, self._weights, self._tol(tol), max_steps)
        rows = [fi.members(f) for f in range(fi.n_folds)]
        results = run_refits(payload, rows, starts, executor, tasks, progress)
        return m.theta.unravel(jnp.asarray(results))
