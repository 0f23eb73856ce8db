"""Exceptions and warnings raised by optsens.

Every error names the argument at fault, what was received and how to fix it.
Numerical trouble has its own classes so callers can catch it precisely.
"""

from __future__ import annotations

__all__ = [
    "OptsensError",
    "NotASolutionError",
    "SingularHessianError",
    "IndefiniteHessianError",
    "NonFiniteError",
    "PrecisionWarning",
]


class OptsensError(ValueError):
    """Base class of optsens' errors (a `ValueError`, so bad input is caught as such)."""


class NotASolutionError(OptsensError):
    """`theta0` does not solve `G(theta, eps0) = 0` to the requested tolerance."""


class SingularHessianError(OptsensError):
    """`H = dG/dtheta` at `(theta0, eps0)` is singular or numerically singular."""


class IndefiniteHessianError(OptsensError):
    """The Hessian of an objective is not positive definite: `theta0` is no minimum."""


class NonFiniteError(OptsensError):
    """A NaN or infinity appeared in the inputs, in `G`, its derivatives or a result."""


class PrecisionWarning(UserWarning):
    """float32 arithmetic used where derivatives of order two or more need float64."""
