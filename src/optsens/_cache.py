"""Keeping compiled kernels between processes: JAX's persistent compilation cache.

optsens compiles one kernel per function, shape, order and method and reuses it for
every direction, data set and ``theta0`` of that shape -- within a process. A new
process (a script run again, a notebook restarted, a worker of a cluster) compiles
again: at D = 100, order 6 that is most of the 0.9 s first call. With the cache on
disk, later processes load the compiled programs instead (measured 0.3 s).
"""

from __future__ import annotations

import os
import pathlib

import jax

__all__ = ["enable_compilation_cache"]


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> pathlib.Path:
    """Store every compiled program of this process on disk and load it in later ones.

    Sets JAX's persistent compilation cache (``jax_compilation_cache_dir``) and makes
    it keep every program however quick its compilation was (JAX's default keeps only
    those above one second, which excludes most of optsens' kernels). It applies to
    everything JAX compiles in this process from now on, optsens or not; call it once,
    before the first computation.

    **Arguments:**

    - `directory`: where to keep the cache. Default: ``$OPTSENS_CACHE_DIR`` if set,
      else ``~/.cache/optsens/jax``. Created if missing; safe to share between
      processes, and to delete at any time.

    **Returns:** the directory used.

    ```python
    import optsens
    optsens.enable_compilation_cache()   # first line of a script or notebook
    ```
    """
    if directory is None:
        directory = os.environ.get("OPTSENS_CACHE_DIR") or pathlib.Path.home() / ".cache" / "optsens" / "jax"
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"`directory` must be a path or None; got {type(directory).__name__}.")
    path = pathlib.Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(
            f"`directory` {str(path)!r} cannot be created ({exc}); pass a writable directory."
        ) from exc
    if not os.access(path, os.W_OK):
        raise OSError(f"`directory` {str(path)!r} is not writable; pass a writable directory.")
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
