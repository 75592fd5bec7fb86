// Cross-entropy CUDA kernels.  COMPILED, UNVERIFIED: never run on a GPU.
//
// Forward: one block per row.  Each thread walks its strided share of the row with
// 16-byte vector loads (when the row length and base address allow), keeping an online
// log-sum-exp (running max m and s = sum exp(x - m)) and t = sum (x - m) with its element
// count (label smoothing); a warp-shuffle + shared-memory reduction merges the states.
// The gradient sweep re-reads the row (just read by this block, so served from L2) and
// writes softmax * (1 + 2 z lse) - eps / V - (1 - eps) onehot.  DRAM traffic: one read
// of the logits, one write of the gradient.  All arithmetic is fp32.
// Numerics: x - m is never mixed with log(s): loss = log(s) - (1 - eps)(x[y] - m)
// - eps t / V + z lse^2, softmax = exp(x - m) / s, as PyTorch's log_softmax; subtracting
// a rounded lse = m + log(s) from the logits would lose ulp(lse) (~1e-3 near 1e4).
// When a state's max grows, t shifts by count * (old - new max): every term stays <= 0,
// no cancellation.  expf/logf, not the __expf/__logf intrinsics, whose error grows with
// |x| (fp32 results within ~1 ulp as PyTorch's; the kernel is bound by memory traffic).
// Backward: grad_rows * scale[row], vectorised the same way.
#include "cross_entropy.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "convert.cuh"

#include <cstdint>

namespace fastlm_cross_entropy {
namespace {

using fastlm_cuda::from_float;
using fastlm_cuda::to_float;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// The online state of a run of logits: max m (-inf while every logit seen is -inf,
// or none), s = sum exp(x - shift(m)), t = sum (x - shift(m)), n = count; shift(m) is m,
// or 0 for m = -inf (no (-inf) - (-inf)).
struct State {
  float m, s, t, n;
};

__device__ __forceinline__ float shift_of(float m) { return m == -INFINITY ? 0.f : m; }

// Merge two states (t is only needed for label smoothing, and cheap).
__device__ __forceinline__ State merge(const State& a, const State& b) {
  const float mn = fmaxf(a.m, b.m);
  const float sn = shift_of(mn), sa = shift_of(a.m), sb = shift_of(b.m);
  State r;
  r.m = mn;
  r.s = a.s * expf(a.m - sn) + b.s * expf(b.m - sn);  // exp(-inf) = 0 for an empty side
  r.t = (a.t + a.n * (sa - sn)) + (b.t + b.n * (sb - sn));
  r.n = a.n + b.n;
  return r;
}

__device__ __forceinline__ State shfl_xor(const State& a, int off) {
  return {__shfl_xor_sync(0xffffffffu, a.m, off), __shfl_xor_sync(0xffffffffu, a.s, off),
          __shfl_xor_sync(0xffffffffu, a.t, off), __shfl_xor_sync(0xffffffffu, a.n, off)};
}

// Block-wide merge of the threads' states; every thread gets the result.
__device__ __forceinline__ State block_reduce(State st) {
  __shared__ State warp_states[kWarps];
  for (int off = 16; off > 0; off >>= 1) st = merge(st, shfl_xor(st, off));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_states[warp] = st;
  __syncthreads();
  st = warp_states[0];
  for (int w = 1; w < kWarps; ++w) st = merge(st, warp_states[w]);
  return st;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) forward_kernel(const T* __restrict__ logits, const int64_t* __restrict__ labels,
                                                           float* __restrict__ loss, T* __restrict__ grad, int64_t v,
                                                           int64_t ignore_index, float eps, float z_loss) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * v;
  T* g = grad ? grad + row * v : nullptr;
  const int64_t y = labels[row];
  const int64_t step = int64_t(kThreads) * VEC;
  if (y == ignore_index) {
    if (threadIdx.x == 0) loss[row] = 0.f;
    if (g) {
      for (int64_t i = threadIdx.x * VEC; i < v; i += step) {
        Pack<T, VEC> out;
#pragma unroll
        for (int k = 0; k < VEC; ++k) out.v[k] = from_float<T>(0.f);
        *reinterpret_cast<Pack<T, VEC>*>(g + i) = out;
      }
    }
    return;
  }
  State st{-INFINITY, 0.f, 0.f, 0.f};
  for (int64_t i = threadIdx.x * VEC; i < v; i += step) {
    const Pack<T, VEC> in = *reinterpret_cast<const Pack<T, VEC>*>(x + i);
    float f[VEC];
    State pack{-INFINITY, 0.f, 0.f, float(VEC)};
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      f[k] = to_float(in.v[k]);
      pack.m = fmaxf(pack.m, f[k]);
    }
    const float shift = shift_of(pack.m);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      pack.s += expf(f[k] - shift);
      pack.t += f[k] - shift;
    }
    st = merge(st, pack);
  }
  st = block_reduce(st);
  const bool in_range = y >= 0 && y < v;
  const float poison = in_range ? 0.f : __int_as_float(0x7fc00000);  // the device-side NaN flag
  const float shift = shift_of(st.m);
  const float log_s = logf(st.s);
  const float lse = shift + log_s;  // only in the z-loss terms, whose scale is lse itself
  if (threadIdx.x == 0) {
    const float xy = in_range ? to_float(x[y]) - shift : 0.f;
    float l = log_s - (1.f - eps) * xy + z_loss * lse * lse;
    if (eps > 0.f) l -= eps * st.t / float(v);  // eps == 0: no 0 * (-inf) when a logit is -inf
    loss[row] = l + poison;
  }
  if (!g) return;
  const float p_scale = (1.f + 2.f * z_loss * lse) / st.s;
  const float uniform = eps / float(v);
  for (int64_t i = threadIdx.x * VEC; i < v; i += step) {
    const Pack<T, VEC> in = *reinterpret_cast<const Pack<T, VEC>*>(x + i);
    Pack<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float d = expf(to_float(in.v[k]) - shift) * p_scale - uniform + poison;
      if (i + k == y) d -= 1.f - eps;
      out.v[k] = from_float<T>(d);
    }
    *reinterpret_cast<Pack<T, VEC>*>(g + i) = out;
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(256) scale_kernel(const T* __restrict__ g, const float* __restrict__ scale,
                                                    T* __restrict__ out, int64_t v) {
  const int64_t row = blockIdx.x;  // rows on x (up to 2^31 - 1), column blocks on y
  const int64_t i = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (i >= v) return;
  const float sc = scale[row];
  const Pack<T, VEC> in = *reinterpret_cast<const Pack<T, VEC>*>(g + row * v + i);
  Pack<T, VEC> o;
#pragma unroll
  for (int k = 0; k < VEC; ++k) o.v[k] = from_float<T>(to_float(in.v[k]) * sc);
  *reinterpret_cast<Pack<T, VEC>*>(out + row * v + i) = o;
}

// 16-byte vectors when every row starts 16-byte aligned, else scalar accesses.
template <typename T>
bool vectorisable(const void* a, const void* b, int64_t v) {
  constexpr int vec = 16 / sizeof(T);
  return v % vec == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0 && reinterpret_cast<uintptr_t>(b) % 16 == 0;
}

template <typename T>
cudaError_t forward_t(const void* logits, const int64_t* labels, float* loss, void* grad, int64_t n, int64_t v,
                      int64_t ignore_index, float eps, float z_loss, cudaStream_t stream) {
  const T* x = static_cast<const T*>(logits);
  T* g = static_cast<T*>(grad);
  if (vectorisable<T>(logits, grad ? grad : logits, v)) {
    forward_kernel<T, 16 / sizeof(T)><<<n, kThreads, 0, stream>>>(x, labels, loss, g, v, ignore_index, eps, z_loss);
  } else {
    forward_kernel<T, 1><<<n, kThreads, 0, stream>>>(x, labels, loss, g, v, ignore_index, eps, z_loss);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_t(const void* grad_rows, const float* scale, void* out, int64_t n, int64_t v,
                       cudaStream_t stream) {
  const T* g = static_cast<const T*>(grad_rows);
  T* o = static_cast<T*>(out);
  if (vectorisable<T>(grad_rows, out, v)) {
    constexpr int vec = 16 / sizeof(T);
    const dim3 grid(n, (v / vec + 255) / 256);
    scale_kernel<T, vec><<<grid, 256, 0, stream>>>(g, scale, o, v);
  } else {
    const dim3 grid(n, (v + 255) / 256);
    scale_kernel<T, 1><<<grid, 256, 0, stream>>>(g, scale, o, v);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t forward(DType dtype, const void* logits, const int64_t* labels, float* loss, void* grad, int64_t n,
                    int64_t v, int64_t ignore_index, float eps, float z_loss, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat: return forward_t<float>(logits, labels, loss, grad, n, v, ignore_index, eps, z_loss, stream);
    case DType::kHalf: return forward_t<__half>(logits, labels, loss, grad, n, v, ignore_index, eps, z_loss, stream);
    case DType::kBFloat16:
      return forward_t<__nv_bfloat16>(logits, labels, loss, grad, n, v, ignore_index, eps, z_loss, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t backward(DType dtype, const void* grad_rows, const float* scale, void* out, int64_t n, int64_t v,
                     cudaStream_t stream) {
  if (n == 0 || v == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat: return backward_t<float>(grad_rows, scale, out, n, v, stream);
    case DType::kHalf: return backward_t<__half>(grad_rows, scale, out, n, v, stream);
    case DType::kBFloat16: return backward_t<__nv_bfloat16>(grad_rows, scale, out, n, v, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastlm_cross_entropy
