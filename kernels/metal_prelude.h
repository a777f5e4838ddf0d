// Metal side of the per-backend macros used by vocab_common.h and the *.body files.
// mx.fast.metal_kernel wraps each body in a kernel templated on T, V, TPB, VEC. It adds the
// thread-position attributes it finds named in the body, so the prologue below names them.
#define MLXG_METAL 1
#define KFN inline
#define MLXG_SHARED threadgroup
#define MLXG_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define MLXG_UNROLL _Pragma("clang loop unroll(full)")
#define MLXG_SHFL_XOR(v, m) simd_shuffle_xor((v), (ushort)(m))
#define MLXG_EXP(x) metal::precise::exp(x)
#define MLXG_LOG(x) metal::precise::log(x)
#define MLXG_EXP_FAST(x) metal::exp(x)
#define MLXG_FMAX(a, b) metal::fmax((a), (b))
#define MLXG_FLT_MAX FLT_MAX
#define MLXG_INF INFINITY
#define MLXG_NAN NAN
// Apple GPUs have no 16-byte coalescing rule to honour: the same VEC-wide step, scalar loads.
#define MLXG_ALIGNED16(p) (true)
#define MLXG_LOAD_VEC(dst, p, i)                                              \
  {                                                                           \
    for (int mlxg_k_ = 0; mlxg_k_ < VEC; ++mlxg_k_)                           \
      dst[mlxg_k_] = static_cast<float>((p)[(i) + mlxg_k_]);                  \
  }
// ---- body prologue ----
const int mlxg_tid = (int)thread_index_in_threadgroup;
const int mlxg_lane = (int)thread_index_in_simdgroup;
const int mlxg_warp = (int)simdgroup_index_in_threadgroup;
const size_t mlxg_row = (size_t)threadgroup_position_in_grid.x;
const size_t mlxg_gid = (size_t)thread_position_in_grid.x;
const size_t mlxg_gsize = (size_t)threads_per_grid.x;
