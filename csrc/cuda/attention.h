// Attention: what the CUDA launchers (attention.cu) and their torch glue
// (attention_ops.cpp) share.  The dropout hash (shared with the CPU kernel) is in
// csrc/common/dropout.h.  No torch includes: nvcc stays fast.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/dropout.h"

// ------------------------------------------------------------------ CUDA launchers
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
  // backward scratch, fp32, O(tokens): rows are scratch rows (a sequence's tokens in
  // packed mode, n * max_seqlen + i in padded mode), tokens_q / tokens_k of them
  float* dq_accum;       // (Hq, tokens_q, D), zeroed by the glue: dQ accumulated by atomics
  float* delta;          // sum_j P_ij dP_ij per query row, laid out like lse
  float* dk_accum;       // (Hq, tokens_k, D): each query head's dK, dV partials, summed per kv head
  float* dv_accum;
  int64_t tokens_q, tokens_k;
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
