"""Every test runs in float64: derivatives of order >= 2 need it."""

import jax

jax.config.update("jax_enable_x64", True)
