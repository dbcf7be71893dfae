// Registers one CUDA rung with PyTorch as the custom op flashcore::<rung>_fwd.
// Compiled once per rung with -DFLASHCORE_RUNG=<rung>, beside that rung's .cu file.
//
//   flashcore::<rung>_fwd(Tensor q, Tensor k, Tensor v, float scale, bool causal,
//                         bool return_lse) -> (Tensor out, Tensor lse)
//
// The same function, less the empty LSE tensor, is also the extension module's `forward`,
// which eager calls use: a direct call skips the dispatcher's argument boxing and its autograd
// fallback (host time is most of a small call). torch.compile, fake tensors and dispatch modes
// go through the op.
//
// flashcore.attention validates arguments with user-facing messages before calling this; the
// checks here only guard memory safety for direct calls of the op.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>

#include "attention.h"

#ifndef FLASHCORE_RUNG
#error "compile with -DFLASHCORE_RUNG=<rung name>"
#endif
#define FC_STR_(x) #x
#define FC_STR(x) FC_STR_(x)
#define FC_CAT_(a, b) a##b
#define FC_CAT(a, b) FC_CAT_(a, b)
#define FC_OP_NAME FC_STR(FLASHCORE_RUNG) "_fwd"

namespace {

void set_strides(int64_t* dst, const at::Tensor& t) {
  for (int i = 0; i < 3; ++i) dst[i] = t.stride(i);
}

// The LSE is an undefined tensor (None in Python) unless asked for.
std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, double scale, bool causal,
                                       bool return_lse) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, FC_OP_NAME ": q, k, v must be 4-D");
  TORCH_CHECK(q.is_cuda() && k.device() == q.device() && v.device() == q.device(),
              FC_OP_NAME ": q, k, v must be on one CUDA device");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  (q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16),
              FC_OP_NAME ": q, k, v must all be float16 or all bfloat16");
  const int64_t batch = q.size(0), heads_q = q.size(1), seqlen_q = q.size(2), dim = q.size(3);
  TORCH_CHECK(k.size(0) == batch && v.size(0) == batch && k.size(3) == dim &&
                  v.size(3) == dim && v.size(1) == k.size(1) && v.size(2) == k.size(2) &&
                  k.size(1) > 0 && heads_q % k.size(1) == 0,
              FC_OP_NAME ": q, k, v shapes do not match");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              FC_OP_NAME ": the head dim must have stride 1");

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = return_lse ? at::empty({batch, heads_q, seqlen_q}, q.options().dtype(at::kFloat))
                              : at::Tensor();
  if (out.numel() == 0) return {out, lse};

  flashcore::AttnParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = out.data_ptr();
  p.lse = return_lse ? lse.data_ptr<float>() : nullptr;
  set_strides(p.q_stride, q);
  set_strides(p.k_stride, k);
  set_strides(p.v_stride, v);
  set_strides(p.o_stride, out);
  p.batch = static_cast<int>(batch);
  p.heads_q = static_cast<int>(heads_q);
  p.heads_kv = static_cast<int>(k.size(1));
  p.seqlen_q = static_cast<int>(seqlen_q);
  p.seqlen_k = static_cast<int>(k.size(2));
  p.head_dim = static_cast<int>(dim);
  p.scale_log2 = static_cast<float>(scale * M_LOG2E);
  p.causal = causal;
  p.dtype = q.scalar_type() == at::kHalf ? flashcore::DType::kFloat16 : flashcore::DType::kBFloat16;

  const cudaError_t status =
      flashcore::FC_CAT(FLASHCORE_RUNG, _forward)(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, FC_OP_NAME ": ", cudaGetErrorString(status),
              " (head dim ", dim, ")");
  return {out, lse};
}

// The op returns an empty LSE where none was asked for (its schema has two tensors).
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, double scale, bool causal,
                                           bool return_lse) {
  auto [out, lse] = run(q, k, v, scale, causal, return_lse);
  if (!return_lse) lse = at::empty({0}, q.options().dtype(at::kFloat));
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flashcore, m) {
  m.def(FC_OP_NAME
        "(Tensor q, Tensor k, Tensor v, float scale, bool causal, bool return_lse)"
        " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(flashcore, CUDA, m) { m.impl(FC_OP_NAME, &forward); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &run, "The op's function without the dispatcher (LSE None unless asked for).");
}
