// Attention on the CPU: the `cpu` backend of fastlm.ops.attention / varlen_attention.
//
// Flash-style blocked algorithm, exact (online softmax, never an Sq x Sk matrix):
// * forward: at::parallel_for over (sequence, query head, block of BM query rows);
//   per key block of BN keys: S = (scale * Q) K^T through sgemm on fp32 tiles,
//   masks, online softmax (running max m, running sum l, the output accumulator
//   rescaled by exp(m_old - m_new)), then acc += P V.  lse = m + log(l) is saved.
// * backward: at::parallel_for over (sequence, kv head); every query head of the
//   group and every query block recomputes P = exp(S - lse) per tile, then
//   dV += P^T dO, dP = dO V^T, dS = P (dP - delta), dQ += dS K, dK += dS^T Q, with
//   delta = rowsum(dO * O) for fp32 and rowsum(P * dP) over a first pass for 16-bit
//   inputs (see "backward" below for why).
//   dK/dV of a kv head sum over its query heads in fp32 (grouped-query attention).
// * key blocks that no query of the block can see are skipped: keys outside the
//   first..last attended key of the padding mask (left or right padding), key
//   blocks the mask hides entirely, keys after the causal limit and keys outside
//   the sliding window of every row of the block.  That is where padding (and a
//   local window) turns into speed.
// * sliding window w (0: none): with the query at position p = i (+ Lk - Lq for
//   bottom-right causal), key j is visible iff |p - j| < w, or p - w < j <= p when
//   causal; each row's visible keys are one interval [row_begin, row_end).
// * low precision (bf16/fp16) K and V are converted to fp32 once per (sequence,
//   kv head) and thread, Q and dO once per query block; all accumulation is fp32.
// * dropout multiplies the normalised probabilities by keep / (1 - p); the keep
//   bit is a hash of (seed, sequence, head, query, key) (csrc/common/dropout.h),
//   so the backward regenerates the forward's mask.
// * a query row that sees no key outputs 0, lse = -inf and gets zero gradients.
//
// Matrix products (csrc/cpu/attention_rows.h) go to the BLAS linked into libtorch (sgemm_, resolved weakly at
// load time) with no dispatcher overhead per tile; at::mm is the fallback when the
// BLAS symbol is absent.  The elementwise loops are compiled for AVX-512, AVX2
// and baseline x86-64 and picked at run time by CPU feature (target_clones).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/dropout.h"
#include "attention_rows.h"

namespace {

using at::Tensor;

struct Geometry {
  int64_t nseq, heads_q, heads_k, head_dim;
  int64_t seqlen_q, seqlen_k;  // padded mode lengths; packed mode: max lengths
  const int32_t* cu_q = nullptr;
  const int32_t* cu_k = nullptr;
  const bool* key_mask = nullptr;  // (nseq, seqlen_k) contiguous
  int64_t causal;
  int64_t window;  // 0: none
  float scale;
  uint32_t drop_threshold;
  float drop_scale;
  uint64_t seed;

  int64_t q0(int64_t n) const { return cu_q ? cu_q[n] : 0; }
  int64_t k0(int64_t n) const { return cu_k ? cu_k[n] : 0; }
  int64_t len_q(int64_t n) const { return cu_q ? cu_q[n + 1] - cu_q[n] : seqlen_q; }
  int64_t len_k(int64_t n) const { return cu_k ? cu_k[n + 1] - cu_k[n] : seqlen_k; }
  const bool* mask(int64_t n) const { return key_mask ? key_mask + n * seqlen_k : nullptr; }
  // query i sits at key position i + shift(n) and sees keys j in
  // [key_begin(n, i, kmin), key_end(n, i, kmax)) (and the padding mask); both bounds
  // grow with i, so a block of rows sees [key_begin of its first row, key_end of its last)
  int64_t shift(int64_t n) const { return causal == 2 ? len_k(n) - len_q(n) : 0; }
  int64_t key_begin(int64_t n, int64_t i, int64_t kmin) const {
    return window ? std::max(kmin, i + shift(n) - window + 1) : kmin;
  }
  int64_t key_end(int64_t n, int64_t i, int64_t kmax) const {
    const int64_t last = causal ? i + shift(n) : window ? i + shift(n) + window - 1 : kmax;
    return std::min(kmax, std::max<int64_t>(last + 1, 0));
  }
  // The attended key range [kmin, kmax) of sequence n: outside it the mask hides every key.
  void key_range(int64_t n, int64_t& kmin, int64_t& kmax) const { mask_key_range(mask(n), len_k(n), kmin, kmax); }
  const bool* block_mask(int64_t n, int64_t kb, int64_t nk, bool& hidden) const {
    return mask_block(mask(n), kb, nk, hidden);
  }
};

// ------------------------------------------------------------------ forward
template <typename T>
void forward_kernel(const Geometry& g, const T* q, Layout lq, const T* k, Layout lk, const T* v, Layout lv, T* out,
                    Layout lo, float* lse, Layout ll) {
  const int64_t D = g.head_dim, group = g.heads_q / g.heads_k;
  const int64_t qblocks = (g.seqlen_q + kBlockQ - 1) / kBlockQ;
  const int64_t items = g.nseq * g.heads_q * qblocks;
  const bool in_place = std::is_same_v<T, float> && blas_leading_dim_ok(lk.row, D) && blas_leading_dim_ok(lv.row, D);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(kBlockQ * D), kf, vf, s(kBlockQ * kBlockK), acc(kBlockQ * D);
    int64_t converted = -1;  // the (sequence, kv head) whose K/V kf/vf hold in fp32
    float m[kBlockQ], l[kBlockQ];
    int64_t row_begin[kBlockQ], row_end[kBlockQ];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / (g.heads_q * qblocks), h = (item / qblocks) % g.heads_q, qb = item % qblocks;
      const int64_t Lq = g.len_q(n), i0 = qb * kBlockQ;
      if (i0 >= Lq) continue;
      const int64_t M = std::min(kBlockQ, Lq - i0), hk = h / group;
      const T* qp = q + n * lq.batch + h * lq.head + (g.q0(n) + i0) * lq.row;
      const T* kp = k + n * lk.batch + hk * lk.head + g.k0(n) * lk.row;
      const T* vp = v + n * lv.batch + hk * lv.head + g.k0(n) * lv.row;
      int64_t kmin, kmax;
      g.key_range(n, kmin, kmax);
      // 16-bit K/V (and fp32 ones BLAS cannot read in place): converted to fp32 once per
      // (sequence, kv head) and thread; the items of a thread are consecutive query
      // blocks and heads, so they reuse it
      if (!in_place && converted != n * g.heads_k + hk) {
        converted = n * g.heads_k + hk;
        kf.resize(g.len_k(n) * D);
        vf.resize(g.len_k(n) * D);
        for (int64_t j = kmin; j < kmax; ++j) {
          load_row(kp + j * lk.row, D, 1.0f, kf.data() + j * D);
          load_row(vp + j * lv.row, D, 1.0f, vf.data() + j * D);
        }
      }
      for (int64_t r = 0; r < M; ++r) {
        load_row(qp + r * lq.row, D, g.scale, qf.data() + r * D);
        row_begin[r] = g.key_begin(n, i0 + r, kmin);
        row_end[r] = g.key_end(n, i0 + r, kmax);
        m[r] = kNegInf;
        l[r] = 0.0f;
      }
      std::fill(acc.begin(), acc.begin() + M * D, 0.0f);
      const int64_t block_end = row_end[M - 1];  // causal / window limits grow with the row
      for (int64_t kb = row_begin[0]; kb < block_end; kb += kBlockK) {
        const int64_t N = std::min(kBlockK, block_end - kb);
        bool hidden;
        const bool* key_ok = g.block_mask(n, kb, N, hidden);
        if (hidden) continue;
        const float* kt = kf.data() + kb * D;
        const float* vt = vf.data() + kb * D;
        int64_t ldk = D, ldv = D;
        if constexpr (std::is_same_v<T, float>) {
          if (in_place) {  // fp32 operands feed the products where they are
            kt = kp + kb * lk.row, ldk = lk.row;
            vt = vp + kb * lv.row, ldv = lv.row;
          }
        }
        gemm(false, true, M, N, D, 1.0f, qf.data(), D, kt, ldk, 0.0f, s.data(), kBlockK);
        for (int64_t r = 0; r < M; ++r) {
          float* sr = s.data() + r * kBlockK;
          const float alpha = online_softmax_row(sr, N, row_begin[r] - kb, row_end[r] - kb, key_ok, m[r], l[r]);
          if (alpha != 1.0f) scale_row(acc.data() + r * D, D, alpha);
          if (g.drop_threshold) {
            const uint64_t key = fastlm_attn_dropout_row(g.seed, n, h, i0 + r);
            dropout_row(sr, N, key, kb, g.drop_threshold, g.drop_scale);
          }
        }
        gemm(false, false, M, D, N, 1.0f, s.data(), kBlockK, vt, ldv, 1.0f, acc.data(), D);
      }
      T* op = out + n * lo.batch + h * lo.head + (g.q0(n) + i0) * lo.row;
      float* lp = lse + n * ll.batch + h * ll.head + (g.q0(n) + i0) * ll.row;
      for (int64_t r = 0; r < M; ++r) {
        const bool seen = l[r] > 0.0f;
        store_row(acc.data() + r * D, D, seen ? 1.0f / l[r] : 0.0f, op + r * lo.row);
        lp[r * ll.row] = seen ? m[r] + std::log(l[r]) : kNegInf;
      }
    }
  });
}

// ------------------------------------------------------------------ backward
// The softmax term of the backward, delta_i = sum_j P_ij dP_ij (dP after dropout), equals
// dO_i . O_i.  From fp32 output that product is exact enough.  From a 16-bit output it is
// not: O's rounding (2^-11 relative in fp16) enters every dS_ij = P_ij (dP_ij - delta_i)
// and, when a query sees one or two keys or its softmax is peaked (dP_ij ~ delta_i), it
// dominates dQ/dK (4-10x plain PyTorch's own error measured).  So for 16-bit inputs delta
// comes from the fp32 P and dP tiles: a first pass over the query block's keys computes
// S and dO V^T (the two products the gradient pass needs anyway) and keeps them, up to
// kStashKeys keys per row (64 x 4096 fp32 x 2-3 tiles = 2-3 MiB per thread); the second
// pass reuses them, so no product is computed twice.  A longer row recomputes the two
// products in the second pass (+40% of the backward's matmuls) rather than holding
// O(rows x keys) memory (kStashKeys, attention_rows.h).  Saving an fp32 copy of O in the
// forward instead would add a tensor the size of O to what every layer keeps for its backward.

template <typename T>
void backward_kernel(const Geometry& g, const T* dout, Layout ldo, const T* q, Layout lq, const T* k, Layout lk,
                     const T* v, Layout lv, const T* out, Layout lo, const float* lse, Layout ll, T* dq, Layout ldq,
                     T* dk, Layout ldk, T* dv, Layout ldv) {
  const int64_t D = g.head_dim, group = g.heads_q / g.heads_k;
  constexpr bool exact_delta = !std::is_same_v<T, float>;  // see above
  const bool dropout = g.drop_threshold != 0;
  at::parallel_for(0, g.nseq * g.heads_k, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kf, vf, dkf, dvf, p, dp, pd;
    std::vector<float> qf(kBlockQ * D), dof(kBlockQ * D), dqf(kBlockQ * D);
    float delta[kBlockQ], lrow[kBlockQ];
    int64_t row_begin[kBlockQ], row_end[kBlockQ];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / g.heads_k, hk = item % g.heads_k;
      const int64_t Lq = g.len_q(n), Lk = g.len_k(n);
      const T* kp = k + n * lk.batch + hk * lk.head + g.k0(n) * lk.row;
      const T* vp = v + n * lv.batch + hk * lv.head + g.k0(n) * lv.row;
      kf.assign(Lk * D, 0.0f);
      vf.assign(Lk * D, 0.0f);
      dkf.assign(Lk * D, 0.0f);
      dvf.assign(Lk * D, 0.0f);
      int64_t kmin, kmax;
      g.key_range(n, kmin, kmax);
      for (int64_t j = kmin; j < kmax; ++j) {
        load_row(kp + j * lk.row, D, 1.0f, kf.data() + j * D);
        load_row(vp + j * lv.row, D, 1.0f, vf.data() + j * D);
      }
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t i0 = 0; i0 < Lq; i0 += kBlockQ) {
          const int64_t M = std::min(kBlockQ, Lq - i0);
          const int64_t tok = g.q0(n) + i0;
          const T* qp = q + n * lq.batch + h * lq.head + tok * lq.row;
          const T* dop = dout + n * ldo.batch + h * ldo.head + tok * ldo.row;
          const T* op = out + n * lo.batch + h * lo.head + tok * lo.row;
          const float* lp = lse + n * ll.batch + h * ll.head + tok * ll.row;
          for (int64_t r = 0; r < M; ++r) {
            load_row(qp + r * lq.row, D, g.scale, qf.data() + r * D);
            load_row(dop + r * ldo.row, D, 1.0f, dof.data() + r * D);
            delta[r] = exact_delta ? 0.0f : row_dot(dof.data() + r * D, op + r * lo.row, D);
            lrow[r] = lp[r * ll.row];
            row_begin[r] = g.key_begin(n, i0 + r, kmin);
            row_end[r] = g.key_end(n, i0 + r, kmax);
          }
          std::fill(dqf.begin(), dqf.begin() + M * D, 0.0f);
          const int64_t block_begin = row_begin[0], block_end = row_end[M - 1];
          // The tiles of keys [kb, kb + kBlockK) live at column kb - block_begin of the
          // stash (row stride ld) when the whole row fits, else in one reused tile.
          const bool stash = exact_delta && block_end - block_begin <= kStashKeys;
          const int64_t ld = stash ? std::max<int64_t>(block_end - block_begin, 1) : kBlockK;
          for (auto* buf : {&p, &dp}) buf->resize(M * ld);
          if (dropout) pd.resize(M * ld);
          auto col = [&](int64_t kb) { return stash ? kb - block_begin : 0; };
          // P (undropped), dP (after dropout) and, with dropout, P * Z for dV: keys [kb, kb + N)
          auto tile = [&](int64_t kb, int64_t N, const bool* key_ok) {
            float* pt = p.data() + col(kb);
            float* dpt = dp.data() + col(kb);
            gemm(false, true, M, N, D, 1.0f, qf.data(), D, kf.data() + kb * D, D, 0.0f, pt, ld);   // S
            gemm(false, true, M, N, D, 1.0f, dof.data(), D, vf.data() + kb * D, D, 0.0f, dpt, ld);  // dO V^T
            for (int64_t r = 0; r < M; ++r) {
              float* pr = pt + r * ld;
              probs_row(pr, N, row_begin[r] - kb, row_end[r] - kb, key_ok, lrow[r]);
              if (dropout)
                backward_dropout_row(pr, pd.data() + col(kb) + r * ld, dpt + r * ld, N,
                                     fastlm_attn_dropout_row(g.seed, n, h, i0 + r), kb, g.drop_threshold, g.drop_scale);
            }
          };
          // Every key block a query of this block can see (the padding mask may hide whole blocks).
          auto for_each_block = [&](auto&& body) {
            for (int64_t kb = block_begin; kb < block_end; kb += kBlockK) {
              const int64_t N = std::min(kBlockK, block_end - kb);
              bool hidden;
              const bool* key_ok = g.block_mask(n, kb, N, hidden);
              if (!hidden) body(kb, N, key_ok);
            }
          };
          if (exact_delta) {
            for_each_block([&](int64_t kb, int64_t N, const bool* key_ok) {
              tile(kb, N, key_ok);
              for (int64_t r = 0; r < M; ++r)
                delta[r] += dot_row(p.data() + col(kb) + r * ld, dp.data() + col(kb) + r * ld, N);
            });
          }
          for_each_block([&](int64_t kb, int64_t N, const bool* key_ok) {
            if (!stash) tile(kb, N, key_ok);
            float* pt = p.data() + col(kb);
            float* dpt = dp.data() + col(kb);
            const float* pv = dropout ? pd.data() + col(kb) : pt;  // the probabilities multiplying V
            gemm(true, false, N, D, M, 1.0f, pv, ld, dof.data(), D, 1.0f, dvf.data() + kb * D, D);
            for (int64_t r = 0; r < M; ++r) dscores_row(pt + r * ld, dpt + r * ld, N, delta[r]);
            // dS is w.r.t. the scaled scores: dQ = scale * dS K, dK = dS^T (scale * Q)
            gemm(false, false, M, D, N, 1.0f, dpt, ld, kf.data() + kb * D, D, 1.0f, dqf.data(), D);
            gemm(true, false, N, D, M, 1.0f, dpt, ld, qf.data(), D, 1.0f, dkf.data() + kb * D, D);
          });
          T* dqp = dq + n * ldq.batch + h * ldq.head + tok * ldq.row;
          for (int64_t r = 0; r < M; ++r) store_row(dqf.data() + r * D, D, g.scale, dqp + r * ldq.row);
        }
      }
      T* dkp = dk + n * ldk.batch + hk * ldk.head + g.k0(n) * ldk.row;
      T* dvp = dv + n * ldv.batch + hk * ldv.head + g.k0(n) * ldv.row;
      for (int64_t j = 0; j < Lk; ++j) {
        store_row(dkf.data() + j * D, D, 1.0f, dkp + j * ldk.row);
        store_row(dvf.data() + j * D, D, 1.0f, dvp + j * ldv.row);
      }
    }
  });
}

// ------------------------------------------------------------------ torch glue
// Validates the operands and fills the geometry (shapes, masks, sequence table).
Geometry make_geometry(const Tensor& q, const Tensor& k, const Tensor& v, const c10::optional<Tensor>& kpm,
                       const c10::optional<Tensor>& cu_q, const c10::optional<Tensor>& cu_k, int64_t max_q,
                       int64_t max_k, int64_t causal, int64_t window, double dropout_p, double scale, int64_t seed,
                       Tensor& mask_hold) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "fastlm attention (cpu): q, k, v must be CPU tensors");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "fastlm attention (cpu): q, k, v must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "fastlm attention (cpu): dtype must be float32, bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(causal >= 0 && causal <= 2, "fastlm attention: causal must be 0, 1 (top-left) or 2 (bottom-right)");
  TORCH_CHECK(window >= 0, "fastlm attention: window must be >= 0 (0: no sliding window)");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "fastlm attention: dropout_p must be in [0, 1)");
  const bool packed = cu_q.has_value();
  TORCH_CHECK(packed == cu_k.has_value(), "fastlm attention: cu_seqlens_q and cu_seqlens_k go together");
  Geometry g{};
  if (packed) {
    TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "fastlm varlen attention: q, k, v must be (tokens, heads, head_dim)");
    TORCH_CHECK(!kpm.has_value(), "fastlm varlen attention: key_padding_mask is not used with cu_seqlens");
    for (const Tensor* cu : {&*cu_q, &*cu_k}) {
      TORCH_CHECK(cu->scalar_type() == at::kInt && cu->dim() == 1 && cu->is_contiguous() && cu->device().is_cpu(),
                  "fastlm varlen attention: cu_seqlens must be contiguous 1-d int32 CPU tensors");
    }
    TORCH_CHECK(cu_q->numel() == cu_k->numel() && cu_q->numel() >= 1,
                "fastlm varlen attention: cu_seqlens_q and cu_seqlens_k must both have batch + 1 entries");
    g.nseq = cu_q->numel() - 1;
    g.cu_q = cu_q->data_ptr<int32_t>();
    g.cu_k = cu_k->data_ptr<int32_t>();
    for (auto [cu, total, mx] : {std::tuple{g.cu_q, q.size(0), max_q}, std::tuple{g.cu_k, k.size(0), max_k}}) {
      TORCH_CHECK(cu[0] == 0 && cu[g.nseq] == total, "fastlm varlen attention: cu_seqlens must start at 0 and end at the token count ", total);
      for (int64_t n = 0; n < g.nseq; ++n)
        TORCH_CHECK(cu[n + 1] >= cu[n] && cu[n + 1] - cu[n] <= mx,
                    "fastlm varlen attention: cu_seqlens must be non-decreasing with lengths <= max_seqlen");
    }
    g.heads_q = q.size(1);
    g.heads_k = k.size(1);
    g.seqlen_q = max_q;
    g.seqlen_k = max_k;
  } else {
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "fastlm attention: q, k, v must be (batch, heads, seq, head_dim)");
    TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "fastlm attention: q, k, v batch sizes differ");
    TORCH_CHECK(v.size(2) == k.size(2), "fastlm attention: k and v sequence lengths differ");
    g.nseq = q.size(0);
    g.heads_q = q.size(1);
    g.heads_k = k.size(1);
    g.seqlen_q = q.size(2);
    g.seqlen_k = k.size(2);
    if (kpm.has_value()) {
      TORCH_CHECK(kpm->scalar_type() == at::kBool && kpm->dim() == 2 && kpm->size(0) == g.nseq && kpm->size(1) == g.seqlen_k,
                  "fastlm attention: key_padding_mask must be a (batch, seq_k) bool tensor");
      mask_hold = kpm->contiguous();
      g.key_mask = mask_hold.data_ptr<bool>();
    }
  }
  const int64_t hdim = q.size(-1);
  TORCH_CHECK(k.size(-1) == hdim && v.size(-1) == hdim, "fastlm attention: q, k, v head dims differ");
  TORCH_CHECK(k.sizes() == v.sizes(), "fastlm attention: k and v shapes differ");
  TORCH_CHECK(g.heads_k > 0 && g.heads_q % g.heads_k == 0, "fastlm attention: query heads must be a multiple of kv heads");
  g.head_dim = hdim;
  g.causal = causal;
  g.window = window;
  g.scale = static_cast<float>(scale);
  g.drop_threshold = dropout_p > 0.0 ? fastlm_dropout_threshold(dropout_p) : 0u;
  g.drop_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  g.seed = static_cast<uint64_t>(seed);
  return g;
}

Tensor lse_empty(const Tensor& q, const Geometry& g, bool packed) {
  auto opts = q.options().dtype(at::kFloat);
  return packed ? at::empty({g.heads_q, q.size(0)}, opts) : at::empty({g.nseq, g.heads_q, g.seqlen_q}, opts);
}

Layout lse_layout(const Tensor& lse, bool packed) {
  return packed ? Layout{0, lse.stride(0), 1} : Layout{lse.stride(0), lse.stride(1), 1};
}

std::tuple<Tensor, Tensor> attention_forward_cpu(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                 const c10::optional<Tensor>& key_padding_mask,
                                                 const c10::optional<Tensor>& cu_seqlens_q,
                                                 const c10::optional<Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                                 int64_t max_seqlen_k, int64_t causal, int64_t window,
                                                 double dropout_p, double scale, int64_t seed) {
  const Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  Tensor mask_hold;
  const Geometry g = make_geometry(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                   causal, window, dropout_p, scale, seed, mask_hold);
  const bool packed = cu_seqlens_q.has_value();
  Tensor out = at::empty_like(q_in);
  Tensor lse = lse_empty(q, g, packed);
  dispatch_dtype(q.scalar_type(), "fastlm attention", [&](auto tag) {
    using scalar_t = decltype(tag);
    forward_kernel<scalar_t>(g, q.data_ptr<scalar_t>(), layout_of(q, packed), k.data_ptr<scalar_t>(), layout_of(k, packed),
                             v.data_ptr<scalar_t>(), layout_of(v, packed), out.data_ptr<scalar_t>(),
                             layout_of(out, packed), lse.data_ptr<float>(), lse_layout(lse, packed));
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_backward_cpu(
    const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& out_in,
    const Tensor& lse_in, const c10::optional<Tensor>& key_padding_mask, const c10::optional<Tensor>& cu_seqlens_q,
    const c10::optional<Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t causal,
    int64_t window, double dropout_p, double scale, int64_t seed) {
  const Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const Tensor out = last_dim_contiguous(out_in), dout = last_dim_contiguous(dout_in);
  Tensor mask_hold;
  const Geometry g = make_geometry(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                   causal, window, dropout_p, scale, seed, mask_hold);
  const bool packed = cu_seqlens_q.has_value();
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "fastlm attention backward: dout and out must have q's shape");
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "fastlm attention backward: dout and out must have q's dtype");
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat, "fastlm attention backward: lse must be float32");
  TORCH_CHECK(lse_in.sizes() == lse_empty(q, g, packed).sizes(), "fastlm attention backward: lse has the wrong shape");
  const Tensor lse = lse_in.contiguous();
  Tensor dq = at::empty_like(q_in), dk = at::empty_like(k_in), dv = at::empty_like(v_in);
  dispatch_dtype(q.scalar_type(), "fastlm attention", [&](auto tag) {
    using scalar_t = decltype(tag);
    backward_kernel<scalar_t>(g, dout.data_ptr<scalar_t>(), layout_of(dout, packed), q.data_ptr<scalar_t>(),
                              layout_of(q, packed), k.data_ptr<scalar_t>(), layout_of(k, packed),
                              v.data_ptr<scalar_t>(), layout_of(v, packed), out.data_ptr<scalar_t>(),
                              layout_of(out, packed), lse.data_ptr<float>(), lse_layout(lse, packed),
                              dq.data_ptr<scalar_t>(), layout_of(dq, packed), dk.data_ptr<scalar_t>(),
                              layout_of(dk, packed), dv.data_ptr<scalar_t>(), layout_of(dv, packed));
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm_C, m) {
  m.def(
      "attention_forward(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? cu_seqlens_q, "
      "Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, int causal, int window, float dropout_p, "
      "float scale, int seed) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? key_padding_mask, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
      "int causal, int window, float dropout_p, float scale, int seed) -> (Tensor dq, Tensor dk, Tensor dv)");
}

TORCH_LIBRARY_IMPL(fastlm_C, CPU, m) {
  m.impl("attention_forward", &attention_forward_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
}
