"""Compile the Metal kernel text on Linux: what mx.fast.metal_kernel would hand the Metal
compiler (mlxgate._vocab_kernels.metal_test_source: header, MLX's generated signature, body,
explicit instantiation), after tests/metal_shim/metal_stdlib_shim.h in place of
<metal_stdlib> + MLX's utils, through a host C++ compiler with -fsyntax-only.

Catches typos, wrong macro arities, undefined names (CUDA-isms included), type mismatches and,
with clang, `constant` vs `device` address-space mix-ups. It cannot catch what only Apple's
compiler knows: MSL-specific restrictions, attribute placement, codegen, or run-time results
(tests/test_kernels_metal.py checks those on Apple Silicon). Skipped without clang++ or g++.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mlxgate import _vocab_kernels as vk

SHIM_DIR = Path(__file__).resolve().parent / "metal_shim"


def _find_compiler() -> tuple[str | None, bool]:
    for cand in ["clang++"] + [f"clang++-{v}" for v in range(21, 13, -1)]:
        path = shutil.which(cand)
        if path:
            return path, True
    return shutil.which("g++"), False


CXX, IS_CLANG = _find_compiler()
pytestmark = pytest.mark.skipif(CXX is None, reason="no clang++ or g++ on PATH")

# MSL 3.x is C++14-based. The kernel/buffer/thread attributes mean nothing to a host compiler.
if IS_CLANG:
    FLAGS = ["-std=c++14", "-fsyntax-only", "-fno-exceptions", "-fno-rtti",
             "-Wno-unknown-attributes", "-Xclang", "-fnative-half-arguments-and-returns"]
else:
    FLAGS = ["-std=c++14", "-fsyntax-only", "-fno-exceptions", "-fno-rtti",
             "-Wno-attributes", "-Wno-unknown-pragmas"]

DTYPES = ["float32", "bfloat16", "float16"]
# Host compilers reject attribute lists on an explicit instantiation, which Metal's allows.
_INST_ATTRS = re.compile(r'^template \[\[host_name\("[^"]*"\)\]\] \[\[kernel\]\] ', re.M)


def _configs(name: str, dtype: str) -> list[tuple[int, int, int, int]]:
    """(rows, V, TPB, VEC) as mlxgate.ops would launch: a full-size vocabulary (vector
    loads, 1024 threads), an odd one (scalar loads), and a tiny one (< 8 elements, so every
    input arrives in the `constant` address space)."""
    out = []
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    for rows, vocab in [(16, 262144), (4, 4099), (1, 5)]:
        vec = 16 // itemsize if vocab % (16 // itemsize) == 0 else 1
        out.append((rows, vocab, vk.row_threads(vocab, vec), vec))
    return out


def _tu(src: str) -> str:
    return '#include "metal_stdlib_shim.h"\n' + _INST_ATTRS.sub("template ", src)


def _compile_all(tmp_path: Path, sources: list[str]) -> list[subprocess.CompletedProcess]:
    """Compile each translation unit, all at once (one process each)."""
    procs = []
    for k, src in enumerate(sources):
        f = tmp_path / f"k{k}.cpp"
        f.write_text(_tu(src))
        procs.append(subprocess.Popen([CXX, *FLAGS, "-I", str(SHIM_DIR), str(f)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(vk.SPECS))
def test_metal_kernel_text_compiles(tmp_path, name, dtype):
    cfgs = _configs(name, dtype)
    res = _compile_all(tmp_path, [vk.metal_test_source(name, dtype, *c) for c in cfgs])
    for cfg, r in zip(cfgs, res):
        assert r.returncode == 0, f"{name} {dtype} (rows, V, TPB, VEC)={cfg}:\n{r.stderr[-4000:]}"


def test_signature_mirrors_mlx():
    """The pieces of MLX's generated text the shim check relies on (metal_kernel.cpp)."""
    big = vk.metal_test_source("entropy_bwd_ids", "bfloat16", 16, 1000)
    head = "template <typename T, int V>\n[[kernel]] void custom_kernel_mlxgate_entropy_bwd_ids_"
    assert head + "_bfloat16_t_1000_" in big
    assert "  const device bfloat16_t* logits [[buffer(0)]],\n" in big
    assert "  const device float* lse [[buffer(1)]],\n" in big
    assert "  const constant int32_t* nrows [[buffer(5)]]," in big  # a 1-element array
    assert "  device bfloat16_t* grad [[buffer(8)]],\n  uint simdgroup_index_in_threadgroup" in big
    assert "  uint3 threads_per_grid [[threads_per_grid]]) {\n" in big
    assert re.search(r"decltype\((\w+)<bfloat16_t, 1000>\) \1<bfloat16_t, 1000>;\n$", big)
    small = vk.metal_test_source("kl_fwd", "float16", 1, 5, 32, 1)
    assert "template <typename T, int V, int TPB, int VEC>" in small
    assert "  const constant float16_t* a [[buffer(0)]],\n" in small
    assert "  const constant float16_t* b [[buffer(1)]],\n" in small
    assert "  device float* kl [[buffer(2)]]," in small
    assert "<float16_t, 5, 32, 1>" in small


# Each mutation must break the build; `old` must be in the text, so the mutation happens.
BREAKAGES = [
    ("misspelled function", "simd_shuffle_xor(", "simd_shufle_xor(", "simd_shufle_xor"),
    ("wrong macro arity", "#define MLXG_SHFL_XOR(v, m)", "#define MLXG_SHFL_XOR(v)", "MLXG_SHFL_XOR"),
    ("CUDA-ism", "metal::precise::exp(x)", "expf(x)", "expf"),
    ("misspelled macro use", "MLXG_BARRIER();", "MLXG_BARIER();", "MLXG_BARIER"),
    ("type mismatch", "r.m = sh_m[mlxg_lane];", "r.m = sh_m;", "sh_m"),
]


@pytest.mark.parametrize("what,old,new,needle", BREAKAGES, ids=[b[0] for b in BREAKAGES])
def test_check_fails_on_broken_prelude_or_body(tmp_path, what, old, new, needle):
    src = vk.metal_test_source("entropy_fwd_ids", "bfloat16", 16, 4099, 256, 1)
    assert old in src, f"mutation target {old!r} is gone; update BREAKAGES"
    (r,) = _compile_all(tmp_path, [src.replace(old, new)])
    assert r.returncode != 0, f"{what}: compiled although broken"
    assert needle in r.stderr


@pytest.mark.skipif(not IS_CLANG, reason="address spaces are only modelled under clang")
def test_check_catches_constant_input_taken_as_device(tmp_path):
    """What the bodies had before `const auto`: fine for large inputs, a Metal compile error
    once an input has < 8 elements (MLX then passes it as `const constant T*`)."""
    old = "const auto row = logits"
    srcs = [vk.metal_test_source("entropy_fwd", "float32", r, v, 32, 1) for r, v in [(4, 33), (1, 5)]]
    assert all(old in s for s in srcs)
    as_device = [s.replace(old, "const device T* row = logits") for s in srcs]
    big, small = _compile_all(tmp_path, as_device)
    assert big.returncode == 0, big.stderr[-4000:]
    assert small.returncode != 0
    assert "address_space" in small.stderr or "constant" in small.stderr
