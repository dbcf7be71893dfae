// The one argument struct every CUDA rung takes, and the rungs' host entry points.
// Plain C++/CUDA: no PyTorch header, so every kernel file compiles with nvcc alone.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace flashcore {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

struct AttnParams {
  const void* q;  // (batch, heads_q,  seqlen_q, head_dim)
  const void* k;  // (batch, heads_kv, seqlen_k, head_dim)
  const void* v;  // (batch, heads_kv, seqlen_k, head_dim)
  void* o;        // (batch, heads_q,  seqlen_q, head_dim)
  float* lse;     // (batch, heads_q, seqlen_q) contiguous, natural log; nullptr: not wanted

  // Element strides of the batch, head and sequence dims; the head-dim stride is 1.
  int64_t q_stride[3], k_stride[3], v_stride[3], o_stride[3];

  int batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim;
  float scale_log2;  // softmax scale × log2(e): scores are exponentiated with exp2
  bool causal;       // bottom-right aligned: query i sees keys j <= i + seqlen_k - seqlen_q
  DType dtype;
};

// Each returns cudaErrorInvalidValue for a head dim it has no kernel for, else the launch's status.
cudaError_t baseline_forward(const AttnParams& params, cudaStream_t stream);
cudaError_t wmma_forward(const AttnParams& params, cudaStream_t stream);
cudaError_t hopper_forward(const AttnParams& params, cudaStream_t stream);  // sm_90a only

}  // namespace flashcore
