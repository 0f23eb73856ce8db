"""The benchmark problems: L2-regularised logistic and Poisson regression.

Every method sees the same objective, written once for ``jax.numpy`` and once for
``autograd.numpy`` (the module is a parameter), on the same data and at the same
``theta0``:

    f(theta, eps) = sum_n loss(y_n, eta_n) + exp(eps[0]) / 2 * |theta|^2,
    eta_n = x_n . theta                              (p = 1: eps = log prior strength)
    eta_n = exp(eps[2]) * x_n . theta + eps[1]       (p = 3: plus an offset and a link scale)

with ``loss = logaddexp(0, eta) - y eta`` (logistic, ``y`` in {0, 1}) or
``exp(eta) - y eta`` (Poisson). ``eps0 = 0`` and the direction ``v`` is a fixed unit
vector. This module imports neither optsens nor the peers, so any worker can load it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

PROBLEMS = ("logistic", "poisson")


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmark problem: model, number of parameters D, observations N, and
    the dimension p of the hyperparameter."""

    problem: str
    d: int
    n: int
    p: int

    @property
    def name(self) -> str:
        return f"{self.problem}-D{self.d}-p{self.p}"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def objective(problem: str, p: int, xnp):
    """``f(theta, eps, x, y)`` written with the array module `xnp` (jnp or autograd.numpy)."""
    if problem not in PROBLEMS:
        raise ValueError(f"unknown problem {problem!r}; expected one of {PROBLEMS}")
    if p not in (1, 3):
        raise ValueError(f"p must be 1 or 3; got {p}")

    def f(theta, eps, x, y):
        eta = xnp.dot(x, theta)
        if p == 3:
            eta = xnp.exp(eps[2]) * eta + eps[1]
        if problem == "logistic":
            loss = xnp.sum(xnp.logaddexp(0.0, eta) - y * eta)
        else:
            loss = xnp.sum(xnp.exp(eta) - y * eta)
        return loss + 0.5 * xnp.exp(eps[0]) * xnp.dot(theta, theta)

    f.__name__ = f"{problem}_p{p}"
    return f


def make_data(cfg: Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Simulated design, responses, ``eps0`` and the unit direction ``v``."""
    rng = np.random.default_rng(seed + 1000 * cfg.d + 7 * cfg.p + (cfg.problem == "poisson"))
    x = rng.standard_normal((cfg.n, cfg.d)) / np.sqrt(cfg.d)
    beta = rng.standard_normal(cfg.d)
    eta = x @ beta
    if cfg.problem == "logistic":
        y = (rng.random(cfg.n) < 1.0 / (1.0 + np.exp(-eta))).astype(float)
    else:
        y = rng.poisson(np.exp(0.5 * eta)).astype(float)
    eps0 = np.zeros(cfg.p)
    v = np.array([1.0]) if cfg.p == 1 else np.array([1.0, 0.5, -0.5])
    v = v / np.linalg.norm(v)
    return {"x": x, "y": y, "eps0": eps0, "v": v}
