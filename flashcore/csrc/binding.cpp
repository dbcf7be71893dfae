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
// checks here only guard memory safety for direct calls of the op. Once a call has run on this
// rung, the module's `fast_forward` takes the common call whole (flashcore.api): it checks here,
// in C++, that the call is one the Python path would hand this rung unchanged, and answers None
// for any other, which then takes that path.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <bitset>
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

// What the rung takes (backends.CudaRung.why_not), as flashcore.api enables the fast path:
// head dims, whether rows must be 16-byte aligned, and the devices it has run on.
struct Accepts {
  std::bitset<513> head_dims;
  bool rows_16b = true;
  std::bitset<64> devices;
};
Accepts accepts;

void allow_fast_path(const std::vector<int>& head_dims, bool rows_16b, int device) {
  for (int d : head_dims) accepts.head_dims.set(d);
  accepts.rows_16b = rows_16b;
  accepts.devices.set(device);
}

// The common call (flashcore.api._common_call_key) that this rung takes without gradients, on
// plain tensors with no dispatch mode active: run it; anything else, None.
py::object fast_forward(py::handle q_obj, py::handle k_obj, py::handle v_obj, py::handle causal,
                        py::handle scale, py::handle return_lse) {
  const py::object other = py::none();
  if (!THPVariable_CheckExact(q_obj.ptr()) || !THPVariable_CheckExact(k_obj.ptr()) ||
      !THPVariable_CheckExact(v_obj.ptr()) || !PyBool_Check(causal.ptr()) ||
      !PyBool_Check(return_lse.ptr()) || !(scale.is_none() || PyFloat_CheckExact(scale.ptr())) ||
      c10::impl::TorchDispatchModeTLS::stack_len() > 0)
    return other;
  const at::Tensor& q = THPVariable_Unpack(q_obj.ptr());
  const at::Tensor& k = THPVariable_Unpack(k_obj.ptr());
  const at::Tensor& v = THPVariable_Unpack(v_obj.ptr());
  if (q.dim() != 4 || k.dim() != 4 || k.sizes() != v.sizes() || q.size(0) != k.size(0) ||
      q.size(3) != k.size(3) || k.size(1) == 0 || q.size(1) % k.size(1) != 0 ||
      q.size(3) > 512 || !accepts.head_dims.test(q.size(3)))
    return other;
  const auto type = q.scalar_type();
  if ((type != at::kHalf && type != at::kBFloat16) || k.scalar_type() != type ||
      v.scalar_type() != type || !q.is_cuda() || k.device() != q.device() ||
      v.device() != q.device() || q.device().index() >= 64 || !accepts.devices.test(q.device().index()))
    return other;
  if (at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad()))
    return other;
  int64_t low_bits = 0;
  for (const at::Tensor* t : {&q, &k, &v}) {
    if (t->stride(3) != 1) return other;
    low_bits |= reinterpret_cast<intptr_t>(t->data_ptr()) |
                (t->stride(0) | t->stride(1) | t->stride(2)) * t->element_size();
  }
  if (accepts.rows_16b && (low_bits & 15)) return other;
  const double s = scale.is_none() ? 1.0 / std::sqrt(double(q.size(3))) : PyFloat_AS_DOUBLE(scale.ptr());
  const bool lse = return_lse.ptr() == Py_True;
  auto [out, out_lse] = run(q, k, v, s, causal.ptr() == Py_True, lse);
  if (lse) return py::make_tuple(out, out_lse);
  return py::cast(out);
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
  m.def("allow_fast_path", &allow_fast_path, "Enables fast_forward for these head dims on a device.");
  m.def("fast_forward", &fast_forward,
        "flashcore.attention's common call on this rung, run whole; None for any other call.");
}
