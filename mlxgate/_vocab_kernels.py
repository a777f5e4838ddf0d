"""Build the fused vocabulary kernels of ``kernels/`` for Metal and CUDA (SPEC §4).

One algorithm, one set of bodies: ``kernels/vocab_common.h`` holds the streaming reductions,
``kernels/*.body`` the kernel bodies, and ``kernels/{cuda,metal}_prelude.h`` the few
per-backend macros (shuffles, barriers, loads) plus a short prologue that names the thread
indices. ``mlxgate.ops`` is the only caller; :func:`cuda_test_source` gives tests the exact
text MLX would JIT, wrapped as plain ``__global__`` functions for ``nvcc``, and
:func:`host_test_source` the same bodies for a CPU emulator (tests/kernel_host/).
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


# mx.fast.metal_kernel's names for the dtypes (mlx/backend/common/compiled.cpp get_type_string).
_METAL_TYPES = {
    "float32": "float", "bfloat16": "bfloat16_t", "float16": "float16_t", "int32": "int32_t"
}
# The thread-position arguments MLX adds when their name occurs in the body, in its order
# (mlx/backend/common/metal_kernel.cpp, metal_kernel()).
_METAL_ATTRS = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"), ("grid_origin", "uint3"), ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"), ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"), ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"), ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"), ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"), ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"), ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"), ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)
_METAL_CONSTANT_BELOW = 8  # inputs with fewer elements go in the `constant` address space


def metal_test_source(
    name: str, dtype: str, rows: int, vocab: int, tpb: int = 32, vec: int = 1
) -> str:
    """The text mx.fast.metal_kernel appends to its Metal utils header for kernel ``name``
    called the way mlxgate.ops calls it on ``rows`` x ``vocab`` inputs of ``dtype``
    ('float32' | 'bfloat16' | 'float16'): our header, a ``[[kernel]] void`` template with
    MLX's generated signature, the body, and MLX's explicit instantiation. Mirrors
    write_signature/metal_kernel in mlx/backend/common/metal_kernel.cpp (same text from
    v0.32.0 to at least 2026-08 main); ``rows`` matters because MLX (since v0.26.2) passes
    inputs of < 8 elements as ``const constant T*``. For a syntax check on Linux
    (tests/test_kernels_metal_shim.py); MLX itself never calls this."""
    spec = SPECS[name]
    header, body = sources("metal", spec)
    t = _METAL_TYPES[dtype]
    fwd = spec.body.endswith("_fwd")
    targs = [("typename", "T", t), ("int", "V", vocab)]
    if fwd:
        targs += [("int", "TPB", tpb), ("int", "VEC", vec)]
    # Input dtypes and sizes as mlxgate.ops passes them (float32 stats/cotangents, int32 ids).
    ins = []
    for n in spec.inputs:
        if n in ("logits", "a", "b"):
            ins.append((n, t, rows * vocab))
        elif n == "nrows":
            ins.append((n, "int32_t", 1))
        else:
            ins.append((n, "int32_t" if n == "ids" else "float", rows))
    outs = [(n, "float" if fwd else t) for n in spec.outputs]
    tdef = "<" + ", ".join(str(v) for _, _, v in targs) + ">"
    thash = tdef.replace(", ", "_").replace("<", "_").replace(">", "_")[:-1]
    kname = f"custom_kernel_mlxgate_{name}_{thash}"
    for _, ty, size in ins:
        kname += f"_{ty}" + ("c" if size < _METAL_CONSTANT_BELOW else "")
    kname += "".join(f"_{ty}" for _, ty in outs)
    params = []
    for i, (n, ty, size) in enumerate(ins):
        space = "constant" if size < _METAL_CONSTANT_BELOW else "device"
        params.append(f"  const {space} {ty}* {n} [[buffer({i})]]")
        if any(f"{n}_{s}" in body for s in ("shape", "strides", "ndim")):
            raise NotImplementedError("shape/strides/ndim arguments are not mirrored")
    params += [f"  device {ty}* {n} [[buffer({len(ins) + i})]]" for i, (n, ty) in enumerate(outs)]
    params += [f"  {ty} {a} [[{a}]]" for a, ty in _METAL_ATTRS if a in body]
    out = [header, "template <" + ", ".join(f"{k} {n}" for k, n, _ in targs) + ">\n"]
    out.append(f"[[kernel]] void {kname}(\n" + ",\n".join(params) + ") {\n" + body + "\n}\n")
    inst = f"decltype({kname}{tdef}) {kname}{tdef};\n"
    out.append(f'\ntemplate [[host_name("{kname}")]] [[kernel]] {inst}')
    return "".join(out)


_HOST_TYPES = {"float32": "float", "bfloat16": "mlxg_h::bf16", "float16": "_Float16"}


def host_test_source(items: list[tuple[str, str, int, int, int]], prelude: str) -> str:
    """One C++20 file that runs each (name, dtype, V, TPB, VEC) body on the CPU, for
    tests/test_kernels_host.py (a SIMT emulator; MLX never calls this). ``prelude`` is the
    text of tests/kernel_host/host_prelude.h, split at the same prologue marker as the CUDA
    and Metal preludes; then vocab_common.h, then per item the unchanged body inside a
    function whose template arguments are constexprs (as in :func:`cuda_test_source`), taking
    checked pointers, and an ``extern "C" int mlxgate_<name>_<k>(void* const* bufs, const
    int64_t* counts, int64_t blocks, int bdim)`` launcher: ``bufs``/``counts`` are the
    inputs then the outputs of SPECS[name] and their element counts, ``blocks`` x ``bdim``
    the launch grid (a *_fwd kernel needs bdim == TPB and one block per row). Returns 0, or
    1 with ``mlxg_h_last_error()`` set."""
    head, prologue = prelude.split(_MARKER)
    f32 = {"lse", "ent", "c_ent", "c_lse", "lse_a", "lse_b", "kl", "c_kl", "c_lse_a", "c_lse_b", "c_tlp"}
    out = [head, "\n", _read("vocab_common.h"), "\n"]
    for k, (name, dtype, vocab, tpb, vec) in enumerate(items):
        spec = SPECS[name]
        t = _HOST_TYPES[dtype]
        types = {n: ("int32_t" if n in ("ids", "nrows") else ("float" if n in f32 else t)) for n in spec.inputs}
        types.update({n: (t if n in ("grad", "ga", "gb") else "float") for n in spec.outputs})
        fn = f"mlxgate_{name}_{k}"
        params = ["    const mlxg_h::Ix& mlxg_h_ix"]
        params += [f"    const mlxg_h::Ptr<const {types[n]}> {n}" for n in spec.inputs]
        params += [f"    const mlxg_h::Ptr<{types[n]}> {n}" for n in spec.outputs]
        body = prologue.strip() + "\n" + _read(f"{spec.body}.body")
        if spec.has_ids:
            out.append("#define MLXG_HAS_IDS 1\n")
        out.append(f"static void {fn}_body(\n" + ",\n".join(params) + ") {\n")
        out.append(f"  constexpr int V = {vocab};\n  constexpr int TPB = {tpb};\n")
        out.append(f"  constexpr int VEC = {vec};\n  using T = {t};\n{body}\n}}\n")
        if spec.has_ids:
            out.append("#undef MLXG_HAS_IDS\n")
        names = list(spec.inputs) + list(spec.outputs)
        nin = len(spec.inputs)
        launch = [f'extern "C" MLXG_H_EXPORT int {fn}(void* const* bufs, const int64_t* counts, int64_t blocks, int bdim) {{\n']
        launch.append(f"  mlxg_h::Launch L(bufs, counts, {nin}, {len(spec.outputs)});\n")
        for i, n in enumerate(names):
            kind = "in" if i < nin else "out"
            launch.append(f'  const auto {n} = L.{kind}<{types[n]}>({i}, "{n}");\n')
        onames = ", ".join(f'"{n}"' for n in spec.outputs)
        launch.append(f"  static const char* const out_names[] = {{{onames}}};\n")
        args = ", ".join(["ix"] + names)
        launch.append(f"  auto run = [&](const mlxg_h::Ix& ix) {{ {fn}_body({args}); }};\n")
        if spec.body.endswith("_fwd"):
            launch.append(f"  if (bdim != {tpb}) return 2;  // the body assumes blockDim == TPB\n")
            launch.append(f"  L.run_blocks(blocks, bdim, run);\n")
        else:
            launch.append(f"  L.run_flat(blocks, bdim, run);\n")
        launch.append("  return L.finish(out_names);\n}\n\n")
        out.extend(launch)
    return "".join(out)
