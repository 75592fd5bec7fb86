// Warp-level tensor-core products for 16-bit operands staged in shared memory (sm_80+):
// the fp16 / bf16 mma.sync.m16n8k16 with fp32 accumulation, and fragment loads from
// padded row-major shared-memory tiles.  Device code only; included by the .cu kernels.
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4), as loaded below:
//   A (16x16, row): reg0 = A[g][2t..2t+1], reg1 = A[g+8][2t..], reg2 = A[g][2t+8..], reg3 = A[g+8][2t+8..]
//   B (16x8, col):  reg0 = B[2t..2t+1][g],  reg1 = B[2t+8..2t+9][g]
//   C (16x8, f32):  c0, c1 = C[g][2t..2t+1], c2, c3 = C[g+8][2t..2t+1]
// So the C fragments of two adjacent n-tiles of a score tile are exactly the A
// fragment of the next product (P V, P^T dO, dS^T Q) once packed to 16 bits: scores
// never leave registers on their way from one product to the next.
//
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace {

// ------------------------------------------------------------------ 16-bit types
struct Fp16 {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

struct Bf16 {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

// ------------------------------------------------------------------ shared-memory operands
// A tile of R rows x C 16-bit elements in shared memory, row stride C + kPad.
struct Smem {
  uint16_t* p;
  int ld;
  __device__ __forceinline__ uint32_t pair(int r, int c) const {  // elements (r, c), (r, c + 1); c even
    return *reinterpret_cast<const uint32_t*>(p + r * ld + c);
  }
  __device__ __forceinline__ uint32_t column_pair(int r, int c) const {  // elements (r, c), (r + 1, c)
    return static_cast<uint32_t>(p[r * ld + c]) | (static_cast<uint32_t>(p[(r + 1) * ld + c]) << 16);
  }
};

// A fragment of rows [r0, r0 + 16), columns [k0, k0 + 16) of a row-major tile.
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const Smem& s, int r0, int k0, int g, int t) {
  a[0] = s.pair(r0 + g, k0 + 2 * t);
  a[1] = s.pair(r0 + g + 8, k0 + 2 * t);
  a[2] = s.pair(r0 + g, k0 + 2 * t + 8);
  a[3] = s.pair(r0 + g + 8, k0 + 2 * t + 8);
}
// B fragment (k = [k0, k0+16), n = [n0, n0+8)) when B[k][n] = s(n, k) (s holds B^T row-major).
__device__ __forceinline__ void load_b_t(uint32_t (&b)[2], const Smem& s, int k0, int n0, int g, int t) {
  b[0] = s.pair(n0 + g, k0 + 2 * t);
  b[1] = s.pair(n0 + g, k0 + 2 * t + 8);
}
// B fragment when B[k][n] = s(k, n) (s holds B row-major).
__device__ __forceinline__ void load_b(uint32_t (&b)[2], const Smem& s, int k0, int n0, int g, int t) {
  b[0] = s.column_pair(k0 + 2 * t, n0 + g);
  b[1] = s.column_pair(k0 + 2 * t + 8, n0 + g);
}

// c = A B^T, A's rows [r0, r0 + 16) (this warp's) against the first 8 * NT rows of B, the
// reduction over D columns: a score-shaped tile as the C fragments of NT n-tiles.
template <typename Ty, int D, int NT>
__device__ __forceinline__ void product_nt(float (&c)[NT][4], const Smem& a, const Smem& b, int r0, int g, int t) {
#pragma unroll
  for (int j = 0; j < NT; ++j) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D; kk += 16) {
    uint32_t x[4];
    load_a(x, a, r0, kk, g, t);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      uint32_t y[2];
      load_b_t(y, b, kk, j * 8, g, t);
      Ty::mma(c[j], x, y);
    }
  }
}

}  // namespace
