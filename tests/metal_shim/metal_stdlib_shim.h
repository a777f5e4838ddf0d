// Stand-in for `#include <metal_stdlib>` plus MLX's Metal utils header, so that the text
// mx.fast.metal_kernel compiles (see mlxgate._vocab_kernels.metal_test_source) can be checked
// by a host C++ compiler with -fsyntax-only. Used by tests/test_kernels_metal_shim.py only.
//
// Mirrors Metal Shading Language 3.1 (the first with `bfloat`, which MLX 0.32's bf16.h needs:
// `typedef bfloat bfloat16_t`) and declares ONLY what kernels/metal_prelude.h,
// kernels/vocab_common.h and kernels/*.body use, each with its MSL signature:
//   MSL 3.1 §2.1  scalar types half, bfloat, uint, ushort, size_t, int32_t; §2.2 uint3
//   §4     address spaces device / constant / threadgroup (clang: real, distinct address
//          spaces, so passing a `constant` buffer where `device` is expected is an error)
//   §6.5   T exp(T), T log(T), T fmax(T, T) for T = float and half (so exp(1) is ambiguous,
//          as in Metal); float precise::exp, precise::log; INFINITY, NAN, FLT_MAX
//   §6.9.1 void threadgroup_barrier(mem_flags); enum mem_flags
//   §6.9.2 T simd_shuffle_xor(T data, ushort mask)
// Anything else (e.g. a CUDA-ism such as expf, fmaxf, __syncthreads) is deliberately
// undeclared: no standard C/C++ header is included, so it is an error here as on Metal.
// Declarations only: -fsyntax-only never needs a definition.
#pragma once

#if defined(__clang__)
// Distinct address spaces: clang rejects a pointer conversion between them, as Metal does.
#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
// A threadgroup array lives for the whole threadgroup; a host compiler refuses an automatic
// variable in an address space, so it is declared static (syntax check only).
#define threadgroup static __attribute__((address_space(3)))
#else
// g++ has no C++ address spaces: this fallback cannot catch device/constant mix-ups.
#define device
#define constant
#define threadgroup static
#endif

typedef unsigned int uint;
typedef unsigned short ushort;
typedef __SIZE_TYPE__ size_t;
typedef int int32_t;

struct uint3 {
  uint x, y, z;
};

#if defined(__clang__)
// clang's storage-only 16-bit float: implicit conversions and float arithmetic, like `half`
// (the test passes -fnative-half-arguments-and-returns so it may be a parameter type).
typedef __fp16 half;
#else
typedef _Float16 half;
#endif
// MSL's bfloat also does arithmetic; a host compiler here has no bf16 type that can live in
// an address space, so it is a scoped enum: only explicit static_cast to and from float (all
// the bodies do) compiles. Stricter than Metal, never looser.
enum class bfloat : unsigned short {};

#define FLT_MAX __FLT_MAX__
#define INFINITY __builtin_inff()
#define NAN __builtin_nanf("")

namespace metal {

float exp(float x);
half exp(half x);
float log(float x);
half log(half x);
float fmax(float x, float y);
half fmax(half x, half y);

// The precise:: variants exist for float only (as the fast:: ones, which the kernels do not use).
namespace precise {
float exp(float x);
float log(float x);
}  // namespace precise

enum class mem_flags : uint {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 8,
  mem_object_data = 16,
};
void threadgroup_barrier(mem_flags flags);

// T: a scalar of the listed types (vectors exist in MSL too; the kernels shuffle floats).
float simd_shuffle_xor(float data, ushort mask);
half simd_shuffle_xor(half data, ushort mask);
int simd_shuffle_xor(int data, ushort mask);
uint simd_shuffle_xor(uint data, ushort mask);
short simd_shuffle_xor(short data, ushort mask);
ushort simd_shuffle_xor(ushort data, ushort mask);

}  // namespace metal

// MLX's utils header (mlx/backend/metal/kernels/bf16.h, utils.h in MLX 0.32).
using namespace metal;
typedef bfloat bfloat16_t;
typedef half float16_t;
