"""Load OpenBLAS into the process before ``mlx.core`` is imported (SPEC §1).

The ``mlx[cpu]`` wheel links a reference BLAS (~5 GFLOP/s for a float32 matmul on x86-64).
Loading ``libopenblas.so.0`` with RTLD_GLOBAL first makes its ``cblas_*`` symbols win the
dynamic lookup (~50x faster). This module has no dependency on mlx and runs on import of
``mlxgate``, so every entry point (CLI, tests, notebooks) gets it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import warnings

# Where Debian/Ubuntu/Fedora put it. (PyPI's scipy-openblas wheels prefix their symbols, e.g.
# scipy_cblas_sgemm, so they cannot stand in for the reference BLAS and are not tried.)
_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

#: Path of the OpenBLAS library loaded, or None. Set by :func:`load_openblas`.
LOADED: str | None = None
#: Why no OpenBLAS was loaded ("" when loaded or not applicable).
REASON: str = ""


def load_openblas() -> str | None:
    """Load OpenBLAS globally on Linux; return its path or None.

    Skipped when ``MLXGATE_BLAS=reference`` (used by the BLAS benchmark), on non-Linux systems
    (macOS uses Accelerate; CUDA builds do not use CPU BLAS for model math), or when ``mlx.core``
    is already imported (too late: its symbols are already bound).
    """
    global LOADED, REASON
    if LOADED is not None:
        return LOADED
    if not sys.platform.startswith("linux"):
        REASON = "not linux"
        return None
    if os.environ.get("MLXGATE_BLAS", "").lower() == "reference":
        REASON = "MLXGATE_BLAS=reference"
        return None
    if "mlx.core" in sys.modules:
        REASON = "mlx.core was imported before mlxgate"
        return None
    explicit = os.environ.get("MLXGATE_OPENBLAS")
    candidates = ([explicit] if explicit else []) + list(_CANDIDATES)
    lib = ctypes.util.find_library("openblas")
    if lib:
        candidates.append(lib)
    for path in candidates:
        if path and (os.path.exists(path) or not os.path.isabs(path)):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            LOADED = path
            REASON = ""
            return path
    REASON = "no OpenBLAS found (apt-get install libopenblas0-pthread, or set MLXGATE_OPENBLAS=/path/to/libopenblas.so.0)"
    return None


def warn_if_missing() -> None:
    """Warn once when CPU matmuls will run on the reference BLAS."""
    if LOADED is None and REASON not in ("not linux", "MLXGATE_BLAS=reference"):
        warnings.warn(f"mlxgate: CPU matmuls use the slow reference BLAS: {REASON}", stacklevel=3)
