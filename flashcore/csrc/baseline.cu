// FlashCore Phase 0 — `baseline`: the scalar rung.
//
// What it is: one thread per query row (two above head dim 64), fp32 math on CUDA cores. A CTA of kRows threads
// streams K/V through shared memory in tiles of kTileKeys keys (scalar 2-byte global loads);
// each thread walks the keys of a tile one by one, updating its row's online softmax (running
// max and sum, in the log2 domain) and rescaling its fp32 output row only when the max grows.
// One pass over K/V, nothing of size S×S anywhere: extra memory is the LSE (B·H·S floats).
//
// Limits: head dim 32, 64, 80, 96 or 128 (the output row lives in registers); fp16 or bf16;
// any S, Sq ≠ Sk, bottom-right causal, GQA/MQA by index, any strides with a unit last stride.
//
// Run: flashcore.attention(q, k, v, backend="baseline"); time: python -m flashcore bench.
// Measured (H100, 2026-11-25): mission shape 210 µs GPU time (2.6 TFLOP/s); the BENCH.md
// sweep 9–16 TFLOP/s. One-thread-per-row at D=128 spilled 148 B; two threads a row: none.
// Notes: docs/notes.md.
#include "common.cuh"

namespace flashcore {
namespace {

constexpr int kRows = 64;      // query rows per CTA
constexpr int kTileKeys = 64;  // keys staged in shared memory per step

// Above head dim 64 two threads share a row, each holding half of q and of the output row, so
// that a thread's state stays within 255 registers (one thread per row spilled at D=128).
template <int kHeadDim>
__host__ __device__ constexpr int threads_per_row() { return kHeadDim > 64 ? 2 : 1; }

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kRows * threads_per_row<kHeadDim>())
    baseline_kernel(const AttnParams p) {
  using T2 = Pair<T>;
  constexpr int kSplit = threads_per_row<kHeadDim>();
  constexpr int kThreads = kRows * kSplit;
  constexpr int kDims = kHeadDim / kSplit;  // head-dim slice owned by one thread
  constexpr int kPairs = kDims / 2;
  __shared__ T k_tile[kTileKeys][kHeadDim];  // the threads of a warp read the same key: broadcast
  __shared__ T v_tile[kTileKeys][kHeadDim];

  const int num_tiles = ceil_div(p.seqlen_q, kRows);
  const TileCoord c = tile_coord(p, num_tiles);
  const int row = c.tile * kRows + threadIdx.x / kSplit;
  const int dim0 = threadIdx.x % kSplit * kDims;
  const unsigned row_lanes = kSplit == 1 ? 1u << (threadIdx.x % 32) : 3u << (threadIdx.x % 32 & ~1);
  const bool active = row < p.seqlen_q;
  const int row_keys = active ? visible_keys(p, row) : 0;
  const int cta_keys = visible_keys(p, min(p.seqlen_q, (c.tile + 1) * kRows) - 1);

  T2 q[kPairs];  // 16-bit pairs: half the registers of fp32
  float acc[kDims];
  if (active) {  // element loads: rows need only 2-byte alignment
    const T* q_row = row_ptr<T>(p.q, p.q_stride, c.batch, c.head, row) + dim0;
#pragma unroll
    for (int i = 0; i < kPairs; ++i) {
      q[i].x = q_row[2 * i];
      q[i].y = q_row[2 * i + 1];
    }
  }
#pragma unroll
  for (int d = 0; d < kDims; ++d) acc[d] = 0.f;
  OnlineSoftmax state;

  for (int tile_start = 0; tile_start < cta_keys; tile_start += kTileKeys) {
    const int tile_keys = min(kTileKeys, cta_keys - tile_start);
    __syncthreads();  // the previous tile is no longer read
    for (int i = threadIdx.x; i < tile_keys * kHeadDim; i += kThreads) {
      const int key = i / kHeadDim, d = i % kHeadDim;
      k_tile[key][d] = row_ptr<T>(p.k, p.k_stride, c.batch, c.head_kv, tile_start + key)[d];
      v_tile[key][d] = row_ptr<T>(p.v, p.v_stride, c.batch, c.head_kv, tile_start + key)[d];
    }
    __syncthreads();

    const int my_keys = min(tile_keys, row_keys - tile_start);
    for (int j = 0; j < my_keys; ++j) {
      const T2* key = reinterpret_cast<const T2*>(&k_tile[j][dim0]);
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < kPairs; ++i) {
        const float2 qf = to_float2(q[i]), kf = to_float2(key[i]);
        dot += qf.x * kf.x + qf.y * kf.y;
      }
      if (kSplit == 2) dot += __shfl_xor_sync(row_lanes, dot, 1);
      const float score = dot * p.scale_log2;
      if (score > state.max) {
        const float correction = state.rescale(score);
#pragma unroll
        for (int d = 0; d < kDims; ++d) acc[d] *= correction;
      }
      const float prob = exp2f(score - state.shift());
      state.sum += prob;
#pragma unroll
      for (int d = 0; d < kDims; ++d) acc[d] += prob * to_float(v_tile[j][dim0 + d]);
    }
  }

  if (!active) return;
  T* o_row = const_cast<T*>(row_ptr<T>(p.o, p.o_stride, c.batch, c.head, row)) + dim0;
  const float out_scale = state.output_scale();
#pragma unroll
  for (int d = 0; d < kDims; ++d) o_row[d] = from_float<T>(acc[d] * out_scale);
  if (p.lse && dim0 == 0) p.lse[(int64_t(c.batch) * p.heads_q + c.head) * p.seqlen_q + row] = state.lse();
}

}  // namespace

cudaError_t baseline_forward(const AttnParams& p, cudaStream_t stream) {
  return dispatch<32, 64, 80, 96, 128>(p, [&](auto tag) {
    using Tag = decltype(tag);
    const int num_tiles = ceil_div(p.seqlen_q, kRows);
    baseline_kernel<typename Tag::Elem, Tag::kHeadDim>
        <<<p.batch * p.heads_q * num_tiles, kRows * threads_per_row<Tag::kHeadDim>(), 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace flashcore
