"""Which device mlxgate runs on, in which dtype, and how much memory it uses.

One place decides: Metal on Apple GPUs, CUDA on NVIDIA (``mlx[cuda]``), else CPU. The compute
dtype is float32 on CPU (bf16 matmuls have no BLAS path there) and bfloat16 on a GPU;
``MLXGATE_DTYPE`` or an explicit argument overrides it.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import asdict, dataclass

from mlxgate import _blas

import mlx.core as mx  # noqa: E402  (after _blas, on purpose)

_blas.warn_if_missing()

_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def device_name() -> str:
    """'metal', 'cuda' or 'cpu': the backend of MLX's default device."""
    if mx.default_device() == mx.cpu or not _gpu_available():
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    return "cuda"


def _gpu_available() -> bool:
    try:
        return mx.default_device().type == mx.DeviceType.gpu
    except Exception:  # pragma: no cover - very old mlx
        return False


def is_cuda() -> bool:
    return device_name() == "cuda"


def is_metal() -> bool:
    return device_name() == "metal"


def compute_dtype(override: str | None = None) -> mx.Dtype:
    """The dtype model weights and activations are cast to.

    ``override`` (or env ``MLXGATE_DTYPE``) is one of float32, bfloat16, float16.
    """
    name = override or os.environ.get("MLXGATE_DTYPE")
    if name:
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(_DTYPES)}")
        return _DTYPES[name]
    return mx.float32 if device_name() == "cpu" else mx.bfloat16


def dtype_name(dtype: mx.Dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    return str(dtype)


def blas_in_use() -> str:
    """Which BLAS CPU matmuls use: 'openblas (<path>)', 'accelerate', or 'reference'."""
    if sys.platform == "darwin":
        return "accelerate"
    if _blas.LOADED:
        return f"openblas ({_blas.LOADED})"
    return f"reference ({_blas.REASON})" if _blas.REASON else "reference"


def backend_label() -> str:
    """Short label reported beside every result: 'metal', 'cuda' or 'cpu+openblas'."""
    name = device_name()
    if name != "cpu":
        return name
    return "cpu+openblas" if _blas.LOADED else ("cpu+accelerate" if sys.platform == "darwin" else "cpu+refblas")


def _system_memory() -> dict:
    total = avail = None
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
        total, avail = info.get("MemTotal"), info.get("MemAvailable")
    except OSError:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            pass
    return {"system_total_bytes": total, "system_available_bytes": avail}


def memory() -> dict:
    """MLX active/peak/cache bytes and the system's total/available memory (bytes)."""
    return {
        "mlx_active_bytes": mx.get_active_memory(),
        "mlx_peak_bytes": mx.get_peak_memory(),
        "mlx_cache_bytes": mx.get_cache_memory(),
        **_system_memory(),
    }


@dataclass
class BackendInfo:
    device: str
    label: str
    dtype: str
    blas: str
    python: str
    platform: str
    mlx: str
    mlx_lm: str
    mlxgate: str


def info() -> BackendInfo:
    import mlx_lm

    import mlxgate

    return BackendInfo(
        device=device_name(),
        label=backend_label(),
        dtype=dtype_name(compute_dtype()),
        blas=blas_in_use() if device_name() == "cpu" else "n/a (GPU)",
        python=platform.python_version(),
        platform=f"{platform.system()} {platform.machine()}",
        mlx=mx.__version__,
        mlx_lm=getattr(mlx_lm, "__version__", "?"),
        mlxgate=mlxgate.__version__,
    )


def info_dict() -> dict:
    return {**asdict(info()), "memory": memory()}
