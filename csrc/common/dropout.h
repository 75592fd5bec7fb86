// Dropout bits shared by the C++ CPU and the CUDA kernels, so that every backend of an
// op keeps the same elements for a given seed (the CPU and CUDA attention kernels draw
// identical masks; the softmax kernels likewise).  Plain C++ usable from host and
// device code; no torch or CUDA includes, so nvcc stays fast.
//
// Counter-based: a keep bit is a pure function of (seed, coordinates), so a backward
// pass regenerates its forward's mask exactly, whatever the tiling.  The mixer is
// splitmix64's finaliser (a strong 64-bit bijection); coordinates enter through
// multiples of the 64-bit golden ratio.  An element is kept when a 32-bit uniform is
// >= threshold = round(p * 2^32).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTLM_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define FASTLM_HD inline __attribute__((always_inline))
#else
#define FASTLM_HD inline
#endif

constexpr uint64_t kFastlmGolden = 0x9E3779B97F4A7C15ULL;

// splitmix64's finaliser; U is uint64_t, or a GCC vector of them (the CPU softmax mixes
// four columns at once).
template <typename U>
FASTLM_HD U fastlm_mix64(U z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Keep when the 32-bit uniform is >= this (p = 1 would drop everything; callers refuse it).
inline uint32_t fastlm_dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t + 0.5);
}

// ------------------------------------------------------------------ attention
// The keep bit of probability (sequence, query head, query i, key j): one row key hashed
// per query row, one mix per element.
FASTLM_HD uint64_t fastlm_attn_dropout_row(uint64_t seed, uint64_t seq, uint64_t head, uint64_t query) {
  uint64_t z = fastlm_mix64(seed + kFastlmGolden * (seq + 1));
  z = fastlm_mix64(z + kFastlmGolden * (head + 1));
  return fastlm_mix64(z + kFastlmGolden * (query + 1));
}

FASTLM_HD bool fastlm_attn_keep(uint64_t row_key, uint64_t key, uint32_t threshold) {
  return static_cast<uint32_t>(fastlm_mix64(row_key + kFastlmGolden * (key + 1)) >> 32) >= threshold;
}

// ------------------------------------------------------------------ softmax
// Row r's key; column c takes the low (c even) or high (c odd) half of
// mix64(row key + (c / 2) * golden): two uniforms per hash.
FASTLM_HD uint64_t fastlm_softmax_dropout_row(uint64_t seed, uint64_t row) {
  return fastlm_mix64(seed + row * kFastlmGolden);
}
