"""optsens: how the solution of an estimating equation moves with its hyperparameters.

Derivatives of ``theta_hat(eps)`` of any order by automatic differentiation, their
Taylor expansions, and the infinitesimal jackknife built on them.
"""

from ._errors import (
    IndefiniteHessianError as IndefiniteHessianError,
    NonFiniteError as NonFiniteError,
    NotASolutionError as NotASolutionError,
    OptsensError as OptsensError,
    PrecisionWarning as PrecisionWarning,
    SingularHessianError as SingularHessianError,
)
from ._implicit import implicit_optimum as implicit_optimum
from ._newton import newton_solve as newton_solve
from ._problem import EstimatingEquation as EstimatingEquation
from ._taylor import (
    TaylorExpansion as TaylorExpansion,
    TaylorPolynomial as TaylorPolynomial,
    taylor_expansion as taylor_expansion,
)

__version__ = "0.1.0"

__all__ = [
    "EstimatingEquation",
    "IndefiniteHessianError",
    "NonFiniteError",
    "NotASolutionError",
    "OptsensError",
    "PrecisionWarning",
    "SingularHessianError",
    "TaylorExpansion",
    "TaylorPolynomial",
    "implicit_optimum",
    "newton_solve",
    "taylor_expansion",
]
