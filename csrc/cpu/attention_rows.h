// The tile primitives of the blocked (flash-style) CPU attention kernels, shared by
// csrc/cpu/attention.cpp and csrc/cpu/disentangled_attention.cpp: fp32 matrix products on
// row-major tiles through the BLAS linked into libtorch, the elementwise row loops (online
// softmax, probabilities, dS, dropout, conversions; compiled for AVX-512, AVX2 and baseline
// x86-64 and picked at run time by CPU feature), operand layouts, padding-mask ranges and
// dtype dispatch.  Everything is in an anonymous namespace: each kernel file gets its own copy.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../common/dropout.h"

#if defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
#define FASTLM_HAVE_WEAK_SGEMM 1
#endif

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define FASTLM_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTLM_MULTIVERSION
#endif

namespace {

using at::Tensor;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kBlockQ = 64;   // query rows per tile
constexpr int64_t kBlockK = 256;  // keys per tile
// Keys per row whose fp32 P and dP tiles a 16-bit backward keeps from its delta pass for
// its gradient pass (64 x 4096 fp32 x 2-3 tiles = 2-3 MiB per thread); longer rows
// recompute them (see csrc/cpu/attention.cpp, "The softmax term of the backward").
constexpr int64_t kStashKeys = 4096;

// ------------------------------------------------------------------ matrix products
// Row-major C[M,N] = alpha * op(A) op(B) + beta * C, op(A) is M x K, op(B) is K x N.
// (A row-major matrix is the column-major transpose, so C^T = op(B)^T op(A)^T.)
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
#ifdef FASTLM_HAVE_WEAK_SGEMM
  if (sgemm_ != nullptr && K > 0) {
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
    sgemm_(tb ? "T" : "N", ta ? "T" : "N", &m, &n, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
    return;
  }
#endif
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor a = ta ? at::from_blob(const_cast<float*>(A), {K, M}, {lda, 1}, opts).t()
                : at::from_blob(const_cast<float*>(A), {M, K}, {lda, 1}, opts);
  at::Tensor b = tb ? at::from_blob(const_cast<float*>(B), {N, K}, {ldb, 1}, opts).t()
                : at::from_blob(const_cast<float*>(B), {K, N}, {ldb, 1}, opts);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  c.addmm_(a, b, beta, alpha);  // beta == 0 ignores c's old contents
}

// A row-major operand whose rows are `row` elements apart can go to BLAS in place only
// when that stride is a legal leading dimension: >= the row length (BLAS rejects the
// smaller strides of expanded or overlapping views, e.g. a sequence stride of 0) and
// within BLAS's 32-bit integers.  Anything else is copied first.
bool blas_leading_dim_ok(int64_t row, int64_t cols) {
  return row >= std::max<int64_t>(cols, 1) && row <= std::numeric_limits<int>::max();
}

// ------------------------------------------------------------------ elementwise kernels
// exp for the softmax: Cody-Waite reduction + degree-6 polynomial (about 1 ulp),
// branch-free so the compiler vectorises it; exp(-inf) = 0 exactly.
inline __attribute__((always_inline)) float fast_exp(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  // round to nearest through the 1.5 * 2^23 trick (vectorises without SSE4.1's round)
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = xc - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return x < -87.0f ? 0.0f : p * two_n;
}

// Masks one row of scores (keys outside [valid_begin, valid_end) and keys the padding
// mask hides become -inf), updates the running max / sum and overwrites the row with
// exp(s - new max).  Returns the factor exp(old max - new max) the accumulator
// must be rescaled by.  A row that has seen no key yet keeps m = -inf, l = 0, P = 0.
FASTLM_MULTIVERSION
float online_softmax_row(float* s, int64_t n, int64_t valid_begin, int64_t valid_end, const bool* key_ok, float& m,
                         float& l) {
  float mx = m;
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) {
    const bool ok = j >= valid_begin && j < valid_end && (key_ok == nullptr || key_ok[j]);
    const float x = ok ? s[j] : kNegInf;
    s[j] = x;
    mx = std::max(mx, x);
  }
  if (mx == kNegInf) {
    std::fill(s, s + n, 0.0f);
    return 1.0f;
  }
  const float alpha = fast_exp(m - mx);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float e = fast_exp(s[j] - mx);
    s[j] = e;
    sum += e;
  }
  m = mx;
  l = l * alpha + sum;
  return alpha;
}

// Backward: P = exp(s - lse) on visible keys, 0 elsewhere (and 0 for a row with lse = -inf).
FASTLM_MULTIVERSION
void probs_row(float* s, int64_t n, int64_t valid_begin, int64_t valid_end, const bool* key_ok, float lse) {
  if (lse == kNegInf) {
    std::fill(s, s + n, 0.0f);
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    const bool ok = j >= valid_begin && j < valid_end && (key_ok == nullptr || key_ok[j]);
    s[j] = ok ? fast_exp(s[j] - lse) : 0.0f;
  }
}

// dS = P * (dP - delta), in place in dp.
FASTLM_MULTIVERSION
void dscores_row(const float* p, float* dp, int64_t n, float delta) {
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
}

FASTLM_MULTIVERSION
void scale_row(float* x, int64_t n, float a) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

// Dropout of one probability row in place: p * keep / (1 - p_drop).
void dropout_row(float* p, int64_t n, uint64_t row_key, int64_t key0, uint32_t threshold, float keep_scale) {
  for (int64_t j = 0; j < n; ++j)
    p[j] = fastlm_attn_keep(row_key, static_cast<uint64_t>(key0 + j), threshold) ? p[j] * keep_scale : 0.0f;
}

// The backward's dropout on one row of a tile: the forward multiplied V by P * Z (Z = keep /
// (1 - p)), so dV takes P * Z (written to pz) and dP becomes Z * dO V^T (in place).
void backward_dropout_row(const float* p, float* pz, float* dp, int64_t n, uint64_t row_key, int64_t key0,
                          uint32_t threshold, float keep_scale) {
  std::copy(p, p + n, pz);
  dropout_row(pz, n, row_key, key0, threshold, keep_scale);
  dropout_row(dp, n, row_key, key0, threshold, keep_scale);
}

// rowsum(a * b) of two fp32 rows (the backward's delta from its P and dP tiles).
FASTLM_MULTIVERSION
float dot_row(const float* a, const float* b, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

// rowsum(dO * O) for the backward's softmax term (fp32 inputs).
template <typename T>
float row_dot(const float* a, const T* b, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += a[j] * static_cast<float>(b[j]);
  return sum;
}

template <typename T>
void load_row(const T* src, int64_t n, float a, float* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = a * static_cast<float>(src[j]);
}

template <typename T>
void store_row(const float* src, int64_t n, float a, T* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(a * src[j]);
}

// ------------------------------------------------------------------ problem geometry
// Element (sequence n, head h, row i) of a (.., heads, rows, head_dim) operand is
// at base + n * batch + h * head + (token0(n) + i) * row; token0 = cu_seqlens[n]
// in packed mode, 0 in padded mode.
struct Layout {
  int64_t batch, head, row;
};

Layout layout_of(const Tensor& t, bool packed) {
  if (packed) return {0, t.stride(1), t.stride(0)};
  return {t.stride(0), t.stride(1), t.stride(2)};
}

// ------------------------------------------------------------------ padding masks
// The attended key range [kmin, kmax) of a key mask row of `len` keys (km may be null:
// no mask): outside it the mask hides every key.
inline void mask_key_range(const bool* km, int64_t len, int64_t& kmin, int64_t& kmax) {
  kmin = 0;
  kmax = len;
  if (!km) return;
  while (kmin < kmax && !km[kmin]) ++kmin;
  while (kmax > kmin && !km[kmax - 1]) --kmax;
}

// The padding mask of keys [kb, kb + nk): nullptr when it hides none of them (no
// per-key test needed); `hidden` is set when it hides all of them (skip the block).
inline const bool* mask_block(const bool* km, int64_t kb, int64_t nk, bool& hidden) {
  hidden = false;
  if (!km) return nullptr;
  int64_t visible = 0;
  for (int64_t j = kb; j < kb + nk; ++j) visible += km[j];
  hidden = visible == 0;
  return visible == nk ? nullptr : km + kb;
}

// ------------------------------------------------------------------ torch glue
// Calls f(T{}) with T the C++ type of a float32 / bfloat16 / float16 dtype.
template <typename F>
void dispatch_dtype(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(at::BFloat16{});
    case at::kHalf: return f(at::Half{});
    default: TORCH_CHECK(false, op, " (cpu): unsupported dtype ", t);
  }
}

inline Tensor last_dim_contiguous(const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

}  // namespace
