// Flash attention on NVIDIA tensor cores: the `cuda` backend of fastlm.ops.attention
// and fastlm.ops.varlen_attention.
//
// STATUS: compiled, unverified.  This code has never run on a GPU; the registry keeps
// it out of backend="auto" until bench/gpu_check.sh has passed the test suite with it.
//
// sm_80+ (mma.sync.aligned.m16n8k16, fp32 accumulation), fp16 and bf16, head_dim 64
// or 128; padded (B, H, S, D) with an optional key padding mask, or packed (T, H, D)
// with cu_seqlens; causal top-left / bottom-right; grouped-query heads; dropout from
// the counter-based hash in csrc/common/dropout.h (the CPU kernel draws the same bits).
//
// Tensor-core fragments and shared-memory operands (and why scores never leave registers
// between two products): mma.cuh.
//
// Forward: one CTA (4 warps) per (64 query rows, query head, sequence); each warp owns
// 16 query rows.  K/V tiles of 64 keys are staged in shared memory; online softmax in
// registers (row statistics reduced across the 4 lanes sharing a row).
// Backward (FlashAttention-2 order): delta_i = sum_j P_ij dP_ij from a sweep over the keys
// (attention_delta_kernel says why), then one CTA per (64 keys, query head, sequence); each
// warp owns 16 keys and accumulates their dK, dV in registers over all query blocks;
// dQ goes through fp32 atomics into a scratch buffer.  dK/dV partials are written per
// query head in fp32 and summed over the group (grouped-query) by a small kernel.  The
// fp32 scratch is O(tokens): packed sequences index it by token (attention.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention.h"
#include "mma.cuh"

namespace {

constexpr int kBlockM = 64;  // query rows per CTA (forward) / per step (backward)
constexpr int kBlockN = 64;  // keys per step (forward) / per CTA (backward)
constexpr int kThreads = 128;
constexpr int kPad = 8;  // 16-bit elements of padding per shared-memory row (bank spread)

// Copies rows [row0, row0 + 64) of one (sequence, head) of a 16-bit operand into shared
// memory, 16 bytes per load; rows at or past `rows` are zero.  The glue guarantees
// 16-byte aligned rows (strides multiple of 8 elements, 16-byte aligned base).
template <int D>
__device__ __forceinline__ void load_tile(Smem s, const uint16_t* base, int64_t row_stride, int row0, int rows) {
  constexpr int kChunks = D / 8;
  for (int idx = threadIdx.x; idx < 64 * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (row0 + r < rows) val = *reinterpret_cast<const uint4*>(base + (row0 + r) * row_stride + c);
    *reinterpret_cast<uint4*>(s.p + r * s.ld + c) = val;
  }
}

struct SeqInfo {
  int len_q, len_k;
  int64_t tok_q, tok_k;          // token offset of the sequence (packed mode), 0 in padded mode
  int64_t scratch_q, scratch_k;  // its first row in the fp32 backward scratch (attention.h)
  int shift;                     // causal: query i sees keys j <= i + shift
};

__device__ __forceinline__ SeqInfo seq_info(const FastlmAttnParams& p, int n) {
  SeqInfo s;
  if (p.cu_seqlens_q) {
    s.tok_q = s.scratch_q = p.cu_seqlens_q[n];
    s.tok_k = s.scratch_k = p.cu_seqlens_k[n];
    s.len_q = p.cu_seqlens_q[n + 1] - p.cu_seqlens_q[n];
    s.len_k = p.cu_seqlens_k[n + 1] - p.cu_seqlens_k[n];
  } else {
    s.tok_q = s.tok_k = 0;
    s.scratch_q = static_cast<int64_t>(n) * p.max_seqlen_q;
    s.scratch_k = static_cast<int64_t>(n) * p.max_seqlen_k;
    s.len_q = p.max_seqlen_q;
    s.len_k = p.max_seqlen_k;
  }
  s.shift = p.causal == 2 ? s.len_k - s.len_q : 0;
  return s;
}

// Grids are one-dimensional, (blocks of a sequence) x heads x sequences on x (up to
// 2^31 - 1 blocks; y and z stop at 65,535): which (sequence, head, block) this CTA owns.
struct Work {
  int n, h, block;
};

__device__ __forceinline__ Work work_of(int rows, int block_rows, int heads) {
  const int blocks = (rows + block_rows - 1) / block_rows;
  const int64_t x = blockIdx.x;
  return {static_cast<int>(x / blocks / heads), static_cast<int>(x / blocks % heads), static_cast<int>(x % blocks)};
}

inline dim3 grid_of(int rows, int block_rows, int heads, int nseq) {
  return dim3(static_cast<unsigned>(static_cast<int64_t>((rows + block_rows - 1) / block_rows) * heads * nseq));
}

__device__ __forceinline__ const uint16_t* at(const void* base, const FastlmAttnStrides& st, int n, int h, int64_t tok) {
  return static_cast<const uint16_t*>(base) + n * st.batch + h * st.head + tok * st.row;
}

// Last key (exclusive) any query in [q0, q0 + 64) may see.
__device__ __forceinline__ int key_limit(const FastlmAttnParams& p, const SeqInfo& s, int q0) {
  if (!p.causal) return s.len_k;
  const int lim = q0 + kBlockM - 1 + s.shift + 1;
  return lim < 0 ? 0 : (lim < s.len_k ? lim : s.len_k);
}

// Marks keys [k0, k0 + 64) the sequence has and the padding mask lets through;
// returns (to every thread) whether any is visible.
__device__ __forceinline__ bool load_key_valid(const FastlmAttnParams& p, const SeqInfo& s, int n, int k0, bool* valid) {
  bool any = false;
  if (threadIdx.x < kBlockN) {
    const int j = k0 + threadIdx.x;
    bool ok = j < s.len_k;
    if (ok && p.key_padding_mask) ok = p.key_padding_mask[static_cast<int64_t>(n) * p.max_seqlen_k + j];
    valid[threadIdx.x] = ok;
    any = ok;
  }
  return __syncthreads_or(any);
}

// ------------------------------------------------------------------ forward
template <typename Ty, int D>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(const FastlmAttnParams p) {
  const Work w = work_of(p.max_seqlen_q, kBlockM, p.heads_q);
  const int n = w.n, h = w.h, q0 = w.block * kBlockM;
  const SeqInfo s = seq_info(p, n);
  if (q0 >= s.len_q) return;
  const int hk = h / (p.heads_q / p.heads_k);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  Smem sq{reinterpret_cast<uint16_t*>(smem_raw), D + kPad};
  Smem sk{sq.p + kBlockM * sq.ld, D + kPad};
  Smem sv{sk.p + kBlockN * sk.ld, D + kPad};
  bool* key_valid = reinterpret_cast<bool*>(sv.p + kBlockN * sv.ld);

  load_tile<D>(sq, at(p.q, p.sq, n, h, s.tok_q), p.sq.row, q0, s.len_q);
  const uint16_t* kbase = at(p.k, p.sk, n, hk, s.tok_k);
  const uint16_t* vbase = at(p.v, p.sv, n, hk, s.tok_k);

  const int row[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};  // this lane's two query rows
  uint64_t drop_key[2] = {0, 0};
  if (p.dropout_threshold)
    for (int r = 0; r < 2; ++r) drop_key[r] = fastlm_attn_dropout_row(p.seed, n, h, row[r]);

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // l: this lane's partial row sums

  const int kend = key_limit(p, s, q0);
  for (int k0 = 0; k0 < kend; k0 += kBlockN) {
    __syncthreads();  // previous tiles fully consumed
    if (!load_key_valid(p, s, n, k0, key_valid)) continue;  // the mask hides the whole block
    load_tile<D>(sk, kbase, p.sk.row, k0, s.len_k);
    load_tile<D>(sv, vbase, p.sv.row, k0, s.len_k);
    __syncthreads();

    // S = Q K^T for this warp's 16 rows x 64 keys
    float sc[kBlockN / 8][4];
    product_nt<Ty, D>(sc, sq, sk, warp * 16, g, t);
    // scale, mask, online softmax
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int col = j * 8 + 2 * t + (c & 1), r = c >> 1;
        const bool ok = key_valid[col] && (!p.causal || k0 + col <= row[r] + s.shift);
        sc[j][c] = ok ? sc[j][c] * p.scale : -INFINITY;
        mx[r] = fmaxf(mx[r], sc[j][c]);
      }
    float alpha[2], base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      base[r] = mx[r] == -INFINITY ? 0.f : mx[r];  // a row with nothing visible yet: P = 0
      alpha[r] = __expf(m[r] - base[r]);           // m = -inf -> 0
      m[r] = mx[r];
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int r = c >> 1;
        float pr = __expf(sc[j][c] - base[r]);
        l[r] += pr;
        if (p.dropout_threshold) {
          const int col = j * 8 + 2 * t + (c & 1);
          pr = fastlm_attn_keep(drop_key[r], k0 + col, p.dropout_threshold) ? pr * p.dropout_scale : 0.f;
        }
        sc[j][c] = pr;
      }
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      o[i][0] *= alpha[0];
      o[i][1] *= alpha[0];
      o[i][2] *= alpha[1];
      o[i][3] *= alpha[1];
    }
    // O += P V: P's C fragments become A fragments (16 keys = two n-tiles)
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4];
      a[0] = Ty::pack(sc[2 * kk][0], sc[2 * kk][1]);
      a[1] = Ty::pack(sc[2 * kk][2], sc[2 * kk][3]);
      a[2] = Ty::pack(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
      a[3] = Ty::pack(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {
        uint32_t b[2];
        load_b(b, sv, kk * 16, i * 8, g, t);
        Ty::mma(o[i], a, b);
      }
    }
  }

  // finish: full row sums, normalise, write out and lse
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row[r] >= s.len_q) continue;
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    uint16_t* out = const_cast<uint16_t*>(at(p.out, p.so, n, h, s.tok_q + row[r]));
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
      *reinterpret_cast<uint32_t*>(out + i * 8 + 2 * t) = Ty::pack(o[i][2 * r] * inv, o[i][2 * r + 1] * inv);
    if (t == 0)
      p.lse[n * p.slse.batch + h * p.slse.head + (s.tok_q + row[r]) * p.slse.row] =
          l[r] > 0.f ? m[r] + __logf(l[r]) : -INFINITY;
  }
}

// ------------------------------------------------------------------ backward
// delta_i = sum_j P_ij dP_ij (dP after dropout) in fp32, one CTA per 64 query rows: it
// equals rowsum(dO * O), but O is stored in 16 bits and its rounding, carried into every
// dS_ij = P_ij (dP_ij - delta_i), dominates dQ/dK when a query sees one or two keys or its
// softmax is peaked.  The sweep over the keys (S = Q K^T and dO V^T, as the forward's
// first product) costs about a forward pass; keeping an fp32 O from the forward instead
// would add 4 bytes per output element to what every layer holds for its backward.
template <typename Ty, int D>
__global__ void __launch_bounds__(kThreads) attention_delta_kernel(const FastlmAttnParams p) {
  const Work w = work_of(p.max_seqlen_q, kBlockM, p.heads_q);
  const int n = w.n, h = w.h, q0 = w.block * kBlockM;
  const SeqInfo s = seq_info(p, n);
  if (q0 >= s.len_q) return;
  const int hk = h / (p.heads_q / p.heads_k);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  Smem sq{reinterpret_cast<uint16_t*>(smem_raw), D + kPad};
  Smem sdo{sq.p + kBlockM * sq.ld, D + kPad};
  Smem sk{sdo.p + kBlockM * sdo.ld, D + kPad};
  Smem sv{sk.p + kBlockN * sk.ld, D + kPad};
  bool* key_valid = reinterpret_cast<bool*>(sv.p + kBlockN * sv.ld);

  load_tile<D>(sq, at(p.q, p.sq, n, h, s.tok_q), p.sq.row, q0, s.len_q);
  load_tile<D>(sdo, at(p.dout, p.sdo, n, h, s.tok_q), p.sdo.row, q0, s.len_q);
  const uint16_t* kbase = at(p.k, p.sk, n, hk, s.tok_k);
  const uint16_t* vbase = at(p.v, p.sv, n, hk, s.tok_k);

  const int row[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};  // this lane's two query rows
  float lse[2];
  uint64_t drop_key[2] = {0, 0};
  for (int r = 0; r < 2; ++r) {
    lse[r] = row[r] < s.len_q ? p.lse[n * p.slse.batch + h * p.slse.head + (s.tok_q + row[r]) * p.slse.row]
                              : -INFINITY;  // -inf: the row sees no key, P = 0
    if (p.dropout_threshold) drop_key[r] = fastlm_attn_dropout_row(p.seed, n, h, row[r]);
  }
  float acc[2] = {0.f, 0.f};  // this lane's partial sums of P dP

  const int kend = key_limit(p, s, q0);
  for (int k0 = 0; k0 < kend; k0 += kBlockN) {
    __syncthreads();  // previous tiles fully consumed
    if (!load_key_valid(p, s, n, k0, key_valid)) continue;
    load_tile<D>(sk, kbase, p.sk.row, k0, s.len_k);
    load_tile<D>(sv, vbase, p.sv.row, k0, s.len_k);
    __syncthreads();
    // S = Q K^T and dO V^T for this warp's 16 rows x 64 keys
    float sc[kBlockN / 8][4], dp[kBlockN / 8][4];
    product_nt<Ty, D>(sc, sq, sk, warp * 16, g, t);
    product_nt<Ty, D>(dp, sdo, sv, warp * 16, g, t);
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int col = j * 8 + 2 * t + (c & 1), r = c >> 1;
        const bool ok = key_valid[col] && lse[r] != -INFINITY && (!p.causal || k0 + col <= row[r] + s.shift);
        float z = 1.f;  // dropout factor keep / (1 - p)
        if (p.dropout_threshold) z = fastlm_attn_keep(drop_key[r], k0 + col, p.dropout_threshold) ? p.dropout_scale : 0.f;
        acc[r] += ok ? __expf(sc[j][c] * p.scale - lse[r]) * dp[j][c] * z : 0.f;
      }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], 1);
    acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], 2);
    if (t == 0 && row[r] < s.len_q) p.delta[n * p.slse.batch + h * p.slse.head + (s.tok_q + row[r]) * p.slse.row] = acc[r];
  }
}

template <typename Ty, int D>
__global__ void __launch_bounds__(kThreads) attention_backward_kernel(const FastlmAttnParams p) {
  const Work w = work_of(p.max_seqlen_k, kBlockN, p.heads_q);
  const int n = w.n, h = w.h, k0 = w.block * kBlockN;
  const SeqInfo s = seq_info(p, n);
  if (k0 >= s.len_k) return;
  const int hk = h / (p.heads_q / p.heads_k);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  Smem sk{reinterpret_cast<uint16_t*>(smem_raw), D + kPad};
  Smem sv{sk.p + kBlockN * sk.ld, D + kPad};
  Smem sq{sv.p + kBlockN * sv.ld, D + kPad};
  Smem sdo{sq.p + kBlockM * sq.ld, D + kPad};
  Smem sds{sdo.p + kBlockM * sdo.ld, kBlockN + kPad};  // dS[i][j] (query-major) for dQ = dS K
  float* s_lse = reinterpret_cast<float*>(sds.p + kBlockM * sds.ld);
  float* s_delta = s_lse + kBlockM;
  uint64_t* s_drop = reinterpret_cast<uint64_t*>(s_delta + kBlockM);
  bool* key_valid = reinterpret_cast<bool*>(s_drop + kBlockM);

  // this lane's two keys (rows of the transposed score tile)
  const int key[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};
  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) dk[i][c] = dv[i][c] = 0.f;

  const bool any_key = load_key_valid(p, s, n, k0, key_valid);
  if (any_key) {
    load_tile<D>(sk, at(p.k, p.sk, n, hk, s.tok_k), p.sk.row, k0, s.len_k);
    load_tile<D>(sv, at(p.v, p.sv, n, hk, s.tok_k), p.sv.row, k0, s.len_k);
    // causal: query i sees key j iff j <= i + shift, so queries before k0 - shift see none of this block
    int qstart = 0;
    if (p.causal) {
      qstart = k0 - s.shift;
      qstart = qstart < 0 ? 0 : (qstart / kBlockM) * kBlockM;
    }
    const uint16_t* qbase = at(p.q, p.sq, n, h, s.tok_q);
    const uint16_t* dobase = at(p.dout, p.sdo, n, h, s.tok_q);
    float* dq_acc = p.dq_accum + (h * p.tokens_q + s.scratch_q) * D;
    for (int q0 = qstart; q0 < s.len_q; q0 += kBlockM) {
      __syncthreads();  // previous step's tiles consumed
      load_tile<D>(sq, qbase, p.sq.row, q0, s.len_q);
      load_tile<D>(sdo, dobase, p.sdo.row, q0, s.len_q);
      if (threadIdx.x < kBlockM) {
        const int i = q0 + threadIdx.x;
        const int64_t li = n * p.slse.batch + h * p.slse.head + (s.tok_q + i) * p.slse.row;
        s_lse[threadIdx.x] = i < s.len_q ? p.lse[li] : -INFINITY;  // -inf: row contributes nothing
        s_delta[threadIdx.x] = i < s.len_q ? p.delta[li] : 0.f;
        s_drop[threadIdx.x] = p.dropout_threshold ? fastlm_attn_dropout_row(p.seed, n, h, i) : 0;
      }
      __syncthreads();

      // S^T = K Q^T and dP^T = V dO^T: this warp's 16 keys x 64 queries
      float st[kBlockM / 8][4], dpt[kBlockM / 8][4];
      product_nt<Ty, D>(st, sk, sq, warp * 16, g, t);
      product_nt<Ty, D>(dpt, sv, sdo, warp * 16, g, t);
      // P^T (dropped, for dV) in st, dS^T in dpt
#pragma unroll
      for (int j = 0; j < kBlockM / 8; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int ci = j * 8 + 2 * t + (c & 1), i = q0 + ci, kj = key[c >> 1];
          const float lse = s_lse[ci];
          const bool ok = key_valid[kj - k0] && lse != -INFINITY && (!p.causal || kj <= i + s.shift);
          const float pr = ok ? __expf(st[j][c] * p.scale - lse) : 0.f;
          float z = 1.f;  // dropout factor keep / (1 - p)
          if (p.dropout_threshold)
            z = fastlm_attn_keep(s_drop[ci], kj, p.dropout_threshold) ? p.dropout_scale : 0.f;
          st[j][c] = pr * z;
          dpt[j][c] = pr * (dpt[j][c] * z - s_delta[ci]);
        }
      // dS (query-major) to shared memory for dQ
#pragma unroll
      for (int j = 0; j < kBlockM / 8; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const float val = dpt[j][c];
          const uint32_t bits = Ty::pack(val, 0.f);
          sds.p[(j * 8 + 2 * t + (c & 1)) * sds.ld + warp * 16 + g + 8 * (c >> 1)] = static_cast<uint16_t>(bits & 0xffffu);
        }
      // dV += P^T dO, dK += dS^T Q (queries are the reduction dimension)
#pragma unroll
      for (int kk = 0; kk < kBlockM / 16; ++kk) {
        uint32_t ap[4], ads[4];
        ap[0] = Ty::pack(st[2 * kk][0], st[2 * kk][1]);
        ap[1] = Ty::pack(st[2 * kk][2], st[2 * kk][3]);
        ap[2] = Ty::pack(st[2 * kk + 1][0], st[2 * kk + 1][1]);
        ap[3] = Ty::pack(st[2 * kk + 1][2], st[2 * kk + 1][3]);
        ads[0] = Ty::pack(dpt[2 * kk][0], dpt[2 * kk][1]);
        ads[1] = Ty::pack(dpt[2 * kk][2], dpt[2 * kk][3]);
        ads[2] = Ty::pack(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
        ads[3] = Ty::pack(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
          uint32_t b[2];
          load_b(b, sdo, kk * 16, i * 8, g, t);
          Ty::mma(dv[i], ap, b);
          load_b(b, sq, kk * 16, i * 8, g, t);
          Ty::mma(dk[i], ads, b);
        }
      }
      __syncthreads();  // dS complete
      // dQ += scale * dS K: this warp's 16 queries x D, fp32 atomics into the scratch
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int kk = 0; kk < kBlockN; kk += 16) {
          uint32_t a[4], b[2];
          load_a(a, sds, warp * 16, kk, g, t);
          load_b(b, sk, kk, i * 8, g, t);
          Ty::mma(acc, a, b);
        }
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int qi = q0 + warp * 16 + g + 8 * (c >> 1);
          if (qi < s.len_q) atomicAdd(dq_acc + static_cast<int64_t>(qi) * D + i * 8 + 2 * t + (c & 1), acc[c] * p.scale);
        }
      }
    }
  }
  // this query head's dK, dV partials (zero for keys nobody sees) in fp32
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (key[r] >= s.len_k) continue;
    const int64_t off = (h * p.tokens_k + s.scratch_k + key[r]) * D;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      *reinterpret_cast<float2*>(p.dk_accum + off + i * 8 + 2 * t) = make_float2(dk[i][2 * r] * p.scale, dk[i][2 * r + 1] * p.scale);
      *reinterpret_cast<float2*>(p.dv_accum + off + i * 8 + 2 * t) = make_float2(dv[i][2 * r], dv[i][2 * r + 1]);
    }
  }
}

// dq = dq_accum; dk, dv = sum over the group's query heads of the partials; to 16 bits.
// One thread per element pair of a scratch row (attention.h): O(tokens) threads, rows
// outside every sequence (none, with consistent cu_seqlens) untouched.
template <typename Ty, int D>
__global__ void attention_finish_kernel(const FastlmAttnParams p, bool keys) {
  const int64_t tokens = keys ? p.tokens_k : p.tokens_q;
  const int heads = keys ? p.heads_k : p.heads_q;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= heads * tokens * (D / 2)) return;
  const int c = static_cast<int>(idx % (D / 2)) * 2;
  const int64_t row = idx / (D / 2) % tokens;
  const int h = static_cast<int>(idx / (D / 2) / tokens);
  // the operand element of scratch row `row`: packed, its token (batch stride 0); padded, (n, i)
  const int max_len = keys ? p.max_seqlen_k : p.max_seqlen_q;
  const int n = p.cu_seqlens_q ? 0 : static_cast<int>(row / max_len);
  const int64_t tok = p.cu_seqlens_q ? row : row % max_len;
  if (!keys) {
    const float* src = p.dq_accum + (h * p.tokens_q + row) * D + c;
    *reinterpret_cast<uint32_t*>(const_cast<uint16_t*>(at(p.dq, p.sdq, n, h, tok)) + c) = Ty::pack(src[0], src[1]);
    return;
  }
  const int group = p.heads_q / p.heads_k;
  float k0 = 0.f, k1 = 0.f, v0 = 0.f, v1 = 0.f;
  for (int hq = h * group; hq < (h + 1) * group; ++hq) {
    const int64_t off = (hq * p.tokens_k + row) * D + c;
    k0 += p.dk_accum[off];
    k1 += p.dk_accum[off + 1];
    v0 += p.dv_accum[off];
    v1 += p.dv_accum[off + 1];
  }
  *reinterpret_cast<uint32_t*>(const_cast<uint16_t*>(at(p.dk, p.sdk, n, h, tok)) + c) = Ty::pack(k0, k1);
  *reinterpret_cast<uint32_t*>(const_cast<uint16_t*>(at(p.dv, p.sdv, n, h, tok)) + c) = Ty::pack(v0, v1);
}

constexpr size_t forward_smem(int d) { return (kBlockM + 2 * kBlockN) * (d + kPad) * 2 + kBlockN; }
constexpr size_t delta_smem(int d) { return (2 * kBlockM + 2 * kBlockN) * (d + kPad) * 2 + kBlockN; }
constexpr size_t backward_smem(int d) {
  return (2 * kBlockN + 2 * kBlockM) * (d + kPad) * 2 + kBlockM * (kBlockN + kPad) * 2 + kBlockM * (4 + 4 + 8) + kBlockN;
}

// Raises the kernel's dynamic shared-memory limit to `smem` bytes, then launches it on a
// one-dimensional grid over (blocks of block_rows) x heads x sequences.
template <typename Kernel>
cudaError_t launch(Kernel kernel, size_t smem, int rows, int block_rows, int heads, const FastlmAttnParams& p,
                   cudaStream_t stream) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  kernel<<<grid_of(rows, block_rows, heads, p.nseq), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename Ty, int D>
cudaError_t forward(const FastlmAttnParams& p, cudaStream_t stream) {
  return launch(attention_forward_kernel<Ty, D>, forward_smem(D), p.max_seqlen_q, kBlockM, p.heads_q, p, stream);
}

template <typename Ty, int D>
cudaError_t backward(const FastlmAttnParams& p, cudaStream_t stream) {
  cudaError_t err = launch(attention_delta_kernel<Ty, D>, delta_smem(D), p.max_seqlen_q, kBlockM, p.heads_q, p, stream);
  if (err != cudaSuccess) return err;
  err = launch(attention_backward_kernel<Ty, D>, backward_smem(D), p.max_seqlen_k, kBlockN, p.heads_q, p, stream);
  if (err != cudaSuccess) return err;
  constexpr int kFinishThreads = 256;
  for (const bool keys : {false, true}) {
    const int64_t pairs = (keys ? p.heads_k * p.tokens_k : p.heads_q * p.tokens_q) * (D / 2);
    if (pairs == 0) continue;
    attention_finish_kernel<Ty, D><<<static_cast<unsigned>((pairs + kFinishThreads - 1) / kFinishThreads),
                                     kFinishThreads, 0, stream>>>(p, keys);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t fastlm_attention_forward_cuda(const FastlmAttnParams& p, cudaStream_t stream) {
  if (p.head_dim == 64) return p.bf16 ? forward<Bf16, 64>(p, stream) : forward<Fp16, 64>(p, stream);
  if (p.head_dim == 128) return p.bf16 ? forward<Bf16, 128>(p, stream) : forward<Fp16, 128>(p, stream);
  return cudaErrorInvalidValue;
}

cudaError_t fastlm_attention_backward_cuda(const FastlmAttnParams& p, cudaStream_t stream) {
  if (p.head_dim == 64) return p.bf16 ? backward<Bf16, 64>(p, stream) : backward<Fp16, 64>(p, stream);
  if (p.head_dim == 128) return p.bf16 ? backward<Bf16, 128>(p, stream) : backward<Fp16, 128>(p, stream);
  return cudaErrorInvalidValue;
}
