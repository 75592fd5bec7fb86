// DeBERTa disentangled attention on the CPU: the `cpu` backend of
// fastlm.ops.disentangled_attention / varlen_disentangled_attention.
//
// Scores of sequence n, head h (contract: fastlm/reference/disentangled_attention.py):
//   s_ij = scale * (q_i.k_j + q_i.pk[t] + k_j.pq[t]),   t = slot(i - j) = rel_slots[i - j + Lmax - 1]
// with pk / pq the (R, D) positional tables of head h (c2p / p2c, each optional).
//
// Blocked like csrc/cpu/attention.cpp (flash-style, online softmax, sgemm on fp32 tiles,
// the helpers of csrc/cpu/attention_rows.h), never an L x L matrix:
// * work item = (sequence, head).  Items go to the threads longest first, each onto the
//   least loaded thread (cost ~ L^2; packed batches mix lengths), one list per thread, so
//   the split is balanced and depends only on the lengths and the thread count.  Per item the distances of
//   its visible pairs, i - j for j in the padding mask's key range [kmin, kmax), cover a
//   contiguous window of slots [lo, lo + W) (the slot table is monotone), W <= min(2L - 1, R).
// * positional products per item, once: C2P = (scale Q) pk[lo:lo+W]^T (L x W) and
//   P2C = scale K pq[lo:lo+W]^T ((kmax - kmin) x W), two sgemms of L x W x D: the same
//   work transformers does per (batch, head) against all R rows, here only against the
//   W reachable ones.  Memory: 2 L W fp32 per thread (L = 256, W = 385 for DeBERTa-v3's
//   256 buckets: 0.8 MB), read back from cache while the tiles of this item run.
// * per (block of 64 queries, block of 256 keys): S = (scale Q) K^T (sgemm), then every
//   element gathers its two positional terms, S[i][j] += C2P[i][t] + P2C[j][t] with t read
//   from the slot table at i - j (one table read and two cached loads per score, the only
//   cost the positional terms add per pair), then the online softmax, dropout, acc += P V.
// * backward, per item: recompute C2P / P2C and, per tile, P = exp(S - lse), dV += P^T dO,
//   dS = P (dP - delta), dQ += dS K, dK += dS^T (scale Q), and scatter dS into the
//   per-row slot gradients dC2P[i][t] += dS_ij, dP2C[j][t] += dS_ij (L x W each, the
//   transposes of the gathers).  After the tiles, four sgemms fold them back:
//   dQ += dC2P pk, dK += scale dP2C pq, dpk += dC2P^T (scale Q), dpq += scale dP2C^T K.
//   dpk / dpq sum over the whole batch: each thread's list accumulates its own fp32
//   (H, R, D) copy, summed afterwards in list order (deterministic for a thread count).
//   delta = rowsum(dO O) for fp32; for bf16 / fp16 rowsum(P dP) from the fp32 tiles of a
//   first pass over the query block's keys, kept for the gradient pass (as attention.cpp).
// * padding: keys outside the mask's [kmin, kmax) are never touched, key blocks the mask
//   hides entirely are skipped, holes are masked per key.  A query row that sees no key
//   outputs 0, lse = -inf and gets zero gradients.
// * dropout multiplies the normalised probabilities by keep / (1 - p); the keep bit is
//   attention's hash of (seed, sequence, head, query, key) (csrc/common/dropout.h), so the
//   backward regenerates the forward's mask.
// * bf16/fp16 operands are converted to fp32 once per item (positional tables once per
//   call; fp32 tables are read in place, any head / row strides); all accumulation is fp32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../common/dropout.h"
#include "attention_rows.h"

#include <mutex>

namespace {


struct Geometry {
  int64_t nseq, heads, head_dim;
  int64_t seqlen;                  // padded mode: the length; packed mode: max_seqlen
  const int32_t* cu = nullptr;     // packed mode: cu_seqlens
  const bool* key_mask = nullptr;  // (nseq, seqlen) contiguous, or null
  const int32_t* slots = nullptr;  // rel_slots centred: slots[d] for -seqlen < d < seqlen
  int64_t num_slots = 0;           // R (0: no positional terms)
  bool c2p = false, p2c = false;
  float scale;
  uint32_t drop_threshold;
  float drop_scale;
  uint64_t seed;

  int64_t t0(int64_t n) const { return cu ? cu[n] : 0; }
  int64_t len(int64_t n) const { return cu ? cu[n + 1] - cu[n] : seqlen; }
  const bool* mask(int64_t n) const { return key_mask ? key_mask + n * seqlen : nullptr; }
  bool positional() const { return c2p || p2c; }
};

// A positional table in fp32, (heads, R, D) with any head / row strides (unit stride in D):
// transformers' projections are (R, heads, D) in memory, read here without a copy.
struct Table {
  const float* data = nullptr;
  int64_t head = 0, row = 0;
  const float* at(int64_t h, int64_t r) const { return data + h * head + r * row; }
};

// The slots reachable by queries [0, L) and keys [kmin, kmax): [lo, lo + width).
struct SlotWindow {
  int32_t lo = 0;
  int64_t width = 0;
};

SlotWindow slot_window(const Geometry& g, int64_t L, int64_t kmin, int64_t kmax) {
  SlotWindow w;
  if (!g.positional()) return w;
  int32_t lo = g.slots[-(kmax - 1)], hi = lo;
  for (int64_t d = -(kmax - 1); d <= L - 1 - kmin; ++d) {  // min / max: monotone tables need no more
    lo = std::min(lo, g.slots[d]);
    hi = std::max(hi, g.slots[d]);
  }
  w.lo = lo;
  w.width = hi - lo + 1;
  return w;
}

// Adds the positional terms to a tile of scores: s[r][c] += c2p[i][t] + p2c[j - kmin][t] for
// query i = i0 + r, key j = kb + c, t = slot(i - j) - lo.  For a fixed row the slots are
// read backwards from the table (slot(i - kb - c) = sl[-c]).
void add_positional(float* s, int64_t lds, int64_t M, int64_t N, int64_t i0, int64_t kb, int64_t kmin,
                    const int32_t* slots, int32_t lo, const float* c2p, const float* p2c, int64_t W) {
  for (int64_t r = 0; r < M; ++r) {
    const int32_t* sl = slots + (i0 + r - kb);
    float* sr = s + r * lds;
    if (c2p) {
      const float* cr = c2p + (i0 + r) * W;
      for (int64_t c = 0; c < N; ++c) sr[c] += cr[sl[-c] - lo];
    }
    if (p2c) {
      const float* pc = p2c + (kb - kmin) * W;
      for (int64_t c = 0; c < N; ++c) sr[c] += pc[c * W + sl[-c] - lo];
    }
  }
}

// The transpose of add_positional: dc2p[i][t] += ds[r][c], dp2c[j - kmin][t] += ds[r][c].
void scatter_positional(const float* ds, int64_t lds, int64_t M, int64_t N, int64_t i0, int64_t kb, int64_t kmin,
                        const int32_t* slots, int32_t lo, float* dc2p, float* dp2c, int64_t W) {
  for (int64_t r = 0; r < M; ++r) {
    const int32_t* sl = slots + (i0 + r - kb);
    const float* dr = ds + r * lds;
    if (dc2p) {
      float* cr = dc2p + (i0 + r) * W;
      for (int64_t c = 0; c < N; ++c) cr[sl[-c] - lo] += dr[c];
    }
    if (dp2c) {
      float* pc = dp2c + (kb - kmin) * W;
      for (int64_t c = 0; c < N; ++c) pc[c * W + sl[-c] - lo] += dr[c];
    }
  }
}

// fp32 copies of one item's rows [r0, r1) of a (rows, D) operand at p (row stride ld), scaled.
template <typename T>
void load_rows(const T* p, int64_t ld, int64_t r0, int64_t r1, int64_t D, float a, std::vector<float>& dst) {
  dst.resize(std::max<int64_t>(r1 - r0, 1) * D);
  for (int64_t r = r0; r < r1; ++r) load_row(p + r * ld, D, a, dst.data() + (r - r0) * D);
}

// Per-item state shared by the forward and the backward: fp32 operands and positional products.
struct Item {
  int64_t n, h, L, kmin, kmax;
  SlotWindow win;
  std::vector<float> qf, kf, vf, c2p, p2c;

  // Q (scaled), K and V rows of the key range in fp32, the slot window, C2P and P2C.
  template <typename T>
  void prepare(const Geometry& g, int64_t item, const T* q, Layout lq, const T* k, Layout lk, const T* v,
               Layout lv, const Table& pk, const Table& pq) {
    const int64_t D = g.head_dim;
    n = item / g.heads, h = item % g.heads, L = g.len(n);
    mask_key_range(g.mask(n), L, kmin, kmax);
    const int64_t tok = g.t0(n), nk = kmax - kmin;
    load_rows(q + n * lq.batch + h * lq.head + tok * lq.row, lq.row, 0, L, D, g.scale, qf);
    load_rows(k + n * lk.batch + h * lk.head + tok * lk.row, lk.row, kmin, kmax, D, 1.0f, kf);
    load_rows(v + n * lv.batch + h * lv.head + tok * lv.row, lv.row, kmin, kmax, D, 1.0f, vf);
    if (nk <= 0) return;
    win = slot_window(g, L, kmin, kmax);
    const int64_t W = win.width;
    if (g.c2p) {
      c2p.resize(L * W);
      gemm(false, true, L, W, D, 1.0f, qf.data(), D, pk.at(h, win.lo), pk.row, 0.0f, c2p.data(), W);
    }
    if (g.p2c) {
      p2c.resize(nk * W);
      gemm(false, true, nk, W, D, g.scale, kf.data(), D, pq.at(h, win.lo), pq.row, 0.0f, p2c.data(), W);
    }
  }

  const float* c2p_or_null(const Geometry& g) const { return g.c2p ? c2p.data() : nullptr; }
  const float* p2c_or_null(const Geometry& g) const { return g.p2c ? p2c.data() : nullptr; }
};

// The items (sequence n, head h) = n * heads + h, one list per thread (see the header).
std::vector<std::vector<int64_t>> balanced_items(const Geometry& g) {
  const int64_t items = g.nseq * g.heads;
  const int64_t bins = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  auto cost = [&](int64_t item) { const int64_t L = g.len(item / g.heads); return L * L + L + 1; };
  std::vector<int64_t> order(items);
  for (int64_t i = 0; i < items; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost(a) > cost(b); });
  std::vector<std::vector<int64_t>> out(bins);
  std::vector<int64_t> load(bins, 0);
  for (int64_t item : order) {
    const int64_t b = std::min_element(load.begin(), load.end()) - load.begin();
    out[b].push_back(item);
    load[b] += cost(item);
  }
  return out;
}

// Runs body(items, list) on the threads, once per list of balanced_items (in parallel).
template <typename F>
void for_each_list(const Geometry& g, F&& body) {
  const auto lists = balanced_items(g);
  at::parallel_for(0, static_cast<int64_t>(lists.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) body(lists[b], b);
  });
}

// ------------------------------------------------------------------ forward
template <typename T>
void forward_kernel(const Geometry& g, const T* q, Layout lq, const T* k, Layout lk, const T* v, Layout lv,
                    const Table& pk, const Table& pq, T* out, Layout lout, float* lse, Layout ll) {
  const int64_t D = g.head_dim;
  for_each_list(g, [&](const std::vector<int64_t>& items, int64_t list) {
    Item it;
    std::vector<float> s(kBlockQ * kBlockK), acc(kBlockQ * D);
    float m[kBlockQ], l[kBlockQ];
    for (int64_t item : items) {
      it.prepare(g, item, q, lq, k, lk, v, lv, pk, pq);
      const int64_t n = it.n, h = it.h, tok = g.t0(n);
      for (int64_t i0 = 0; i0 < it.L; i0 += kBlockQ) {
        const int64_t M = std::min(kBlockQ, it.L - i0);
        std::fill(m, m + M, kNegInf);
        std::fill(l, l + M, 0.0f);
        std::fill(acc.begin(), acc.begin() + M * D, 0.0f);
        for (int64_t kb = it.kmin; kb < it.kmax; kb += kBlockK) {
          const int64_t N = std::min(kBlockK, it.kmax - kb);
          bool hidden;
          const bool* key_ok = mask_block(g.mask(n), kb, N, hidden);
          if (hidden) continue;
          const float* kt = it.kf.data() + (kb - it.kmin) * D;
          const float* vt = it.vf.data() + (kb - it.kmin) * D;
          gemm(false, true, M, N, D, 1.0f, it.qf.data() + i0 * D, D, kt, D, 0.0f, s.data(), kBlockK);
          add_positional(s.data(), kBlockK, M, N, i0, kb, it.kmin, g.slots, it.win.lo, it.c2p_or_null(g),
                         it.p2c_or_null(g), it.win.width);
          for (int64_t r = 0; r < M; ++r) {
            float* sr = s.data() + r * kBlockK;
            const float alpha = online_softmax_row(sr, N, 0, N, key_ok, m[r], l[r]);
            if (alpha != 1.0f) scale_row(acc.data() + r * D, D, alpha);
            if (g.drop_threshold) {
              const uint64_t key = fastlm_attn_dropout_row(g.seed, n, h, i0 + r);
              dropout_row(sr, N, key, kb, g.drop_threshold, g.drop_scale);
            }
          }
          gemm(false, false, M, D, N, 1.0f, s.data(), kBlockK, vt, D, 1.0f, acc.data(), D);
        }
        T* op = out + n * lout.batch + h * lout.head + (tok + i0) * lout.row;
        float* lp = lse + n * ll.batch + h * ll.head + (tok + i0) * ll.row;
        for (int64_t r = 0; r < M; ++r) {
          const bool seen = l[r] > 0.0f;
          store_row(acc.data() + r * D, D, seen ? 1.0f / l[r] : 0.0f, op + r * lout.row);
          lp[r * ll.row] = seen ? m[r] + std::log(l[r]) : kNegInf;
        }
      }
    }
  });
}

// ------------------------------------------------------------------ backward
// Per-list fp32 sums of the positional-table gradients, added up in list order.
struct TableGrads {
  std::mutex lock;
  std::vector<std::pair<int64_t, std::vector<float>>> parts;  // (list, (2, H, R, D))

  void add(int64_t list, std::vector<float>&& part) {
    std::lock_guard<std::mutex> guard(lock);
    parts.emplace_back(list, std::move(part));
  }
  std::vector<float> total(size_t size) {
    std::sort(parts.begin(), parts.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    std::vector<float> sum(size, 0.0f);
    for (const auto& part : parts)
      for (size_t x = 0; x < size; ++x) sum[x] += part.second[x];
    return sum;
  }
};

template <typename T>
void backward_kernel(const Geometry& g, const T* dout, Layout ldo, const T* q, Layout lq, const T* k, Layout lk,
                     const T* v, Layout lv, const Table& pk, const Table& pq, const T* out, Layout lout,
                     const float* lse, Layout ll, T* dq, Layout ldq, T* dk, Layout ldk, T* dv, Layout ldv,
                     TableGrads& table_grads) {
  const int64_t D = g.head_dim, R = g.num_slots, table = g.heads * R * D;
  constexpr bool exact_delta = !std::is_same_v<T, float>;  // see csrc/cpu/attention.cpp's backward
  for_each_list(g, [&](const std::vector<int64_t>& items, int64_t list) {
    Item it;
    std::vector<float> dof, dqf, dkf, dvf, dc2p, dp2c, lrow, delta, p, dp, pd;
    std::vector<float> dtables(g.positional() ? 2 * table : 0, 0.0f);  // this chunk's (dpk, dpq)
    for (int64_t item : items) {
      it.prepare(g, item, q, lq, k, lk, v, lv, pk, pq);
      const int64_t n = it.n, h = it.h, L = it.L, tok = g.t0(n), kmin = it.kmin, nk = it.kmax - kmin;
      const int64_t W = it.win.width;
      const T* dop = dout + n * ldo.batch + h * ldo.head + tok * ldo.row;
      const T* op = out + n * lout.batch + h * lout.head + tok * lout.row;
      const float* lp = lse + n * ll.batch + h * ll.head + tok * ll.row;
      load_rows(dop, ldo.row, 0, L, D, 1.0f, dof);
      delta.resize(L);
      lrow.resize(L);
      for (int64_t i = 0; i < L; ++i) {
        delta[i] = exact_delta ? 0.0f : row_dot(dof.data() + i * D, op + i * lout.row, D);
        lrow[i] = lp[i * ll.row];
      }
      dqf.assign(L * D, 0.0f);
      dkf.assign(std::max<int64_t>(nk, 0) * D, 0.0f);
      dvf.assign(std::max<int64_t>(nk, 0) * D, 0.0f);
      if (g.c2p) dc2p.assign(L * W, 0.0f);
      if (g.p2c) dp2c.assign(std::max<int64_t>(nk, 0) * W, 0.0f);
      // 16-bit: a query block's tiles of keys [kb, kb + kBlockK) live at column kb - kmin of
      // the stash (row stride ld) from the delta pass to the gradient pass when its keys fit,
      // else in one reused tile, recomputed per pass.
      const bool stash = exact_delta && nk <= kStashKeys;
      const int64_t ld = stash ? std::max<int64_t>(nk, 1) : kBlockK;
      for (auto* buf : {&p, &dp, &pd}) buf->resize(kBlockQ * ld);
      auto col = [&](int64_t kb) { return stash ? kb - kmin : 0; };
      for (int64_t i0 = 0; i0 < L && nk > 0; i0 += kBlockQ) {
        const int64_t M = std::min(kBlockQ, L - i0);
        const float* qt = it.qf.data() + i0 * D;
        const float* dot = dof.data() + i0 * D;
        // P (undropped), dP (after dropout) and, with dropout, P * Z for dV: keys [kb, kb + N)
        auto tile = [&](int64_t kb, int64_t N, const bool* key_ok) {
          float* pt = p.data() + col(kb);
          float* dpt = dp.data() + col(kb);
          const float* kt = it.kf.data() + (kb - kmin) * D;
          gemm(false, true, M, N, D, 1.0f, qt, D, kt, D, 0.0f, pt, ld);                                 // S
          gemm(false, true, M, N, D, 1.0f, dot, D, it.vf.data() + (kb - kmin) * D, D, 0.0f, dpt, ld);  // dO V^T
          add_positional(pt, ld, M, N, i0, kb, kmin, g.slots, it.win.lo, it.c2p_or_null(g), it.p2c_or_null(g), W);
          for (int64_t r = 0; r < M; ++r) {
            float* pr = pt + r * ld;
            probs_row(pr, N, 0, N, key_ok, lrow[i0 + r]);
            if (g.drop_threshold)
              backward_dropout_row(pr, pd.data() + col(kb) + r * ld, dpt + r * ld, N,
                                   fastlm_attn_dropout_row(g.seed, n, h, i0 + r), kb, g.drop_threshold, g.drop_scale);
          }
        };
        // Every key block of the mask's range that is not wholly hidden.
        auto for_each_block = [&](auto&& body) {
          for (int64_t kb = kmin; kb < it.kmax; kb += kBlockK) {
            const int64_t N = std::min(kBlockK, it.kmax - kb);
            bool hidden;
            const bool* key_ok = mask_block(g.mask(n), kb, N, hidden);
            if (!hidden) body(kb, N, key_ok);
          }
        };
        if (exact_delta) {
          for_each_block([&](int64_t kb, int64_t N, const bool* key_ok) {
            tile(kb, N, key_ok);
            for (int64_t r = 0; r < M; ++r)
              delta[i0 + r] += dot_row(p.data() + col(kb) + r * ld, dp.data() + col(kb) + r * ld, N);
          });
        }
        for_each_block([&](int64_t kb, int64_t N, const bool* key_ok) {
          if (!stash) tile(kb, N, key_ok);
          float* pt = p.data() + col(kb);
          float* dpt = dp.data() + col(kb);
          const float* pv = g.drop_threshold ? pd.data() + col(kb) : pt;  // the probabilities multiplying V
          const float* kt = it.kf.data() + (kb - kmin) * D;
          gemm(true, false, N, D, M, 1.0f, pv, ld, dot, D, 1.0f, dvf.data() + (kb - kmin) * D, D);
          for (int64_t r = 0; r < M; ++r) dscores_row(pt + r * ld, dpt + r * ld, N, delta[i0 + r]);
          // dS is w.r.t. the scaled scores: dQ = scale dS K (scaled at the store), dK = dS^T (scale Q)
          gemm(false, false, M, D, N, 1.0f, dpt, ld, kt, D, 1.0f, dqf.data() + i0 * D, D);
          gemm(true, false, N, D, M, 1.0f, dpt, ld, qt, D, 1.0f, dkf.data() + (kb - kmin) * D, D);
          scatter_positional(dpt, ld, M, N, i0, kb, kmin, g.slots, it.win.lo, g.c2p ? dc2p.data() : nullptr,
                             g.p2c ? dp2c.data() : nullptr, W);
        });
      }
      if (nk > 0 && g.c2p) {  // dQ += dC2P pk (scaled at the store), dpk += dC2P^T (scale Q)
        gemm(false, false, L, D, W, 1.0f, dc2p.data(), W, pk.at(h, it.win.lo), pk.row, 1.0f, dqf.data(), D);
        gemm(true, false, W, D, L, 1.0f, dc2p.data(), W, it.qf.data(), D, 1.0f,
             dtables.data() + (h * R + it.win.lo) * D, D);
      }
      if (nk > 0 && g.p2c) {  // dK += scale dP2C pq, dpq += scale dP2C^T K
        gemm(false, false, nk, D, W, g.scale, dp2c.data(), W, pq.at(h, it.win.lo), pq.row, 1.0f, dkf.data(), D);
        gemm(true, false, W, D, nk, g.scale, dp2c.data(), W, it.kf.data(), D, 1.0f,
             dtables.data() + table + (h * R + it.win.lo) * D, D);
      }
      T* dqp = dq + n * ldq.batch + h * ldq.head + tok * ldq.row;
      T* dkp = dk + n * ldk.batch + h * ldk.head + tok * ldk.row;
      T* dvp = dv + n * ldv.batch + h * ldv.head + tok * ldv.row;
      for (int64_t i = 0; i < L; ++i) {
        store_row(dqf.data() + i * D, D, g.scale, dqp + i * ldq.row);
        if (i >= kmin && i < it.kmax) {
          store_row(dkf.data() + (i - kmin) * D, D, 1.0f, dkp + i * ldk.row);
          store_row(dvf.data() + (i - kmin) * D, D, 1.0f, dvp + i * ldv.row);
        } else {  // keys outside the mask's range: zero gradients
          std::fill(dkp + i * ldk.row, dkp + i * ldk.row + D, static_cast<T>(0.0f));
          std::fill(dvp + i * ldv.row, dvp + i * ldv.row + D, static_cast<T>(0.0f));
        }
      }
    }
    if (g.positional()) table_grads.add(list, std::move(dtables));
  });
}

// ------------------------------------------------------------------ torch glue
// Validates the operands and fills the geometry (shapes, masks, sequence and slot tables).
Geometry make_geometry(const Tensor& q, const Tensor& k, const Tensor& v, const c10::optional<Tensor>& pos_key,
                       const c10::optional<Tensor>& pos_query, const Tensor& rel_slots,
                       const c10::optional<Tensor>& kpm, const c10::optional<Tensor>& cu_seqlens, int64_t max_seqlen,
                       double dropout_p, double scale, int64_t seed, Tensor& mask_hold) {
  constexpr const char* op = "fastlm disentangled_attention (cpu)";
  for (const Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": q, k, v must be CPU tensors");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": q, k, v must share a dtype");
    TORCH_CHECK(t->sizes() == q.sizes(), op, ": q, k, v must have the same shape (self-attention)");
  }
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, op,
              ": dtype must be float32, bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1)");
  Geometry g{};
  const bool packed = cu_seqlens.has_value();
  if (packed) {
    TORCH_CHECK(q.dim() == 3, op, ": packed q, k, v must be (tokens, heads, head_dim)");
    TORCH_CHECK(!kpm.has_value(), op, ": key_padding_mask is not used with cu_seqlens");
    const Tensor& cu = *cu_seqlens;
    TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.is_contiguous() && cu.device().is_cpu() &&
                    cu.numel() >= 1, op, ": cu_seqlens must be a contiguous 1-d int32 CPU tensor");
    g.nseq = cu.numel() - 1;
    g.cu = cu.data_ptr<int32_t>();
    TORCH_CHECK(g.cu[0] == 0 && g.cu[g.nseq] == q.size(0), op, ": cu_seqlens must start at 0 and end at ", q.size(0));
    for (int64_t n = 0; n < g.nseq; ++n)
      TORCH_CHECK(g.cu[n + 1] >= g.cu[n] && g.cu[n + 1] - g.cu[n] <= max_seqlen, op,
                  ": cu_seqlens must be non-decreasing with lengths <= max_seqlen");
    g.heads = q.size(1);
    g.seqlen = max_seqlen;
  } else {
    TORCH_CHECK(q.dim() == 4, op, ": q, k, v must be (batch, heads, seq, head_dim)");
    g.nseq = q.size(0);
    g.heads = q.size(1);
    g.seqlen = q.size(2);
    if (kpm.has_value()) {
      TORCH_CHECK(kpm->scalar_type() == at::kBool && kpm->dim() == 2 && kpm->size(0) == g.nseq &&
                      kpm->size(1) == g.seqlen, op, ": key_padding_mask must be a (batch, seq) bool tensor");
      mask_hold = kpm->contiguous();
      g.key_mask = mask_hold.data_ptr<bool>();
    }
  }
  g.head_dim = q.size(-1);
  g.c2p = pos_key.has_value();
  g.p2c = pos_query.has_value();
  for (const auto* t : {&pos_key, &pos_query}) {
    if (!t->has_value()) continue;
    TORCH_CHECK((*t)->dim() == 3 && (*t)->size(0) == g.heads && (*t)->size(2) == g.head_dim && (*t)->size(1) >= 1,
                op, ": pos_key / pos_query must be (heads, R, head_dim)");
    TORCH_CHECK((*t)->scalar_type() == q.scalar_type() && (*t)->device().is_cpu(), op,
                ": pos_key / pos_query must be CPU tensors of q's dtype");
    TORCH_CHECK(g.num_slots == 0 || g.num_slots == (*t)->size(1), op, ": pos_key and pos_query differ in R");
    g.num_slots = (*t)->size(1);
  }
  if (g.positional()) {
    TORCH_CHECK(rel_slots.scalar_type() == at::kInt && rel_slots.dim() == 1 && rel_slots.is_contiguous() &&
                    rel_slots.device().is_cpu() && rel_slots.numel() == 2 * g.seqlen - 1,
                op, ": rel_slots must be a contiguous int32 CPU tensor of 2 * max_seqlen - 1 entries");
    g.slots = rel_slots.data_ptr<int32_t>() + (g.seqlen - 1);
    const auto [lo, hi] = std::minmax_element(rel_slots.data_ptr<int32_t>(),
                                              rel_slots.data_ptr<int32_t>() + rel_slots.numel());
    TORCH_CHECK(*lo >= 0 && *hi < g.num_slots, op, ": rel_slots must index rows of pos_key / pos_query");
  }
  g.scale = static_cast<float>(scale);
  g.drop_threshold = dropout_p > 0.0 ? fastlm_dropout_threshold(dropout_p) : 0u;
  g.drop_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  g.seed = static_cast<uint64_t>(seed);
  return g;
}

// fp32 (a conversion only for bf16 / fp16) with a unit last stride; `hold` keeps it alive.
Table fp32_table(const c10::optional<Tensor>& t, Tensor& hold) {
  if (!t.has_value()) return Table{};
  hold = last_dim_contiguous(t->to(at::kFloat));
  return Table{hold.data_ptr<float>(), hold.stride(0), hold.stride(1)};
}

Tensor lse_empty(const Tensor& q, const Geometry& g, bool packed) {
  auto opts = q.options().dtype(at::kFloat);
  return packed ? at::empty({g.heads, q.size(0)}, opts) : at::empty({g.nseq, g.heads, g.seqlen}, opts);
}

Layout lse_layout(const Tensor& lse, bool packed) {
  return packed ? Layout{0, lse.stride(0), 1} : Layout{lse.stride(0), lse.stride(1), 1};
}

std::tuple<Tensor, Tensor> disentangled_attention_forward_cpu(
    const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const c10::optional<Tensor>& pos_key,
    const c10::optional<Tensor>& pos_query, const Tensor& rel_slots, const c10::optional<Tensor>& key_padding_mask,
    const c10::optional<Tensor>& cu_seqlens, int64_t max_seqlen, double dropout_p, double scale, int64_t seed) {
  const Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  Tensor mask_hold;
  const Geometry g = make_geometry(q, k, v, pos_key, pos_query, rel_slots, key_padding_mask, cu_seqlens, max_seqlen,
                                   dropout_p, scale, seed, mask_hold);
  const bool packed = cu_seqlens.has_value();
  Tensor pk_hold, pq_hold;
  const Table pk = fp32_table(pos_key, pk_hold), pq = fp32_table(pos_query, pq_hold);
  Tensor out = at::empty_like(q_in);
  Tensor lse = lse_empty(q, g, packed);
  dispatch_dtype(q.scalar_type(), "fastlm disentangled_attention", [&](auto tag) {
    using scalar_t = decltype(tag);
    forward_kernel<scalar_t>(g, q.data_ptr<scalar_t>(), layout_of(q, packed), k.data_ptr<scalar_t>(),
                             layout_of(k, packed), v.data_ptr<scalar_t>(), layout_of(v, packed), pk, pq,
                             out.data_ptr<scalar_t>(), layout_of(out, packed),
                             lse.data_ptr<float>(), lse_layout(lse, packed));
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> disentangled_attention_backward_cpu(
    const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
    const c10::optional<Tensor>& pos_key, const c10::optional<Tensor>& pos_query, const Tensor& rel_slots,
    const Tensor& out_in, const Tensor& lse_in, const c10::optional<Tensor>& key_padding_mask,
    const c10::optional<Tensor>& cu_seqlens, int64_t max_seqlen, double dropout_p, double scale, int64_t seed) {
  const Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const Tensor out = last_dim_contiguous(out_in), dout = last_dim_contiguous(dout_in);
  Tensor mask_hold;
  const Geometry g = make_geometry(q, k, v, pos_key, pos_query, rel_slots, key_padding_mask, cu_seqlens, max_seqlen,
                                   dropout_p, scale, seed, mask_hold);
  const bool packed = cu_seqlens.has_value();
  constexpr const char* op = "fastlm disentangled_attention backward (cpu)";
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), op, ": dout and out must have q's shape");
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
              ": dout and out must have q's dtype");
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.sizes() == lse_empty(q, g, packed).sizes(), op,
              ": lse must be float32 of the forward's shape");
  const Tensor lse = lse_in.contiguous();
  Tensor pk_hold, pq_hold;
  const Table pk = fp32_table(pos_key, pk_hold), pq = fp32_table(pos_query, pq_hold);
  Tensor dq = at::empty_like(q_in), dk = at::empty_like(k_in), dv = at::empty_like(v_in);
  TableGrads table_grads;
  dispatch_dtype(q.scalar_type(), "fastlm disentangled_attention", [&](auto tag) {
    using scalar_t = decltype(tag);
    backward_kernel<scalar_t>(g, dout.data_ptr<scalar_t>(), layout_of(dout, packed), q.data_ptr<scalar_t>(),
                              layout_of(q, packed), k.data_ptr<scalar_t>(), layout_of(k, packed),
                              v.data_ptr<scalar_t>(), layout_of(v, packed), pk, pq,
                              out.data_ptr<scalar_t>(), layout_of(out, packed), lse.data_ptr<float>(),
                              lse_layout(lse, packed), dq.data_ptr<scalar_t>(), layout_of(dq, packed),
                              dk.data_ptr<scalar_t>(), layout_of(dk, packed), dv.data_ptr<scalar_t>(),
                              layout_of(dv, packed), table_grads);
  });
  Tensor dpk = at::empty({0}, q.options()), dpq = at::empty({0}, q.options());
  if (g.positional()) {
    const int64_t table = g.heads * g.num_slots * g.head_dim;
    std::vector<float> sum = table_grads.total(2 * table);
    const auto opts = q.options().dtype(at::kFloat);
    const auto shape = std::vector<int64_t>{g.heads, g.num_slots, g.head_dim};
    // shaped and strided like the tables (as every backend returns them)
    if (g.c2p) dpk = at::empty_like(*pos_key).copy_(at::from_blob(sum.data(), shape, opts));
    if (g.p2c) dpq = at::empty_like(*pos_query).copy_(at::from_blob(sum.data() + table, shape, opts));
  }
  return {dq, dk, dv, dpk, dpq};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm_C, m) {
  m.def(
      "disentangled_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? pos_key, Tensor? pos_query, "
      "Tensor rel_slots, Tensor? key_padding_mask, Tensor? cu_seqlens, int max_seqlen, float dropout_p, "
      "float scale, int seed) -> (Tensor out, Tensor lse)");
  m.def(
      "disentangled_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? pos_key, "
      "Tensor? pos_query, Tensor rel_slots, Tensor out, Tensor lse, Tensor? key_padding_mask, Tensor? cu_seqlens, "
      "int max_seqlen, float dropout_p, float scale, int seed) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dpos_key, Tensor dpos_query)");
}

TORCH_LIBRARY_IMPL(fastlm_C, CPU, m) {
  m.impl("disentangled_attention_forward", &disentangled_attention_forward_cpu);
  m.impl("disentangled_attention_backward", &disentangled_attention_backward_cpu);
}
