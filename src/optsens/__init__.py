"""optsens: how the solution of an estimating equation moves with its hyperparameters.

Derivatives of ``theta_hat(eps)`` of any order by automatic differentiation, their
Taylor expansions, and the infinitesimal jackknife built on them.
"""

from ._cache import enable_compilation_cache as enable_compilation_cache
from ._errors import (
    IndefiniteHessianError as IndefiniteHessianError,
    NonFiniteError as NonFiniteError,
    NotASolutionError as NotASolutionError,
    OptsensError as OptsensError,
    PrecisionWarning as PrecisionWarning,
    SingularHessianError as SingularHessianError,
)
from ._folds import (
    bootstrap_counts as bootstrap_counts,
    kfold as kfold,
    leave_k_out as leave_k_out,
)
from ._implicit import implicit_optimum as implicit_optimum
from ._newton import newton_solve as newton_solve
from ._problem import EstimatingEquation as EstimatingEquation
from ._taylor import (
    TaylorExpansion as TaylorExpansion,
    TaylorPolynomial as TaylorPolynomial,
    taylor_expansion as taylor_expansion,
)
from ._trust import (
    BeyondRadiusWarning as BeyondRadiusWarning,
    PadeApproximant as PadeApproximant,
    RadiusEstimate as RadiusEstimate,
    TrustReport as TrustReport,
    ValidationTable as ValidationTable,
    estimate_radius as estimate_radius,
    pade_approximant as pade_approximant,
    truncation_error_estimate as truncation_error_estimate,
    validate_expansion as validate_expansion,
)
from ._weights import MEstimator as MEstimator

__version__ = "0.1.0"

__all__ = [
    "EstimatingEquation",
    "IndefiniteHessianError",
    "MEstimator",
    "NonFiniteError",
    "NotASolutionError",
    "OptsensError",
    "PrecisionWarning",
    "SingularHessianError",
    "TaylorExpansion",
    "TaylorPolynomial",
    "bootstrap_counts",
    "enable_compilation_cache",
    "implicit_optimum",
    "kfold",
    "leave_k_out",
    "newton_solve",
    "taylor_expansion",
    "BeyondRadiusWarning",
    "PadeApproximant",
    "RadiusEstimate",
    "TrustReport",
    "ValidationTable",
    "estimate_radius",
    "pade_approximant",
    "truncation_error_estimate",
    "validate_expansion",
]
