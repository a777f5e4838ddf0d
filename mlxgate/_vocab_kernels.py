"""Build the fused vocabulary kernels of ``kernels/`` for Metal and CUDA (SPEC §4).

One algorithm, one set of bodies: ``kernels/vocab_common.h`` holds the streaming reductions,
``kernels/*.body`` the kernel bodies, and ``kernels/{cuda,metal}_prelude.h`` the few
per-backend macros (shuffles, barriers, loads) plus a short prologue that names the thread
indices. ``mlxgate.ops`` is the only caller; :func:`cuda_test_source` gives tests the exact
text MLX would JIT, wrapped as plain ``__global__`` functions for ``nvcc``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

_MARKER = "// ---- body prologue ----"
MAX_TPB = 1024  # threads per row-block; also bounds the 32-slot per-warp shared arrays


@dataclass(frozen=True)
class KernelSpec:
    """Names the generated signature uses; inputs are pointers to their array's dtype."""

    body: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    has_ids: bool = False


SPECS = {
    "entropy_fwd": KernelSpec("entropy_fwd", ("logits",), ("ent", "lse")),
    "entropy_fwd_ids": KernelSpec("entropy_fwd", ("logits", "ids"), ("ent", "lse", "tlp"), True),
    "kl_fwd": KernelSpec("kl_fwd", ("a", "b"), ("kl", "lse_a", "lse_b")),
    "entropy_bwd": KernelSpec(
        "entropy_bwd", ("logits", "lse", "ent", "c_ent", "c_lse", "nrows"), ("grad",)
    ),
    "entropy_bwd_ids": KernelSpec(
        "entropy_bwd",
        ("logits", "lse", "ent", "c_ent", "c_lse", "nrows", "ids", "c_tlp"),
        ("grad",),
        True,
    ),
    "kl_bwd": KernelSpec(
        "kl_bwd",
        ("a", "b", "lse_a", "lse_b", "kl", "c_kl", "c_lse_a", "c_lse_b", "nrows"),
        ("ga", "gb"),
    ),
}


def kernels_dir() -> Path:
    """``kernels/`` at the top of the repository (SPEC §4)."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "kernels", here / "kernels"):
        if (cand / "vocab_common.h").is_file():
            return cand
    raise FileNotFoundError(
        f"kernel sources not found next to {here}; run mlxgate from its source checkout "
        "(pip install -e .) or set MLXGATE_OPS=composed"
    )


@functools.lru_cache(maxsize=None)
def _read(name: str) -> str:
    return (kernels_dir() / name).read_text()


def sources(backend: str, spec: KernelSpec) -> tuple[str, str]:
    """(header, body) for ``backend`` in {'cuda', 'metal'}: what mx.fast.*_kernel gets."""
    prelude, prologue = _read(f"{backend}_prelude.h").split(_MARKER)
    defines = "#define MLXG_HAS_IDS 1\n" if spec.has_ids else ""
    header = defines + prelude + "\n" + _read("vocab_common.h")
    body = prologue.strip() + "\n" + _read(f"{spec.body}.body")
    return header, body


@functools.lru_cache(maxsize=None)
def kernel(backend: str, name: str):
    """The compiled-on-first-use MLX kernel object for ``name`` (a key of SPECS)."""
    spec = SPECS[name]
    header, body = sources(backend, spec)
    make = mx.fast.cuda_kernel if backend == "cuda" else mx.fast.metal_kernel
    return make(
        name=f"mlxgate_{name}",
        input_names=list(spec.inputs),
        output_names=list(spec.outputs),
        source=body,
        header=header,
        ensure_row_contiguous=True,
    )


def vec_width(dtype: mx.Dtype, vocab: int) -> int:
    """Elements per 16-byte load; 1 when rows cannot all start 16-byte aligned."""
    vec = 16 // dtype.size
    return vec if vocab % vec == 0 else 1


def row_threads(vocab: int, vec: int) -> int:
    """Threads per row-block: about 8+ loads per thread, a multiple of 32, at most 1024."""
    want = max(1, vocab // (vec * 8))
    tpb = 32
    while tpb < want and tpb < MAX_TPB:
        tpb *= 2
    return tpb


_CUDA_TYPES = {"float32": "float", "bfloat16": "__nv_bfloat16", "float16": "__half", "int32": "int32_t"}


def cuda_test_source(items: list[tuple[str, str, int, int, int]]) -> str:
    """One .cu file holding each (name, dtype, V, TPB, VEC) body wrapped the way
    mx.fast.cuda_kernel wraps it (its header, then a __global__ function whose template
    arguments are constexprs), for a plain ``nvcc -c`` check. All items must agree on ids."""
    specs = [SPECS[it[0]] for it in items]
    if len({sp.has_ids for sp in specs}) != 1:
        raise ValueError("items with and without ids need separate files")
    header, _ = sources("cuda", specs[0])
    f32 = {"lse", "ent", "c_ent", "c_lse", "lse_a", "lse_b", "kl", "c_kl", "c_lse_a", "c_lse_b", "c_tlp"}
    out = ["#include <cstdint>\n#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n", header]
    out.append("\nnamespace mlx::core::cu {\n")
    for k, ((name, dtype, vocab, tpb, vec), spec) in enumerate(zip(items, specs)):
        t = _CUDA_TYPES[dtype]
        params = []
        for n in spec.inputs:
            ty = "int32_t" if n in ("ids", "nrows") else ("float" if n in f32 else t)
            params.append(f"    const {ty}* {n}")
        for n in spec.outputs:
            params.append(f"    {t if n in ('grad', 'ga', 'gb') else 'float'}* {n}")
        _, body = sources("cuda", spec)
        out.append(f"__global__ void mlxgate_{name}_{k}(\n" + ",\n".join(params) + ") {\n")
        out.append(f"  constexpr int V = {vocab};\n  constexpr int TPB = {tpb};\n")
        out.append(f"  constexpr int VEC = {vec};\n  using T = {t};\n{body}\n}}\n\n")
    out.append("}  // namespace mlx::core::cu\n")
    return "".join(out)
