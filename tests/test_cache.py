"""enable_compilation_cache: a second process loads the kernels the first compiled.

Truth: the cache directory gains entries in the first process, and a second fresh
process computes identical derivatives with JAX reporting cache hits (counted through
jax.monitoring's '/jax/compilation_cache/cache_hits' event), not by timing.
"""

import subprocess
import sys
import textwrap

import jax
import pytest

import optsens

_SCRIPT = textwrap.dedent(
    """
    import sys, jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    hits = []
    jax.monitoring.register_event_listener(
        lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None
    )
    import optsens
    optsens.enable_compilation_cache(sys.argv[1])
    f = lambda t, e: 0.5 * jnp.exp(e) * jnp.sum(t ** 2) + jnp.sum(jnp.logaddexp(0.0, t)) - jnp.sum(t)
    theta0 = optsens.newton_solve(f, jnp.zeros(3), 0.0, objective=True)
    eq = optsens.EstimatingEquation.from_objective(f, theta0, 0.0)
    d = optsens.taylor_expansion(eq, 3).derivatives(1.0)
    print(len(hits), repr(np.asarray(d).tolist()))
    """
)


def _run(cache_dir):
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(cache_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    hits, values = out.stdout.strip().split(" ", 1)
    return int(hits), values


def test_second_process_loads_the_compiled_kernels(tmp_path):
    cache = tmp_path / "cache"
    first_hits, first = _run(cache)
    assert first_hits == 0
    assert any(cache.iterdir()), "the first process wrote nothing to the cache"
    second_hits, second = _run(cache)
    assert second_hits >= 2  # at least the factorisation and the Taylor kernel
    assert second == first


def test_bad_directory_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="`directory` .* cannot be created"):
        optsens.enable_compilation_cache(blocker / "sub")
    with pytest.raises(TypeError, match="`directory` must be a path"):
        optsens.enable_compilation_cache(42)
    # Nothing was changed by the failed calls.
    current = jax.config.jax_compilation_cache_dir
    assert current in (None, "") or "file" not in current
