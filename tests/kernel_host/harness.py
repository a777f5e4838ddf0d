"""Build and call the host (CPU) builds of the kernel bodies in kernels/ (a SIMT emulator).

:func:`build` compiles sources from ``mlxgate._vocab_kernels.host_test_source`` with g++ or
clang++ (C++20) into shared objects; :class:`HostKernels` calls their launchers through ctypes.
The launch helpers take row-major arrays [rows, vocab] in storage form (float32, float16, or
bfloat16 as uint16 bits) and return float32 [rows] statistics (nats) or gradients in storage
form. Shapes and launch grids mirror mlxgate.ops (one TPB-thread block per row for the
forward bodies, a 256-thread grid-stride launch of at most 8192 blocks for the backward).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from mlxgate import _vocab_kernels as vk

HERE = Path(__file__).resolve().parent
PRELUDE = HERE / "host_prelude.h"
RUNTIME = HERE / "host_runtime.h"
# -ffp-contract=fast with FMA: NVRTC's default -fmad=true contracts a*b+c the same way.
FLAGS = ["-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-ffp-contract=fast",
         "-fno-strict-aliasing", "-fvisibility=hidden", "-Wall", "-Wextra", "-Werror", "-Wno-unused-variable",
         "-Wno-unused-local-typedefs"]
STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
ELEMENTWISE_TPB = 256  # mlxgate.ops._elementwise_grid
ELEMENTWISE_MAX_BLOCKS = 8192


class KernelError(RuntimeError):
    """A launch the emulator refused or that failed a check (bounds, alignment, hang)."""


@functools.lru_cache(maxsize=None)
def compiler() -> tuple[str, list[str]] | None:
    """(compiler, extra flags) that builds a C++20 <barrier>/_Float16 probe, else None."""
    probe = ("#include <barrier>\n#include <bit>\n#include <atomic>\n"
             "int main(){std::barrier b(1); b.arrive_and_wait(); _Float16 h = (_Float16)1.5f;"
             " std::atomic<unsigned> a{0}; a.notify_all(); return std::bit_cast<unsigned short>(h) == 0x3e00 ? 0 : 1;}\n")
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"mlxg_host_probe_{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        (tmp / "p.cpp").write_text(probe)
        for cxx in ("g++", "clang++"):
            exe = shutil.which(cxx)
            if exe is None:
                continue
            for extra in (["-mfma"], []):
                res = subprocess.run([exe, "-std=c++20", "-pthread", *extra, str(tmp / "p.cpp"),
                                      "-o", str(tmp / "p")], capture_output=True, timeout=120)
                if res.returncode == 0 and subprocess.run([str(tmp / "p")]).returncode == 0:
                    return exe, extra
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def source(items: list[tuple[str, str, int, int, int]]) -> str:
    """The C++ text for ``items`` ((name, dtype, V, TPB, VEC) as in cuda_test_source)."""
    return vk.host_test_source(items, PRELUDE.read_text())


def build(sources: list[str], cache_dir: Path) -> list[Path]:
    """Compile each source to a shared object in ``cache_dir`` (concurrently; a source whose
    hash, with the runtime header and flags, is already built is reused)."""
    cc = compiler()
    if cc is None:
        raise KernelError("no C++20 compiler with <barrier> and _Float16")
    exe, extra = cc
    cache_dir.mkdir(parents=True, exist_ok=True)
    flags = FLAGS + extra + ["-I", str(HERE)]
    procs, outs = [], []
    for src in sources:
        key = hashlib.sha256("\0".join([src, RUNTIME.read_text(), exe, *flags]).encode()).hexdigest()[:20]
        so = cache_dir / f"mlxg_host_{key}.so"
        outs.append(so)
        if so.exists():
            continue
        cpp = cache_dir / f"mlxg_host_{key}.cpp"
        cpp.write_text(src)
        tmp = cache_dir / f"mlxg_host_{key}.{os.getpid()}.tmp"
        procs.append((subprocess.Popen([exe, *flags, str(cpp), "-o", str(tmp)], stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True), tmp, so))
    for p, tmp, so in procs:
        log, _ = p.communicate(timeout=600)
        if p.returncode != 0:
            raise KernelError(f"host build failed:\n{log[-6000:]}")
        tmp.replace(so)
    return outs


class HostKernels:
    """The launchers of one shared object built from ``source(items)``."""

    def __init__(self, so: Path, items: list[tuple[str, str, int, int, int]]):
        self.lib = ctypes.CDLL(str(so))
        self.items = list(items)
        self.lib.mlxg_h_last_error.restype = ctypes.c_char_p
        self.lib.mlxg_h_set_watchdog.argtypes = [ctypes.c_double]
        self.lib.mlxg_h_set_mode.argtypes = [ctypes.c_int, ctypes.c_uint64]
        self.lib.mlxg_h_exp_fast.argtypes = [ctypes.c_float]
        self.lib.mlxg_h_exp_fast.restype = ctypes.c_float
        self.set_mode("fibers")

    def exp_fast(self, x: float) -> float:
        """MLXG_EXP_FAST(x) as this build computes it."""
        return float(self.lib.mlxg_h_exp_fast(x))

    def set_mode(self, mode: str, seed: int = 0) -> None:
        """'fibers' (one OS thread, fibers resumed in order, or shuffled per pass when seed
        != 0) or 'threads' (one std::thread per virtual thread, free-running)."""
        if mode not in ("fibers", "threads"):
            raise ValueError(mode)
        self.lib.mlxg_h_set_mode(int(mode == "fibers"), seed)

    def set_watchdog(self, seconds: float) -> None:
        self.lib.mlxg_h_set_watchdog(seconds)

    def launch(self, item, arrays: list[np.ndarray], blocks: int, bdim: int) -> None:
        """Run item's kernel on ``arrays`` (its inputs then outputs, C-contiguous, in place)."""
        k = self.items.index(item)
        fn = getattr(self.lib, f"mlxgate_{item[0]}_{k}")
        fn.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64),
                       ctypes.c_int64, ctypes.c_int]
        for a in arrays:
            assert a.flags.c_contiguous
        ptrs = (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
        counts = (ctypes.c_int64 * len(arrays))(*[a.size for a in arrays])
        rc = fn(ptrs, counts, blocks, bdim)
        if rc != 0:
            raise KernelError(f"rc={rc}: {self.lib.mlxg_h_last_error().decode()}")


def set_mode(kern: dict, mode: str, seed: int = 0) -> None:
    """Set the launch mode of every shared object in an :func:`open_all` result."""
    for hk in {id(h): h for h in kern.values()}.values():
        hk.set_mode(mode, seed)


def open_all(items, cache_dir: Path, parts: int = 2) -> dict:
    """{item: HostKernels}, the items compiled as ``parts`` concurrent translation units."""
    chunks = [items[i::parts] for i in range(parts) if items[i::parts]]
    sos = build([source(c) for c in chunks], cache_dir)
    out = {}
    for c, so in zip(chunks, sos):
        hk = HostKernels(so, c)
        out.update({it: hk for it in c})
    return out


# ------------------------------------------------------------------ storage conversions


def to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """float values -> the dtype's storage (bf16: round-to-nearest-even bits as uint16)."""
    f = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "bfloat16":
        u = f.view(np.uint32).astype(np.uint64)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        nan = np.isnan(f)
        r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
        return r
    return f.astype(STORAGE[dtype])


def values(s: np.ndarray, dtype: str) -> np.ndarray:
    """Storage -> the exact float64 values it holds."""
    if dtype == "bfloat16":
        return (s.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return s.astype(np.float64)


def _offset(x: np.ndarray, misalign: bool) -> np.ndarray:
    """A C-contiguous copy of x, starting one element past a 64-byte boundary if misalign."""
    if not misalign:
        return np.ascontiguousarray(x)
    buf = np.empty(x.size + 64, dtype=x.dtype)
    start = (-buf.ctypes.data % 64) // x.itemsize + 1
    out = buf[start:start + x.size].reshape(x.shape)
    out[...] = x
    return out


# ------------------------------------------------------------------------ launches


def entropy_fwd(kern: dict, item, x: np.ndarray, ids: np.ndarray | None = None,
                misalign: bool = False) -> dict[str, np.ndarray]:
    """(H, lse[, log p(id)]) of storage rows x [rows, V]: float32 [rows] each (nats)."""
    rows = x.shape[0]
    arrays = [_offset(x, misalign)]
    if ids is not None:
        arrays.append(np.ascontiguousarray(ids, dtype=np.int32))
    outs = [np.full(rows, np.nan, np.float32) for _ in range(2 if ids is None else 3)]
    kern[item].launch(item, arrays + outs, rows, item[3])
    keys = ["entropy", "logsumexp", "target_logprob"]
    return dict(zip(keys, outs))


def kl_fwd(kern: dict, item, a: np.ndarray, b: np.ndarray, misalign: bool = False):
    """(KL(P||Q), lse_a, lse_b) of storage rows a (P), b (Q) [rows, V]: float32 [rows] each."""
    rows = a.shape[0]
    outs = [np.full(rows, np.nan, np.float32) for _ in range(3)]
    kern[item].launch(item, [_offset(a, misalign), _offset(b, misalign)] + outs, rows, item[3])
    return outs


def elementwise_blocks(total: int) -> int:
    return max(1, min(-(-total // ELEMENTWISE_TPB), ELEMENTWISE_MAX_BLOCKS))


def entropy_bwd(kern: dict, item, x, lse, ent, c_ent, c_lse, ids=None, c_tlp=None,
                blocks: int | None = None) -> np.ndarray:
    """d(sum c_ent H + c_lse lse [+ c_tlp log p(id)])/dx, storage dtype [rows, V]."""
    rows = x.shape[0]
    f = [np.ascontiguousarray(v, dtype=np.float32) for v in (lse, ent, c_ent, c_lse)]
    ins = [np.ascontiguousarray(x), *f, np.array([rows], np.int32)]
    if ids is not None:
        ins += [np.ascontiguousarray(ids, dtype=np.int32), np.ascontiguousarray(c_tlp, dtype=np.float32)]
    grad = np.zeros_like(x)
    blocks = elementwise_blocks(x.size) if blocks is None else blocks
    kern[item].launch(item, ins + [grad], blocks, ELEMENTWISE_TPB)
    return grad


def kl_bwd(kern: dict, item, a, b, lse_a, lse_b, kl, c_kl, c_la, c_lb, blocks: int | None = None):
    """(d/da, d/db) of sum c_kl KL + c_la lse_a + c_lb lse_b, storage dtype [rows, V] each."""
    rows = a.shape[0]
    f = [np.ascontiguousarray(v, dtype=np.float32) for v in (lse_a, lse_b, kl, c_kl, c_la, c_lb)]
    ins = [np.ascontiguousarray(a), np.ascontiguousarray(b), *f, np.array([rows], np.int32)]
    ga, gb = np.zeros_like(a), np.zeros_like(b)
    blocks = elementwise_blocks(a.size) if blocks is None else blocks
    kern[item].launch(item, ins + [ga, gb], blocks, ELEMENTWISE_TPB)
    return ga, gb
