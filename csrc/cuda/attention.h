// Attention: what the CUDA launchers (attention.cu) and their torch glue
// (attention_ops.cpp) share, plus the dropout hash shared with the CPU kernel
// (csrc/cpu/attention.cpp), so every backend keeps the same element of the
// same probability matrix for a given seed.  No torch includes: nvcc stays fast.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTLM_HD __host__ __device__ __forceinline__
#else
#define FASTLM_HD inline
#endif

// ------------------------------------------------------------------ dropout bits
// Counter-based: the keep bit of probability (sequence, query head, query i, key j)
// is a pure function of (seed, sequence, head, i, j), so the backward pass
// regenerates the forward's mask exactly and any tiling gives the same mask.
// splitmix64's finaliser is a strong 64-bit mixer; one row key is hashed per
// query row and one mix per element.
FASTLM_HD uint64_t fastlm_attn_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

FASTLM_HD uint64_t fastlm_attn_dropout_row(uint64_t seed, uint64_t seq, uint64_t head, uint64_t query) {
  const uint64_t golden = 0x9E3779B97F4A7C15ULL;
  uint64_t z = fastlm_attn_mix(seed + golden * (seq + 1));
  z = fastlm_attn_mix(z + golden * (head + 1));
  return fastlm_attn_mix(z + golden * (query + 1));
}

// Keep probability 1 - threshold / 2^32 (threshold = dropout_p * 2^32).
FASTLM_HD bool fastlm_attn_keep(uint64_t row_key, uint64_t key, uint32_t threshold) {
  return static_cast<uint32_t>(fastlm_attn_mix(row_key + 0x9E3779B97F4A7C15ULL * (key + 1)) >> 32) >= threshold;
}

inline uint32_t fastlm_attn_dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

// ------------------------------------------------------------------ CUDA launchers
// Seen by attention.cu and attention_ops.cpp only (the CPU kernel needs no CUDA headers).
#if defined(__CUDACC__) || defined(FASTLM_ATTENTION_LAUNCHERS)
#include <cuda_runtime.h>

// Element (sequence n, head h, row i) of a (.., heads, rows, head_dim) operand lives at
//   ptr + n * batch + h * head + (token0(n) + i) * row,  head_dim stride 1,
// where token0(n) = cu_seqlens[n] in packed mode and 0 in padded mode.
// Strides are in elements.  lse uses the same scheme (row stride 1).
struct FastlmAttnStrides {
  int64_t batch, head, row;
};

struct FastlmAttnParams {
  // 16-bit (fp16 or bf16) operands
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;            // float32 log-sum-exp of the scaled scores, natural log
  const void* dout;      // backward only
  void* dq;              // backward only
  void* dk;
  void* dv;
  float* dq_accum;       // backward: fp32 (nseq, Hq, max_seqlen_q, D) scratch, zeroed by the launcher
  float* delta;          // backward: fp32 rowsum(dout * out), same layout as lse
  float* dk_accum;       // backward, GQA only: fp32 (nseq, Hq, max_seqlen_k, D) per query head, or null
  float* dv_accum;
  FastlmAttnStrides sq, sk, sv, so, sdo, sdq, sdk, sdv, slse;
  const bool* key_padding_mask;  // (nseq, max_seqlen_k) contiguous, or null
  const int* cu_seqlens_q;       // packed mode (nseq + 1), or null (padded mode)
  const int* cu_seqlens_k;
  int nseq, heads_q, heads_k, head_dim;
  int max_seqlen_q, max_seqlen_k;  // padded mode: the sequence lengths
  int causal;                      // 0 none, 1 top-left, 2 bottom-right
  float scale;
  uint32_t dropout_threshold;      // 0: no dropout
  float dropout_scale;             // 1 / (1 - p)
  uint64_t seed;
  bool bf16;                       // false: fp16
};

// Return cudaSuccess or the launch error; dtype and head_dim (64 or 128) come from params.
cudaError_t fastlm_attention_forward_cuda(const FastlmAttnParams& params, cudaStream_t stream);
cudaError_t fastlm_attention_backward_cuda(const FastlmAttnParams& params, cudaStream_t stream);
#endif
