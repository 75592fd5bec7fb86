// STATUS: compiled, unverified (never run on a GPU).
//
// CUDA fused scale -> mask -> softmax -> dropout, forward and backward, on (R, N) row
// matrices (the kernel-level contract of fastlm/reference/softmax.py).
//
// * Short rows (N <= 32 lanes * 4 packs * 16 bytes): one warp per row, 4 rows per
//   block; the row lives in registers and is read/written with 16-byte vector
//   accesses when N is a multiple of the vector width (pointer alignment checked).
//   Reductions are warp shuffles only.
// * Medium rows (up to 1024 threads * 4 packs): one block per row, same register
//   scheme, reductions through shared memory.
// * Longer rows, any length: each row split into segments of one block each (rows x
//   segments ~ 1024 blocks, segments >= 8192 elements), two launches per direction:
//   per-segment online max / rescaled sum (backward: partial sum(g * y)) into a float
//   workspace the torch glue allocates, then each segment combines its row's partials
//   and writes (x read twice, written once).
// Templates: dtype x {warp, block} x packs {1, 2, 4} + 2 segment kernels, forward and
// backward: 48 kernels, to keep the build short.
//
// Numerics: fp32 accumulation; a row whose entries are all -inf after masking gives
// zeros (and zero gradients).  Dropout: column c of row r is kept when the 32-bit
// uniform from splitmix64(key_r + (c / 2) * golden) (low half for even c, high half
// for odd c; key_r = splitmix64(seed + r * golden)) is >= p * 2^32: the same stream
// as the C++ CPU kernel (csrc/common/dropout.h), regenerated in the backward.
#include "softmax.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/dropout.h"
#include "convert.cuh"

#include <algorithm>
#include <cstdint>

namespace fastlm_softmax {
namespace {

using fastlm_cuda::from_float;
using fastlm_cuda::to_float;

constexpr int kWarp = 32;
constexpr int kWarpRowsPerBlock = 4;
constexpr int kMaxPacks = 4;
constexpr int kOnlineThreads = 512;
constexpr int64_t kSegmentBlocks = 1024;  // long rows: split until rows x segments reaches this
constexpr int64_t kMinSegment = 8192;     // elements per segment at least

struct Drop {
  bool on;
  uint32_t threshold;  // keep when uniform32 >= threshold
  float keep_scale;    // 1 / (1 - p)
  uint64_t seed;
  __device__ __forceinline__ uint64_t row_key(int64_t row) const { return fastlm_softmax_dropout_row(seed, uint64_t(row)); }
  __device__ __forceinline__ float mult(uint64_t key, int64_t col) const {
    const uint64_t h = fastlm_mix64(key + uint64_t(col >> 1) * kFastlmGolden);
    const uint32_t u = (col & 1) ? uint32_t(h >> 32) : uint32_t(h);
    return u >= threshold ? keep_scale : 0.f;
  }
};

Drop make_drop(float p, uint64_t seed) {
  Drop d;
  d.on = p > 0.f;
  d.threshold = fastlm_dropout_threshold(p);
  d.keep_scale = d.on ? float(1.0 / (1.0 - double(p))) : 1.f;
  d.seed = seed;
  return d;
}

__device__ __forceinline__ int64_t mask_base(const MaskView& m, int64_t row) {
  const int64_t inner = m.d1 * m.d2;
  const int64_t rem = row % inner;
  return (row / inner) * m.s0 + (rem / m.d2) * m.s1 + (rem % m.d2) * m.s2;
}

// x * scale (+ mask) for one element; -inf where a bool mask drops it.
template <typename T>
__device__ __forceinline__ float masked_score(float xv, float scale, const MaskView& m, int64_t base, int64_t col) {
  float z = xv * scale;
  if (m.kind == MaskKind::kBool) {
    z = static_cast<const uint8_t*>(m.data)[base + col * m.s3] ? z : -INFINITY;
  } else if (m.kind == MaskKind::kAdditive) {
    z += to_float(static_cast<const T*>(m.data)[base + col * m.s3]);
  }
  return z;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Row-wide reductions: a warp's row needs shuffles only; a block's row combines the
// warps through shared memory (the leading barrier protects the slots' previous use).
template <bool kWarpRow>
__device__ __forceinline__ float row_reduce(float v, bool is_max) {
  v = is_max ? warp_max(v) : warp_sum(v);
  if (kWarpRow) return v;
  __shared__ float slots[kWarp];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  __syncthreads();
  if (lane == 0) slots[warp] = v;
  __syncthreads();
  const int warps = blockDim.x / kWarp;
  v = lane < warps ? slots[lane] : (is_max ? -INFINITY : 0.f);
  return is_max ? warp_max(v) : warp_sum(v);
}

// A 16-byte pack of consecutive elements.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kVec = 16 / sizeof(T);
  T v[kVec];
};

// Loads pack k of this thread (columns col0 .. col0 + kVec - 1) as floats, `fill` past n.
template <typename T>
__device__ __forceinline__ void load_pack(const T* row, int64_t col0, int64_t n, bool vec_ok, float fill, float* out) {
  constexpr int kVec = Pack<T>::kVec;
  if (vec_ok && col0 < n) {  // n % kVec == 0: the whole pack is in the row
    const Pack<T> p = *reinterpret_cast<const Pack<T>*>(row + col0);
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] = to_float(p.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] = col0 + i < n ? to_float(row[col0 + i]) : fill;
  }
}

// The mask over one pack's columns as additive values (bool: 0 keep / -inf drop; 0 past
// n or without a mask); apply with `apply_mask`.  `vec`: the mask row is contiguous with kVec-aligned starts,
// so the pack is one load (kVec bytes of bool, or 16 bytes of an additive mask).
template <typename T>
__device__ __forceinline__ void mask_pack(const MaskView& m, int64_t base, int64_t col0, int64_t n, bool vec,
                                          float* add) {
  constexpr int kVec = Pack<T>::kVec;
  struct alignas(kVec) Bools { uint8_t v[kVec]; };
  if (m.kind == MaskKind::kBool) {
    const uint8_t* row = static_cast<const uint8_t*>(m.data) + base;
    if (vec && col0 < n) {
      const Bools b = *reinterpret_cast<const Bools*>(row + col0);
#pragma unroll
      for (int i = 0; i < kVec; ++i) add[i] = b.v[i] ? 0.f : -INFINITY;
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) add[i] = col0 + i < n && !row[(col0 + i) * m.s3] ? -INFINITY : 0.f;
    }
  } else if (m.kind == MaskKind::kAdditive) {
    const T* row = static_cast<const T*>(m.data) + base;
    if (vec) {
      load_pack(row, col0, n, true, 0.f, add);
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) add[i] = col0 + i < n ? to_float(row[(col0 + i) * m.s3]) : 0.f;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) add[i] = 0.f;
  }
}

// A bool mask replaces dropped scores by -inf (even inf or NaN ones, as masked_fill
// does); an additive mask is added.
__device__ __forceinline__ float apply_mask(float z, float add, MaskKind kind) {
  return kind == MaskKind::kBool && add == -INFINITY ? -INFINITY : z + add;
}

template <typename T>
__device__ __forceinline__ void store_pack(T* row, int64_t col0, int64_t n, bool vec_ok, const float* in) {
  constexpr int kVec = Pack<T>::kVec;
  if (vec_ok) {
    if (col0 < n) {
      Pack<T> p;
#pragma unroll
      for (int i = 0; i < kVec; ++i) p.v[i] = from_float<T>(in[i]);
      *reinterpret_cast<Pack<T>*>(row + col0) = p;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i)
      if (col0 + i < n) row[col0 + i] = from_float<T>(in[i]);
  }
}

// Which row this thread works on and how many threads share it.
template <bool kWarpRow>
struct RowSlot {
  int64_t row;
  int lane, width;
  __device__ RowSlot() {
    if (kWarpRow) {
      row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
      lane = threadIdx.x;
      width = kWarp;
    } else {
      row = blockIdx.x;
      lane = threadIdx.x;
      width = blockDim.x;
    }
  }
};

// ------------------------------------------------------------ register-resident kernels
template <typename T, int kPacks, bool kWarpRow>
__global__ void forward_regs(const T* __restrict__ x, T* __restrict__ out, T* __restrict__ probs, MaskView mask,
                             float scale, Drop drop, int64_t rows, int64_t n, bool vec_ok, bool mask_vec) {
  constexpr int kVec = Pack<T>::kVec;
  const RowSlot<kWarpRow> s;
  if (s.row >= rows) return;  // warp rows only: a whole warp leaves together
  const T* xr = x + s.row * n;
  const int64_t mbase = mask.kind == MaskKind::kNone ? 0 : mask_base(mask, s.row);
  float z[kPacks][kVec];
  float mx = -INFINITY;
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    const int64_t col0 = (int64_t(k) * s.width + s.lane) * kVec;
    float madd[kVec];
    load_pack(xr, col0, n, vec_ok, 0.f, z[k]);
    mask_pack<T>(mask, mbase, col0, n, mask_vec, madd);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      z[k][i] = col0 + i < n ? apply_mask(z[k][i] * scale, madd[i], mask.kind) : -INFINITY;
      mx = fmaxf(mx, z[k][i]);
    }
  }
  mx = row_reduce<kWarpRow>(mx, true);
  const float shift = mx == -INFINITY ? 0.f : mx;  // all -inf row: exp gives zeros
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < kPacks; ++k)
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      z[k][i] = expf(z[k][i] - shift);
      sum += z[k][i];
    }
  sum = row_reduce<kWarpRow>(sum, false);
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  const uint64_t key = drop.on ? drop.row_key(s.row) : 0;
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    const int64_t col0 = (int64_t(k) * s.width + s.lane) * kVec;
#pragma unroll
    for (int i = 0; i < kVec; ++i) z[k][i] *= inv;
    if (drop.on) {
      store_pack(probs + s.row * n, col0, n, vec_ok, z[k]);
#pragma unroll
      for (int i = 0; i < kVec; ++i) z[k][i] *= drop.mult(key, col0 + i);
    }
    store_pack(out + s.row * n, col0, n, vec_ok, z[k]);
  }
}

template <typename T, int kPacks, bool kWarpRow>
__global__ void backward_regs(const T* __restrict__ grad, const T* __restrict__ y, T* __restrict__ dx, float scale,
                              Drop drop, int64_t rows, int64_t n, bool vec_ok) {
  constexpr int kVec = Pack<T>::kVec;
  const RowSlot<kWarpRow> s;
  if (s.row >= rows) return;
  float g[kPacks][kVec], yv[kPacks][kVec];
  const uint64_t key = drop.on ? drop.row_key(s.row) : 0;
  float dot = 0.f;
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    const int64_t col0 = (int64_t(k) * s.width + s.lane) * kVec;
    load_pack(grad + s.row * n, col0, n, vec_ok, 0.f, g[k]);
    load_pack(y + s.row * n, col0, n, vec_ok, 0.f, yv[k]);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      if (drop.on) g[k][i] *= drop.mult(key, col0 + i);
      dot += g[k][i] * yv[k][i];
    }
  }
  dot = row_reduce<kWarpRow>(dot, false);
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    const int64_t col0 = (int64_t(k) * s.width + s.lane) * kVec;
#pragma unroll
    for (int i = 0; i < kVec; ++i) g[k][i] = scale * yv[k][i] * (g[k][i] - dot);
    store_pack(dx + s.row * n, col0, n, vec_ok, g[k]);
  }
}

// ------------------------------------------------------------------- long rows (online)
// A long row is split into `segs` segments, one block each (grid: rows * segs blocks),
// so even a single row fills the GPU.  Two launches per direction: per-segment partial
// results into a float workspace, then every segment combines its row's partials and
// writes.
struct Segment {
  int64_t row, begin, end;
};
__device__ __forceinline__ Segment segment_of(int64_t n, int segs) {
  const int64_t len = (n + segs - 1) / segs;
  const int64_t row = blockIdx.x / segs, begin = (blockIdx.x % segs) * len;
  return {row, begin, begin + len < n ? begin + len : n};
}

// Sweep 1: per-thread running max and sum of exp(z - max), rescaled when the max grows;
// the segment's (max, sum) into stats[2 * block].  An all -inf segment gives (-inf, 0).
template <typename T>
__global__ void forward_segment_stats(const T* __restrict__ x, MaskView mask, float scale, int64_t n, int segs,
                                      float* __restrict__ stats) {
  const Segment sg = segment_of(n, segs);
  const T* xr = x + sg.row * n;
  const int64_t mbase = mask.kind == MaskKind::kNone ? 0 : mask_base(mask, sg.row);
  float m = -INFINITY, l = 0.f;
  for (int64_t c = sg.begin + threadIdx.x; c < sg.end; c += blockDim.x) {
    const float z = masked_score<T>(to_float(xr[c]), scale, mask, mbase, c);
    const float m_new = fmaxf(m, z);
    const float shift = m_new == -INFINITY ? 0.f : m_new;
    l = l * expf(m - shift) + expf(z - shift);
    m = m_new;
  }
  const float mx = row_reduce<false>(m, true);
  const float total = row_reduce<false>(l * expf(m - (mx == -INFINITY ? 0.f : mx)), false);
  if (threadIdx.x == 0) {
    stats[2 * blockIdx.x] = mx;
    stats[2 * blockIdx.x + 1] = total;
  }
}

// Sweep 2: the row's max and total from its segments' stats, then normalise, dropout, write.
template <typename T>
__global__ void forward_segment_write(const T* __restrict__ x, T* __restrict__ out, T* __restrict__ probs,
                                      MaskView mask, float scale, Drop drop, int64_t n, int segs,
                                      const float* __restrict__ stats) {
  const Segment sg = segment_of(n, segs);
  const float* rs = stats + 2 * sg.row * segs;
  float mx = -INFINITY;
  for (int k = 0; k < segs; ++k) mx = fmaxf(mx, rs[2 * k]);
  const float shift = mx == -INFINITY ? 0.f : mx;  // all -inf row: exp gives zeros
  float total = 0.f;
  for (int k = 0; k < segs; ++k) total += rs[2 * k + 1] * expf(rs[2 * k] - shift);
  const float inv = total > 0.f ? 1.f / total : 0.f;
  const T* xr = x + sg.row * n;
  const int64_t mbase = mask.kind == MaskKind::kNone ? 0 : mask_base(mask, sg.row);
  const uint64_t key = drop.on ? drop.row_key(sg.row) : 0;
  for (int64_t c = sg.begin + threadIdx.x; c < sg.end; c += blockDim.x) {
    float v = expf(masked_score<T>(to_float(xr[c]), scale, mask, mbase, c) - shift) * inv;
    if (drop.on) {
      probs[sg.row * n + c] = from_float<T>(v);
      v *= drop.mult(key, c);
    }
    out[sg.row * n + c] = from_float<T>(v);
  }
}

__device__ __forceinline__ float grad_times_keep(float g, const Drop& drop, uint64_t key, int64_t c) {
  return drop.on ? g * drop.mult(key, c) : g;
}

// Backward sweep 1: the segment's part of sum(g * y) into dots[block].
template <typename T>
__global__ void backward_segment_dot(const T* __restrict__ grad, const T* __restrict__ y, Drop drop, int64_t n,
                                     int segs, float* __restrict__ dots) {
  const Segment sg = segment_of(n, segs);
  const uint64_t key = drop.on ? drop.row_key(sg.row) : 0;
  float dot = 0.f;
  for (int64_t c = sg.begin + threadIdx.x; c < sg.end; c += blockDim.x)
    dot += grad_times_keep(to_float(grad[sg.row * n + c]), drop, key, c) * to_float(y[sg.row * n + c]);
  dot = row_reduce<false>(dot, false);
  if (threadIdx.x == 0) dots[blockIdx.x] = dot;
}

// Backward sweep 2: dx = scale * y * (g - dot) over the segment, dot summed over the row's segments.
template <typename T>
__global__ void backward_segment_write(const T* __restrict__ grad, const T* __restrict__ y, T* __restrict__ dx,
                                       float scale, Drop drop, int64_t n, int segs, const float* __restrict__ dots) {
  const Segment sg = segment_of(n, segs);
  float dot = 0.f;
  for (int k = 0; k < segs; ++k) dot += dots[sg.row * segs + k];
  const uint64_t key = drop.on ? drop.row_key(sg.row) : 0;
  for (int64_t c = sg.begin + threadIdx.x; c < sg.end; c += blockDim.x) {
    const int64_t i = sg.row * n + c;
    dx[i] = from_float<T>(scale * to_float(y[i]) * (grad_times_keep(to_float(grad[i]), drop, key, c) - dot));
  }
}

// ---------------------------------------------------------------------------- dispatch
// How a row of n elements is laid out: warp or block per row, packs per thread.
struct Plan {
  bool warp_row;
  int packs;    // 0: the segmented long-row kernels
  int threads;  // per row (block mode) or 32
};

template <typename T>
Plan plan_for(int64_t n) {
  constexpr int kVec = Pack<T>::kVec;
  const int64_t vecs = (n + kVec - 1) / kVec;  // packs in the row
  for (int packs = 1; packs <= kMaxPacks; packs *= 2)
    if (vecs <= int64_t(kWarp) * packs) return {true, packs, kWarp};
  for (int packs = 1; packs <= kMaxPacks; packs *= 2) {
    const int64_t threads = (vecs + packs - 1) / packs;
    if (threads <= 1024) return {false, packs, int((threads + kWarp - 1) / kWarp * kWarp)};
  }
  return {false, 0, kOnlineThreads};
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T, int kPacks>
void launch_forward_regs(const Plan& plan, const T* x, T* out, T* probs, const MaskView& mask, float scale,
                         const Drop& drop, int64_t rows, int64_t n, bool vec_ok, bool mask_vec, cudaStream_t stream) {
  if (plan.warp_row) {
    const dim3 block(kWarp, kWarpRowsPerBlock);
    const int64_t grid = (rows + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock;
    forward_regs<T, kPacks, true>
        <<<grid, block, 0, stream>>>(x, out, probs, mask, scale, drop, rows, n, vec_ok, mask_vec);
  } else {
    forward_regs<T, kPacks, false>
        <<<rows, plan.threads, 0, stream>>>(x, out, probs, mask, scale, drop, rows, n, vec_ok, mask_vec);
  }
}

template <typename T, int kPacks>
void launch_backward_regs(const Plan& plan, const T* grad, const T* y, T* dx, float scale, const Drop& drop,
                          int64_t rows, int64_t n, bool vec_ok, cudaStream_t stream) {
  if (plan.warp_row) {
    const dim3 block(kWarp, kWarpRowsPerBlock);
    const int64_t grid = (rows + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock;
    backward_regs<T, kPacks, true><<<grid, block, 0, stream>>>(grad, y, dx, scale, drop, rows, n, vec_ok);
  } else {
    backward_regs<T, kPacks, false><<<rows, plan.threads, 0, stream>>>(grad, y, dx, scale, drop, rows, n, vec_ok);
  }
}

// Segments per long row (plan.packs == 0): enough blocks for the GPU, each >= kMinSegment.
int segments_for(int64_t rows, int64_t n) {
  const int64_t by_length = (n + kMinSegment - 1) / kMinSegment;
  const int64_t by_blocks = (kSegmentBlocks + rows - 1) / rows;
  return int(std::max<int64_t>(1, std::min(by_length, by_blocks)));
}

template <typename T>
void forward_typed(const void* xv, void* outv, void* probsv, const MaskView& mask, float scale, const Drop& drop,
                   int64_t rows, int64_t n, float* workspace, cudaStream_t stream) {
  const T* x = static_cast<const T*>(xv);
  T* out = static_cast<T*>(outv);
  T* probs = static_cast<T*>(probsv);
  constexpr int kVec = Pack<T>::kVec;
  const bool vec_ok = n % kVec == 0 && aligned16(x) && aligned16(out) && (!drop.on || aligned16(probs));
  // Mask packs: contiguous rows whose starts (broadcast strides are 0) stay pack-aligned.
  const bool mask_vec = vec_ok && mask.kind != MaskKind::kNone && mask.s3 == 1 && mask.s0 % kVec == 0 &&
                        mask.s1 % kVec == 0 && mask.s2 % kVec == 0 &&
                        reinterpret_cast<uintptr_t>(mask.data) % (mask.kind == MaskKind::kBool ? kVec : 16) == 0;
  const Plan plan = plan_for<T>(n);
  switch (plan.packs) {
    case 1: launch_forward_regs<T, 1>(plan, x, out, probs, mask, scale, drop, rows, n, vec_ok, mask_vec, stream); break;
    case 2: launch_forward_regs<T, 2>(plan, x, out, probs, mask, scale, drop, rows, n, vec_ok, mask_vec, stream); break;
    case 4: launch_forward_regs<T, 4>(plan, x, out, probs, mask, scale, drop, rows, n, vec_ok, mask_vec, stream); break;
    default: {
      const int segs = segments_for(rows, n);
      forward_segment_stats<T><<<rows * segs, plan.threads, 0, stream>>>(x, mask, scale, n, segs, workspace);
      forward_segment_write<T>
          <<<rows * segs, plan.threads, 0, stream>>>(x, out, probs, mask, scale, drop, n, segs, workspace);
    }
  }
}

template <typename T>
void backward_typed(const void* gv, const void* yv, void* dxv, float scale, const Drop& drop, int64_t rows,
                    int64_t n, float* workspace, cudaStream_t stream) {
  const T* g = static_cast<const T*>(gv);
  const T* y = static_cast<const T*>(yv);
  T* dx = static_cast<T*>(dxv);
  const bool vec_ok = n % Pack<T>::kVec == 0 && aligned16(g) && aligned16(y) && aligned16(dx);
  const Plan plan = plan_for<T>(n);
  switch (plan.packs) {
    case 1: launch_backward_regs<T, 1>(plan, g, y, dx, scale, drop, rows, n, vec_ok, stream); break;
    case 2: launch_backward_regs<T, 2>(plan, g, y, dx, scale, drop, rows, n, vec_ok, stream); break;
    case 4: launch_backward_regs<T, 4>(plan, g, y, dx, scale, drop, rows, n, vec_ok, stream); break;
    default: {
      const int segs = segments_for(rows, n);
      backward_segment_dot<T><<<rows * segs, plan.threads, 0, stream>>>(g, y, drop, n, segs, workspace);
      backward_segment_write<T><<<rows * segs, plan.threads, 0, stream>>>(g, y, dx, scale, drop, n, segs, workspace);
    }
  }
}

template <typename T>
int64_t workspace_floats_typed(int64_t rows, int64_t n) {
  return plan_for<T>(n).packs == 0 ? 2 * rows * segments_for(rows, n) : 0;
}

}  // namespace

int64_t softmax_workspace_floats(DType dtype, int64_t rows, int64_t n) {
  if (rows == 0 || n == 0) return 0;
  switch (dtype) {
    case DType::kFloat: return workspace_floats_typed<float>(rows, n);
    case DType::kHalf: return workspace_floats_typed<__half>(rows, n);
    case DType::kBFloat16: return workspace_floats_typed<__nv_bfloat16>(rows, n);
  }
  return 0;
}

cudaError_t softmax_forward(DType dtype, const void* x, void* out, void* probs, MaskView mask, float scale,
                            float dropout_p, uint64_t seed, int64_t rows, int64_t n, float* workspace,
                            cudaStream_t stream) {
  if (rows == 0 || n == 0) return cudaSuccess;
  const Drop drop = make_drop(dropout_p, seed);
  switch (dtype) {
    case DType::kFloat: forward_typed<float>(x, out, probs, mask, scale, drop, rows, n, workspace, stream); break;
    case DType::kHalf: forward_typed<__half>(x, out, probs, mask, scale, drop, rows, n, workspace, stream); break;
    case DType::kBFloat16:
      forward_typed<__nv_bfloat16>(x, out, probs, mask, scale, drop, rows, n, workspace, stream);
      break;
  }
  return cudaGetLastError();
}

cudaError_t softmax_backward(DType dtype, const void* grad, const void* y, void* dx, float scale, float dropout_p,
                             uint64_t seed, int64_t rows, int64_t n, float* workspace, cudaStream_t stream) {
  if (rows == 0 || n == 0) return cudaSuccess;
  const Drop drop = make_drop(dropout_p, seed);
  switch (dtype) {
    case DType::kFloat: backward_typed<float>(grad, y, dx, scale, drop, rows, n, workspace, stream); break;
    case DType::kHalf: backward_typed<__half>(grad, y, dx, scale, drop, rows, n, workspace, stream); break;
    case DType::kBFloat16: backward_typed<__nv_bfloat16>(grad, y, dx, scale, drop, rows, n, workspace, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace fastlm_softmax
