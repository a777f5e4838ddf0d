// CUDA side of the per-backend macros used by vocab_common.h and the *.body files.
// mx.fast.cuda_kernel wraps each body in a __global__ function templated on T, V, TPB, VEC.
#define MLXG_CUDA 1
#define KFN __device__ __forceinline__
#define MLXG_SHARED __shared__
#define MLXG_BARRIER() __syncthreads()
// Fixed-count loops over a step's values: unrolled, so the value arrays stay in registers
// (not unrolled, nvcc put a bf16 KL step's 32 floats in local memory).
#define MLXG_UNROLL _Pragma("unroll")
#define MLXG_SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m))
#define MLXG_EXP(x) expf(x)
// The per-element exp: ex2.approx (rel. error ~2^-22, exp(-inf) = 0), one MUFU op.
#define MLXG_EXP_FAST(x) __expf(x)
#define MLXG_FMAX(a, b) fmaxf((a), (b))
#define MLXG_FLT_MAX 3.402823466e+38f
#define MLXG_LOG(x) logf(x)
#define MLXG_INF __int_as_float(0x7f800000)
#define MLXG_NAN __int_as_float(0x7fffffff)
#define MLXG_ALIGNED16(p) ((reinterpret_cast<size_t>(p) & size_t(15)) == 0)

// VEC consecutive elements of T in one 16-byte load (row start must be 16-byte aligned).
template <typename U, int N>
struct alignas(sizeof(U) * N) MlxgVec {
  U v[N];
};
#define MLXG_LOAD_VEC(dst, p, i)                                              \
  {                                                                           \
    const MlxgVec<T, VEC> mlxg_x_ =                                           \
        *reinterpret_cast<const MlxgVec<T, VEC>*>((p) + (i));                 \
    _Pragma("unroll") for (int mlxg_k_ = 0; mlxg_k_ < VEC; ++mlxg_k_)         \
        dst[mlxg_k_] = static_cast<float>(mlxg_x_.v[mlxg_k_]);                \
  }
// ---- body prologue ----
const int mlxg_tid = (int)threadIdx.x;
const int mlxg_lane = mlxg_tid & 31;
const int mlxg_warp = mlxg_tid >> 5;
const size_t mlxg_row = (size_t)blockIdx.x;
const size_t mlxg_gid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
const size_t mlxg_gsize = (size_t)gridDim.x * blockDim.x;
