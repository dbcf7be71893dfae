// FlashCore Phase 1 — `wmma`: tensor cores through the CUDA WMMA API.
//
// What it adds over `baseline`: both GEMMs on tensor cores with 16×16×16 WMMA fragments and
// fp32 accumulation. A warp owns 16 query rows; a CTA has 4 warps (64 rows), or 2 (32 rows)
// when 64-row CTAs would not fill one wave of SMs. K/V stream through shared memory in tiles
// of 64 keys, double-buffered with 16-byte cp.async copies (zero-filled past the end):
//   S = Q·Kᵀ (fragments) → shared → online softmax per row (two lanes a row, log2 domain,
//   masking ragged and causal keys) → P (fp16/bf16) → shared → O += P·V (fragments).
// WMMA hides the fragment-to-row mapping, so the running output lives in shared memory (fp32)
// and is rescaled there by each row's correction before the P·V fragments accumulate onto it.
// Nothing of size S×S leaves the CTA; extra device memory is the LSE (B·H·S floats).
//
// Limits: head dim 64 or 128; fp16/bf16 (sm_80+); 16-byte aligned rows (base pointers
// 16-byte aligned, strides multiples of 8 elements) — flashcore.attention checks and falls
// back otherwise. Any S, Sq ≠ Sk, bottom-right causal, GQA/MQA by index, BHSD/BSHD strides.
//
// Run: flashcore.attention(q, k, v, backend="wmma"); time: python -m flashcore bench.
// Measured (H100, 2026-11-25): mission shape 29.7 µs with synchronous, latency-serialised
// tile loads and 64-row CTAs → 17.5 µs with cp.async double buffering and 32-row CTAs
// (predicted 10–12: with ~2 warps per SM every shared-memory round trip above is exposed).
// 12× the baseline; SDPA takes 9.4. Sweep: 55–74 TFLOP/s. Notes: docs/notes.md.
#include <mma.h>

#include "common.cuh"

namespace flashcore {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kFrag = 16;                // WMMA tile edge; each warp owns 16 query rows
constexpr int kBlockN = 64;              // keys per K/V tile
constexpr int kVecElems = 8;             // 16-byte vectors of 16-bit elements
constexpr int kPad16 = kVecElems;        // +16 bytes a row: spreads rows over banks
constexpr int kPad32 = 4;                // +16 bytes a row for fp32 buffers
constexpr int kSmallWarps = 2;           // CTA of 32 query rows, for grids under one wave
constexpr int kLargeWarps = 4;           // CTA of 64 query rows otherwise

// Shared memory of one CTA. Each buffer is a whole number of 32-byte units, as WMMA's
// load/store need; K and V are double-buffered; each warp touches only its own 16 rows of
// s, p and o.
template <typename T, int kHeadDim, int kBlockM>
struct SharedStorage {
  static constexpr int kLdQKV = kHeadDim + kPad16;
  static constexpr int kLdS = kBlockN + kPad32;
  static constexpr int kLdP = kBlockN + kPad16;
  static constexpr int kLdO = kHeadDim + kPad32;
  alignas(32) T q[kBlockM][kLdQKV];
  alignas(32) T k[2][kBlockN][kLdQKV];
  alignas(32) T v[2][kBlockN][kLdQKV];
  alignas(32) float s[kBlockM][kLdS];  // scores of the current tile
  alignas(32) T p[kBlockM][kLdP];      // probabilities of the current tile
  alignas(32) float o[kBlockM][kLdO];  // running (unnormalised) output
};

// 16-byte asynchronous copy global → shared (sm_80+). With valid = false nothing is read and
// the 16 bytes are zero-filled, so padded rows contribute exactly 0.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

// Starts copying a (kRows × kHeadDim) tile whose rows [valid_rows, kRows) are zero-filled.
// The trip count is a compile-time constant, so every copy is in flight at once.
template <int kThreads, int kRows, int kHeadDim, typename T>
__device__ __forceinline__ void load_tile_async(T (*dst)[kHeadDim + kPad16], const T* src,
                                                int64_t row_stride, int valid_rows) {
  constexpr int kVecsPerRow = kHeadDim / kVecElems;
  static_assert(kRows * kVecsPerRow % kThreads == 0, "tile must split evenly over threads");
#pragma unroll
  for (int it = 0; it < kRows * kVecsPerRow / kThreads; ++it) {
    const int i = it * kThreads + threadIdx.x;
    const int r = i / kVecsPerRow, col = i % kVecsPerRow * kVecElems;
    const bool valid = r < valid_rows;  // valid_rows >= 1: row 0 is a safe dummy address
    cp_async_16(&dst[r][col], src + (valid ? r : 0) * row_stride + col, valid);
  }
}

template <typename T, int kHeadDim, int kWarps>
// Min-blocks 1: without that hint ptxas parked a cold 64-bit value in local memory (sm_80).
__global__ void __launch_bounds__(kWarps * 32, 1) wmma_kernel(const AttnParams p) {
  constexpr int kThreads = kWarps * 32;
  constexpr int kBlockM = kWarps * kFrag;
  using Smem = SharedStorage<T, kHeadDim, kBlockM>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);

  const int num_tiles = ceil_div(p.seqlen_q, kBlockM);
  const TileCoord c = tile_coord(p, num_tiles);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int m0 = c.tile * kBlockM;
  const int cta_keys = visible_keys(p, min(p.seqlen_q, m0 + kBlockM) - 1);
  const T* k_base = row_ptr<T>(p.k, p.k_stride, c.batch, c.head_kv, 0);
  const T* v_base = row_ptr<T>(p.v, p.v_stride, c.batch, c.head_kv, 0);
  const int64_t k_stride = p.k_stride[2], v_stride = p.v_stride[2];
  // Captures values, not the kernel parameter p: taking p's address would copy it to the stack.
  auto load_kv = [&sm, k_base, v_base, k_stride, v_stride, cta_keys](int buffer, int n0) {
    load_tile_async<kThreads, kBlockN, kHeadDim>(sm.k[buffer], k_base + n0 * k_stride, k_stride,
                                                 cta_keys - n0);
    load_tile_async<kThreads, kBlockN, kHeadDim>(sm.v[buffer], v_base + n0 * v_stride, v_stride,
                                                 cta_keys - n0);
    cp_async_commit();
  };

  // Softmax ownership: lanes 2r and 2r+1 share the warp's row r, each half of its columns.
  const int local_row = warp * kFrag + lane / 2;
  const int half = lane % 2;
  const int row = m0 + local_row;
  const int row_keys = row < p.seqlen_q ? visible_keys(p, row) : 0;
  OnlineSoftmax state;

  load_tile_async<kThreads, kBlockM, kHeadDim>(
      sm.q, row_ptr<T>(p.q, p.q_stride, c.batch, c.head, m0), p.q_stride[2], p.seqlen_q - m0);
  if (cta_keys > 0) load_kv(0, 0);  // commits Q with the first K/V tile
  for (int i = threadIdx.x; i < kBlockM * Smem::kLdO; i += kThreads) (&sm.o[0][0])[i] = 0.f;

  using FragA = wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::row_major>;
  using FragKt = wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::col_major>;
  using FragV = wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::row_major>;
  using FragAcc = wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float>;
  const int r0 = warp * kFrag;  // first row of this warp

  for (int n0 = 0, buf = 0; n0 < cta_keys; n0 += kBlockN, buf ^= 1) {
    cp_async_wait_all();
    __syncthreads();  // this tile landed for every thread; the other buffer is free again
    if (n0 + kBlockN < cta_keys) load_kv(buf ^ 1, n0 + kBlockN);  // overlaps this tile's math

    // S(16 × kBlockN) = Q(16 × D) · Kᵀ: K stored key-major is Kᵀ in column-major order.
#pragma unroll
    for (int j = 0; j < kBlockN / kFrag; ++j) {
      FragAcc s_frag;
      wmma::fill_fragment(s_frag, 0.f);
#pragma unroll
      for (int d = 0; d < kHeadDim / kFrag; ++d) {
        FragA q_frag;
        FragKt k_frag;
        wmma::load_matrix_sync(q_frag, &sm.q[r0][d * kFrag], Smem::kLdQKV);
        wmma::load_matrix_sync(k_frag, &sm.k[buf][j * kFrag][d * kFrag], Smem::kLdQKV);
        wmma::mma_sync(s_frag, q_frag, k_frag, s_frag);
      }
      wmma::store_matrix_sync(&sm.s[r0][j * kFrag], s_frag, Smem::kLdS, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax over this lane's half row; keys at or past row_keys are masked.
    constexpr int kCols = kBlockN / 2;
    const int col0 = half * kCols;
    float scores[kCols];
    float tile_max = -INFINITY;
#pragma unroll
    for (int i = 0; i < kCols; ++i) {
      const bool visible = n0 + col0 + i < row_keys;
      scores[i] = visible ? sm.s[local_row][col0 + i] * p.scale_log2 : -INFINITY;
      tile_max = fmaxf(tile_max, scores[i]);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    const float correction = state.rescale(tile_max);
    float tile_sum = 0.f;
#pragma unroll
    for (int i = 0; i < kCols; ++i) {
      const float prob = exp2f(scores[i] - state.shift());
      tile_sum += prob;
      sm.p[local_row][col0 + i] = from_float<T>(prob);
    }
    state.sum += tile_sum + __shfl_xor_sync(0xffffffffu, tile_sum, 1);
#pragma unroll
    for (int d = half * kHeadDim / 2; d < (half + 1) * kHeadDim / 2; ++d) {
      sm.o[local_row][d] *= correction;
    }
    __syncwarp();

    // O(16 × D) += P(16 × kBlockN) · V(kBlockN × D), accumulated onto the rescaled O.
#pragma unroll
    for (int d = 0; d < kHeadDim / kFrag; ++d) {
      FragAcc o_frag;
      wmma::load_matrix_sync(o_frag, &sm.o[r0][d * kFrag], Smem::kLdO, wmma::mem_row_major);
#pragma unroll
      for (int j = 0; j < kBlockN / kFrag; ++j) {
        FragA p_frag;
        FragV v_frag;
        wmma::load_matrix_sync(p_frag, &sm.p[r0][j * kFrag], Smem::kLdP);
        wmma::load_matrix_sync(v_frag, &sm.v[buf][j * kFrag][d * kFrag], Smem::kLdQKV);
        wmma::mma_sync(o_frag, p_frag, v_frag, o_frag);
      }
      wmma::store_matrix_sync(&sm.o[r0][d * kFrag], o_frag, Smem::kLdO, wmma::mem_row_major);
    }
  }
  __syncthreads();  // O written by fragments (and, with no key tile, zeroed by all threads)

  if (row >= p.seqlen_q) return;
  // Epilogue: each lane of the pair normalises and stores half of its row, 8 elements a store.
  const float out_scale = state.output_scale();
  T* o_row = const_cast<T*>(row_ptr<T>(p.o, p.o_stride, c.batch, c.head, row));
#pragma unroll
  for (int d = half * kHeadDim / 2; d < (half + 1) * kHeadDim / 2; d += kVecElems) {
    const float* o = &sm.o[local_row][d];
    *reinterpret_cast<uint4*>(o_row + d) = make_uint4(
        pack2(T{}, o[0] * out_scale, o[1] * out_scale), pack2(T{}, o[2] * out_scale, o[3] * out_scale),
        pack2(T{}, o[4] * out_scale, o[5] * out_scale), pack2(T{}, o[6] * out_scale, o[7] * out_scale));
  }
  if (p.lse && half == 0) {
    p.lse[(int64_t(c.batch) * p.heads_q + c.head) * p.seqlen_q + row] = state.lse();
  }
}

template <typename T, int kHeadDim, int kWarps>
cudaError_t launch(const AttnParams& p, int device, cudaStream_t stream) {
  constexpr int kSmemBytes = sizeof(SharedStorage<T, kHeadDim, kWarps * kFrag>);
  const cudaError_t status =
      allow_shared_memory<wmma_kernel<T, kHeadDim, kWarps>>(kSmemBytes, device);
  if (status != cudaSuccess) return status;
  const int num_tiles = ceil_div(p.seqlen_q, kWarps * kFrag);
  wmma_kernel<T, kHeadDim, kWarps>
      <<<p.batch * p.heads_q * num_tiles, kWarps * 32, kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

// 64-row CTAs when they make at least one full wave, else 32-row CTAs for twice the CTAs.
template <typename T, int kHeadDim>
cudaError_t launch_for_grid(const AttnParams& p, cudaStream_t stream) {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t large_ctas =
      int64_t(p.batch) * p.heads_q * ceil_div(p.seqlen_q, kLargeWarps * kFrag);
  return large_ctas >= sms ? launch<T, kHeadDim, kLargeWarps>(p, device, stream)
                           : launch<T, kHeadDim, kSmallWarps>(p, device, stream);
}

}  // namespace

cudaError_t wmma_forward(const AttnParams& p, cudaStream_t stream) {
  return dispatch<64, 128>(p, [&](auto tag) {
    using Tag = decltype(tag);
    return launch_for_grid<typename Tag::Elem, Tag::kHeadDim>(p, stream);
  });
}

}  // namespace flashcore
