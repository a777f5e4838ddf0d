// Host (g++, C++20) side of the per-backend macros used by vocab_common.h and the *.body files:
// runs the CUDA bodies on the CPU, one std::thread per virtual thread (host_runtime.h), for
// tests/test_kernels_host.py. Mirrors kernels/cuda_prelude.h macro for macro; compiled with
// FMA contraction on, as nvcc/NVRTC's default -fmad=true (MLX passes no fast-math flags).
#include "host_runtime.h"
#define MLXG_HOST 1
#define KFN inline
// One block at a time, so function-local statics are the block's shared memory.
#define MLXG_SHARED static MLXG_H_SHARED_SECTION
#define MLXG_BARRIER() mlxg_h::block_barrier()
#define MLXG_UNROLL
// Per-warp exchange among the 32 lanes (tid & 31) of the calling thread's warp (tid >> 5).
#define MLXG_SHFL_XOR(v, m) mlxg_h::shfl_xor((v), (m))
// glibc expf/logf (<= 1 ulp) for CUDA's expf/logf (<= 2 ulp / 1 ulp).
#define MLXG_EXP(x) expf(x)
// __expf: exp2 of the float product x * log2(e), as ex2.approx gets it.
#define MLXG_EXP_FAST(x) mlxg_h::expf_approx(x)
#define MLXG_FMAX(a, b) fmaxf((a), (b))
#define MLXG_FLT_MAX 3.402823466e+38f
#define MLXG_LOG(x) logf(x)
#define MLXG_INF mlxg_h::bits_f32(0x7f800000u)
#define MLXG_NAN mlxg_h::bits_f32(0x7fffffffu)
#ifndef MLXG_H_METAL_LOADS
#define MLXG_ALIGNED16(p) ((mlxg_h::addr(p) & size_t(15)) == 0)

// VEC consecutive elements of T in one 16-byte load; faults (reported) if misaligned.
template <typename U, int N>
struct alignas(sizeof(U) * N) MlxgVec {
  U v[N];
};
#define MLXG_LOAD_VEC(dst, p, i)                                                      \
  {                                                                                   \
    const MlxgVec<T, VEC> mlxg_x_ = mlxg_h::load_vec<MlxgVec<T, VEC>>((p) + (i), VEC); \
    for (int mlxg_k_ = 0; mlxg_k_ < VEC; ++mlxg_k_)                                   \
      dst[mlxg_k_] = static_cast<float>(mlxg_x_.v[mlxg_k_]);                          \
  }
#else
// metal_prelude.h's loads: the VEC-wide steps on any row start, element by element.
#define MLXG_ALIGNED16(p) (true)
#define MLXG_LOAD_VEC(dst, p, i)                                              \
  {                                                                           \
    for (int mlxg_k_ = 0; mlxg_k_ < VEC; ++mlxg_k_)                           \
      dst[mlxg_k_] = static_cast<float>((p)[(i) + mlxg_k_]);                  \
  }
#endif
// ---- body prologue ----
const int mlxg_tid = mlxg_h_ix.tid;
const int mlxg_lane = mlxg_tid & 31;
const int mlxg_warp = mlxg_tid >> 5;
const size_t mlxg_row = mlxg_h_ix.block;
const size_t mlxg_gid = mlxg_h_ix.block * mlxg_h_ix.bdim + (size_t)mlxg_h_ix.tid;
const size_t mlxg_gsize = mlxg_h_ix.grid * mlxg_h_ix.bdim;
