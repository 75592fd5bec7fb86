// Torch glue of the CUDA attention kernels (attention.cu, compiled, unverified):
// argument checks, outputs and scratch, the current stream, and the CUDA
// implementation of the fastlm_C::attention_forward / attention_backward schemas
// (defined in csrc/cpu/attention.cpp).  No host synchronisation: cu_seqlens stay
// on the device and max_seqlen_* size the grids.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "attention.h"

namespace {

using at::Tensor;

// 16-byte aligned base and row/head/batch strides that are multiples of 8 elements:
// the kernels move 8 elements per load.
bool vector_aligned(const Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0 || t.stride(-1) != 1) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  return true;
}

Tensor aligned(const Tensor& t) { return vector_aligned(t) ? t : t.contiguous(); }

FastlmAttnStrides strides_of(const Tensor& t, bool packed) {
  if (packed) return {0, t.stride(1), t.stride(0)};
  return {t.stride(0), t.stride(1), t.stride(2)};
}

FastlmAttnStrides lse_strides(const Tensor& lse, bool packed) {
  return packed ? FastlmAttnStrides{0, lse.stride(0), 1} : FastlmAttnStrides{lse.stride(0), lse.stride(1), 1};
}

// Checks shared by forward and backward; fills everything but the tensors' pointers.
FastlmAttnParams make_params(const Tensor& q, const Tensor& k, const Tensor& v, const c10::optional<Tensor>& kpm,
                             const c10::optional<Tensor>& cu_q, const c10::optional<Tensor>& cu_k, int64_t max_q,
                             int64_t max_k, int64_t causal, int64_t window, double dropout_p, double scale,
                             int64_t seed, Tensor& mask_hold) {
  const char* who = "fastlm attention (cuda, compiled, unverified)";
  TORCH_CHECK(q.is_cuda() && k.device() == q.device() && v.device() == q.device(), who, ": q, k, v must be on one CUDA device");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), who, ": q, k, v must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, who,
              ": dtype must be float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(q.size(-1) == 64 || q.size(-1) == 128, who, ": head_dim must be 64 or 128, got ", q.size(-1));
  TORCH_CHECK(k.size(-1) == q.size(-1) && v.sizes() == k.sizes(), who, ": k and v must have the same shape and q's head_dim");
  TORCH_CHECK(causal >= 0 && causal <= 2, who, ": causal must be 0, 1 (top-left) or 2 (bottom-right)");
  // the schema carries the sliding window for the other backends; these kernels have none
  // (fastlm.ops.attention's cuda limits refuse it, so "auto" never brings one here)
  TORCH_CHECK(window == 0, who, ": sliding window not implemented");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, who, ": dropout_p must be in [0, 1)");
  TORCH_CHECK(max_q >= 0 && max_k >= 0 && max_q < (1 << 30) && max_k < (1 << 30), who, ": bad max_seqlen");
  const bool packed = cu_q.has_value();
  TORCH_CHECK(packed == cu_k.has_value(), who, ": cu_seqlens_q and cu_seqlens_k go together");
  FastlmAttnParams p{};
  if (packed) {
    TORCH_CHECK(q.dim() == 3 && k.dim() == 3, who, ": packed q, k, v must be (tokens, heads, head_dim)");
    TORCH_CHECK(!kpm.has_value(), who, ": key_padding_mask is not used with cu_seqlens");
    for (const Tensor* cu : {&*cu_q, &*cu_k})
      TORCH_CHECK(cu->scalar_type() == at::kInt && cu->dim() == 1 && cu->is_contiguous() && cu->device() == q.device(),
                  who, ": cu_seqlens must be contiguous 1-d int32 tensors on q's device");
    TORCH_CHECK(cu_q->numel() == cu_k->numel() && cu_q->numel() >= 1, who, ": cu_seqlens_q and cu_seqlens_k must have batch + 1 entries");
    p.nseq = static_cast<int>(cu_q->numel() - 1);
    p.cu_seqlens_q = cu_q->data_ptr<int>();
    p.cu_seqlens_k = cu_k->data_ptr<int>();
    p.max_seqlen_q = static_cast<int>(max_q);
    p.max_seqlen_k = static_cast<int>(max_k);
  } else {
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4, who, ": q, k, v must be (batch, heads, seq, head_dim)");
    TORCH_CHECK(k.size(0) == q.size(0), who, ": q, k, v batch sizes differ");
    p.nseq = static_cast<int>(q.size(0));
    p.max_seqlen_q = static_cast<int>(q.size(2));
    p.max_seqlen_k = static_cast<int>(k.size(2));
    if (kpm.has_value()) {
      TORCH_CHECK(kpm->scalar_type() == at::kBool && kpm->dim() == 2 && kpm->size(0) == q.size(0) &&
                      kpm->size(1) == k.size(2) && kpm->device() == q.device(),
                  who, ": key_padding_mask must be a (batch, seq_k) bool tensor on q's device");
      mask_hold = kpm->contiguous();
      p.key_padding_mask = mask_hold.data_ptr<bool>();
    }
  }
  p.heads_q = static_cast<int>(q.size(-2 - (packed ? 0 : 1)));
  p.heads_k = static_cast<int>(k.size(-2 - (packed ? 0 : 1)));
  TORCH_CHECK(p.heads_k > 0 && p.heads_q % p.heads_k == 0, who, ": query heads must be a multiple of kv heads");
  // one-dimensional grids: (64-row blocks) x heads x sequences blocks on x, at most 2^31 - 1
  const int64_t blocks = (std::max(p.max_seqlen_q, p.max_seqlen_k) + 63) / 64;
  TORCH_CHECK(blocks * p.heads_q * p.nseq < (int64_t{1} << 31), who, ": more than 2^31 - 1 blocks of 64 rows");
  p.tokens_q = packed ? q.size(0) : static_cast<int64_t>(p.nseq) * p.max_seqlen_q;
  p.tokens_k = packed ? k.size(0) : static_cast<int64_t>(p.nseq) * p.max_seqlen_k;
  p.head_dim = static_cast<int>(q.size(-1));
  p.causal = static_cast<int>(causal);
  p.scale = static_cast<float>(scale);
  p.dropout_threshold = dropout_p > 0.0 ? fastlm_dropout_threshold(dropout_p) : 0u;
  p.dropout_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  p.seed = static_cast<uint64_t>(seed);
  p.bf16 = q.scalar_type() == at::kBFloat16;
  return p;
}

Tensor lse_empty(const Tensor& q, const FastlmAttnParams& p, bool packed) {
  auto opts = q.options().dtype(at::kFloat);
  return packed ? at::empty({p.heads_q, q.size(0)}, opts) : at::empty({p.nseq, p.heads_q, p.max_seqlen_q}, opts);
}

// Zero-sized grids are launch errors: these cases are answered without a kernel.
bool empty_problem(const Tensor& q, const Tensor& k, const FastlmAttnParams& p) {
  return q.numel() == 0 || k.numel() == 0 || p.nseq == 0 || p.max_seqlen_q == 0 || p.max_seqlen_k == 0;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fastlm attention (cuda): ", what, " failed: ", cudaGetErrorString(err));
}

// An output "like t": empty_like(t) when the kernels can write it directly,
// else a compact buffer (copied into the caller-visible tensor afterwards).
struct Output {
  Tensor visible, work;
  explicit Output(const Tensor& like) : visible(at::empty_like(like)) {
    work = vector_aligned(visible) ? visible : at::empty(like.sizes(), like.options());
  }
  void finish() {
    if (!work.is_same(visible)) visible.copy_(work);
  }
};

std::tuple<Tensor, Tensor> attention_forward_cuda(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                  const c10::optional<Tensor>& key_padding_mask,
                                                  const c10::optional<Tensor>& cu_seqlens_q,
                                                  const c10::optional<Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                                  int64_t max_seqlen_k, int64_t causal, int64_t window,
                                                  double dropout_p, double scale, int64_t seed) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in);
  Tensor mask_hold;
  FastlmAttnParams p = make_params(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                   causal, window, dropout_p, scale, seed, mask_hold);
  const bool packed = cu_seqlens_q.has_value();
  Output out(q_in);
  Tensor lse = lse_empty(q, p, packed);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.work.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.sq = strides_of(q, packed);
  p.sk = strides_of(k, packed);
  p.sv = strides_of(v, packed);
  p.so = strides_of(out.work, packed);
  p.slse = lse_strides(lse, packed);
  if (empty_problem(q, k, p)) {  // nothing to compute, or no keys: every row sees nothing
    out.visible.zero_();
    return {out.visible, lse.fill_(-std::numeric_limits<float>::infinity())};
  }
  check_launch(fastlm_attention_forward_cuda(p, c10::cuda::getCurrentCUDAStream()), "attention forward kernel");
  out.finish();
  return {out.visible, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_backward_cuda(
    const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& out_in,
    const Tensor& lse_in, const c10::optional<Tensor>& key_padding_mask, const c10::optional<Tensor>& cu_seqlens_q,
    const c10::optional<Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t causal,
    int64_t window, double dropout_p, double scale, int64_t seed) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in), out = aligned(out_in), dout = aligned(dout_in);
  Tensor mask_hold;
  FastlmAttnParams p = make_params(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                   causal, window, dropout_p, scale, seed, mask_hold);
  const bool packed = cu_seqlens_q.has_value();
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type() && dout.device() == q.device() && out.device() == q.device(),
              "fastlm attention backward (cuda): dout and out must match q's shape, dtype and device");
  Tensor lse = lse_empty(q, p, packed);
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.sizes() == lse.sizes() && lse_in.device() == q.device(),
              "fastlm attention backward (cuda): lse must be float32 of shape ", lse.sizes());
  lse = lse_in.contiguous();
  Output dq(q_in), dk(k_in), dv(v_in);
  if (empty_problem(q, k, p)) {
    dq.visible.zero_();
    dk.visible.zero_();
    dv.visible.zero_();
    return {dq.visible, dk.visible, dv.visible};
  }
  const auto f32 = q.options().dtype(at::kFloat);
  const int64_t D = p.head_dim;
  Tensor delta = at::empty_like(lse);
  // scratch rows per token (attention.h): O(total tokens), whatever the sequence lengths
  Tensor dq_accum = at::zeros({p.heads_q, p.tokens_q, D}, f32);
  Tensor dk_accum = at::empty({p.heads_q, p.tokens_k, D}, f32);
  Tensor dv_accum = at::empty({p.heads_q, p.tokens_k, D}, f32);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.dout = dout.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq_accum = dq_accum.data_ptr<float>();
  p.dk_accum = dk_accum.data_ptr<float>();
  p.dv_accum = dv_accum.data_ptr<float>();
  p.dq = dq.work.data_ptr();
  p.dk = dk.work.data_ptr();
  p.dv = dv.work.data_ptr();
  p.sq = strides_of(q, packed);
  p.sk = strides_of(k, packed);
  p.sv = strides_of(v, packed);
  p.so = strides_of(out, packed);
  p.sdo = strides_of(dout, packed);
  p.sdq = strides_of(dq.work, packed);
  p.sdk = strides_of(dk.work, packed);
  p.sdv = strides_of(dv.work, packed);
  p.slse = lse_strides(lse, packed);
  check_launch(fastlm_attention_backward_cuda(p, c10::cuda::getCurrentCUDAStream()), "attention backward kernels");
  dq.finish();
  dk.finish();
  dv.finish();
  return {dq.visible, dk.visible, dv.visible};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm_C, CUDA, m) {
  m.impl("attention_forward", &attention_forward_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
}
