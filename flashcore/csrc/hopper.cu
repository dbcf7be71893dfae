// FlashCore Phase 3 — `hopper`: warp-specialised, persistent FlashAttention forward for sm_90a.
//
// What it adds over `triton`: the Hopper machinery by hand.
//   - A producer warpgroup (one thread) streams Q, K and V tiles with TMA (128-byte swizzle)
//     into a ring of shared-memory stages; each stage completes on a "full" mbarrier and is
//     handed back on an "empty" one. It keeps 24 registers (setmaxnreg); the two consumer
//     warpgroups take 240 each.
//   - Each consumer warpgroup owns 64 query rows of a 128-row tile. S = Q·Kᵀ is one chain of
//     wgmma with both operands in shared memory; the online softmax (exp2, scale folded into
//     one FFMA) runs on the accumulator registers; P stays in those registers, rounded to 16
//     bits, as the A operand of O += P·V (V read MN-major from shared memory).
//   - Epilogue: O normalised in registers, written swizzled to shared memory, stored by TMA
//     (rows past the end are clipped); LSE from registers.
//   - Persistent grid: one CTA per SM walks tiles in a static order (causal: longest first).
// Key tiles run last to first, so the masked tiles (causal diagonal, ragged end) come first
// and the rest pay no mask cost.
//
// Limits: head dim 64 or 128; fp16/bf16; 16-byte aligned rows (TMA). Any S, Sq ≠ Sk,
// bottom-right causal, GQA/MQA by index, BHSD/BSHD strides, LSE, fully masked rows → 0.
// Measured: see docs/notes.md (Phase 3) and benchmarks/results/.
#include <cudaTypedefs.h>

#include "common.cuh"
#include "hopper_ptx.cuh"

namespace flashcore {
namespace {

using namespace sm90;

constexpr int kConsumers = 2;                  // consumer warpgroups, 64 query rows each
constexpr int kRowsPerConsumer = 64;           // the M of one wgmma
constexpr int kBlockM = kConsumers * kRowsPerConsumer;
constexpr int kBlockN = 128;                   // keys per K/V tile
constexpr int kThreads = (1 + kConsumers) * kWarpgroupThreads;
constexpr int kProducerRegisters = 24;
constexpr int kConsumerRegisters = 240;        // 128 × (24 + 2 × 240) ≤ 64K registers
constexpr int kMmaK = 16;                      // the K of one 16-bit wgmma

template <typename T, int kHeadDim>
struct SharedStorage {
  static constexpr int kChunks = kHeadDim / kChunkElems;
  static constexpr int kStages = kHeadDim <= 64 ? 3 : 2;
  T q[kChunks][kBlockM * kChunkElems];
  T k[kStages][kChunks][kBlockN * kChunkElems];
  T v[kStages][kChunks][kBlockN * kChunkElems];
  T o[kConsumers][kChunks][kRowsPerConsumer * kChunkElems];
  uint64_t q_full, q_empty;
  uint64_t k_full[kStages], k_empty[kStages], v_full[kStages], v_empty[kStages];
};

struct TensorMaps {
  CUtensorMap q, k, v, o;
};

// The tiles of a launch in the order the persistent CTAs take them (CTA c: c, c + grid, ...).
// Non-causal: one head's query tiles next to each other, so they share K/V in L2. Causal: the
// longest tiles (last query rows) of every head first, so short ones fill the tail.
struct Tile {
  int batch, head, m_block;
};
__device__ __forceinline__ Tile tile_at(const AttnParams& p, int index, int m_blocks) {
  const int heads = p.batch * p.heads_q;
  const int bh = p.causal ? index % heads : index / m_blocks;
  const int m_block = p.causal ? m_blocks - 1 - index / heads : index % m_blocks;
  return {bh / p.heads_q, bh % p.heads_q, m_block};
}
// Key tiles a query tile needs: those the last (valid) row of the tile can see.
__device__ __forceinline__ int key_blocks(const AttnParams& p, int m_block) {
  return ceil_div(visible_keys(p, min(p.seqlen_q, (m_block + 1) * kBlockM) - 1), kBlockN);
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}
// One arrival per consumer warp, after the warp's own wgmma reads of the stage are done.
__device__ __forceinline__ void warp_release(uint64_t* bar) {
  __syncwarp();
  if (threadIdx.x % 32 == 0) mbar_arrive(bar);
}

// The producer: one thread issues every TMA load of the CTA's tiles.
template <typename T, int kHeadDim>
__device__ void produce(const AttnParams& p, const TensorMaps& maps,
                        SharedStorage<T, kHeadDim>& s, int num_tiles, int m_blocks) {
  using Smem = SharedStorage<T, kHeadDim>;
  constexpr uint32_t kQBytes = sizeof(Smem::q), kKVBytes = sizeof(Smem::k[0]);
  const int group = p.heads_q / p.heads_kv;
  int kv_iter = 0;
  for (int index = blockIdx.x, local = 0; index < num_tiles; index += gridDim.x, ++local) {
    const Tile t = tile_at(p, index, m_blocks);
    const int head_kv = t.head / group;
    mbar_wait(&s.q_empty, (local & 1) ^ 1);
    mbar_arrive_expect_tx(&s.q_full, kQBytes);
#pragma unroll
    for (int c = 0; c < Smem::kChunks; ++c)
      tma_load(s.q[c], &maps.q, &s.q_full, c * kChunkElems, t.m_block * kBlockM, t.head, t.batch);
    for (int n = key_blocks(p, t.m_block) - 1; n >= 0; --n, ++kv_iter) {
      const int stage = kv_iter % Smem::kStages;
      const uint32_t parity = (kv_iter / Smem::kStages) & 1;
      mbar_wait(&s.k_empty[stage], parity ^ 1);
      mbar_arrive_expect_tx(&s.k_full[stage], kKVBytes);
#pragma unroll
      for (int c = 0; c < Smem::kChunks; ++c)
        tma_load(s.k[stage][c], &maps.k, &s.k_full[stage], c * kChunkElems, n * kBlockN,
                 head_kv, t.batch);
      mbar_wait(&s.v_empty[stage], parity ^ 1);
      mbar_arrive_expect_tx(&s.v_full[stage], kKVBytes);
#pragma unroll
      for (int c = 0; c < Smem::kChunks; ++c)
        tma_load(s.v[stage][c], &maps.v, &s.v_full[stage], c * kChunkElems, n * kBlockN,
                 head_kv, t.batch);
    }
  }
}

// A consumer warpgroup: 64 query rows of each tile, from Q·Kᵀ to the stored output.
template <typename T, int kHeadDim>
__device__ void consume(const AttnParams& p, const TensorMaps& maps,
                        SharedStorage<T, kHeadDim>& s, int num_tiles, int m_blocks,
                        int consumer) {
  using Smem = SharedStorage<T, kHeadDim>;
  constexpr int kChunkBytesN = kBlockN * kSwizzleBytes;  // one K/V chunk
  const int thread = threadIdx.x % kWarpgroupThreads;
  const int warp = thread / 32, lane = thread % 32;
  // This thread's two rows (i = 0, 1) inside the consumer's 64, and its first column pair.
  const int row_in_tile = consumer * kRowsPerConsumer + warp * 16 + lane / 4;
  const int col_in_8 = 2 * (lane % 4);
  int kv_iter = 0;
  for (int index = blockIdx.x, local = 0; index < num_tiles; index += gridDim.x, ++local) {
    const Tile t = tile_at(p, index, m_blocks);
    const int n_blocks = key_blocks(p, t.m_block);
    // Key tiles at or past this index hold keys some row of the CTA tile must not see.
    const int first_masked = visible_keys(p, t.m_block * kBlockM) / kBlockN;
    int limit[2];
    OnlineSoftmax row[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) limit[i] = visible_keys(p, t.m_block * kBlockM + row_in_tile + 8 * i);
    float o[kHeadDim / 2];
#pragma unroll
    for (int r = 0; r < kHeadDim / 2; ++r) o[r] = 0.f;

    mbar_wait(&s.q_full, local & 1);
    for (int n = n_blocks - 1; n >= 0; --n, ++kv_iter) {
      const int stage = kv_iter % Smem::kStages;
      const uint32_t parity = (kv_iter / Smem::kStages) & 1;

      // S = Q·Kᵀ: 64 × 128 scores, K steps of 16 along the head dim.
      float sc[kBlockN / 2];
      mbar_wait(&s.k_full[stage], parity);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kHeadDim / kMmaK; ++kk) {
        const int chunk = kk / 4, offset = (kk % 4) * kMmaK;
        const uint64_t a = smem_desc(&s.q[chunk][consumer * kRowsPerConsumer * kChunkElems + offset],
                                     16, kSwizzleAtomBytes);
        const uint64_t b = smem_desc(&s.k[stage][chunk][offset], 16, kSwizzleAtomBytes);
        Wgmma<T>::ss_n128(sc, a, b, kk > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_registers(sc);
      warp_release(&s.k_empty[stage]);
      if (n == 0) warp_release(&s.q_empty);  // the tile's last read of Q

      // Mask (only tiles that hold invisible keys), then the online softmax on registers.
      if (n >= first_masked) {
#pragma unroll
        for (int r = 0; r < kBlockN / 2; ++r) {
          const int key = n * kBlockN + (r / 4) * 8 + col_in_8 + r % 2;
          if (key >= limit[(r / 2) % 2]) sc[r] = -INFINITY;
        }
      }
      float correction[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float mx = -INFINITY;
#pragma unroll
        for (int t8 = 0; t8 < kBlockN / 8; ++t8)
          mx = fmaxf(mx, fmaxf(sc[4 * t8 + 2 * i], sc[4 * t8 + 2 * i + 1]));
        correction[i] = row[i].rescale(quad_max(mx) * p.scale_log2);
        const float shift = row[i].shift();
        float sum = 0.f;
#pragma unroll
        for (int t8 = 0; t8 < kBlockN / 8; ++t8)
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            float& x = sc[4 * t8 + 2 * i + j];
            x = fast_exp2(fmaf(x, p.scale_log2, -shift));
            sum += x;
          }
        row[i].sum += sum;  // this thread's share; the quad's shares are added at the end
      }
#pragma unroll
      for (int r = 0; r < kHeadDim / 2; ++r) o[r] *= correction[(r / 2) % 2];
      uint32_t pa[kBlockN / kMmaK][4];
#pragma unroll
      for (int kk = 0; kk < kBlockN / kMmaK; ++kk)
#pragma unroll
        for (int j = 0; j < 4; ++j) pa[kk][j] = pack2(T{}, sc[8 * kk + 2 * j], sc[8 * kk + 2 * j + 1]);

      // O += P·V: K steps of 16 keys; V is MN-major (head dim contiguous).
      mbar_wait(&s.v_full[stage], parity);
      fence_registers(o);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBlockN / kMmaK; ++kk) {
        const uint64_t b = smem_desc(&s.v[stage][0][kk * kMmaK * kChunkElems], kChunkBytesN,
                                     kSwizzleAtomBytes);
        if constexpr (kHeadDim == 64) Wgmma<T>::rs_n64(o, pa[kk], b, true);
        else Wgmma<T>::rs_n128(o, pa[kk], b, true);
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_registers(o);
#pragma unroll
      for (int kk = 0; kk < kBlockN / kMmaK; ++kk) fence_registers(pa[kk]);  // live until done
      warp_release(&s.v_empty[stage]);
    }
    if (n_blocks == 0) warp_release(&s.q_empty);

    // Epilogue: O / sum → swizzled shared memory → TMA store; LSE from the quad leaders.
    float out_scale[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      row[i].sum = quad_sum(row[i].sum);
      out_scale[i] = row[i].output_scale();
    }
    const int barrier = 1 + consumer;
    if (thread == 0) tma_store_wait_read();  // the previous tile's store has read its buffer
    named_barrier_sync(barrier, kWarpgroupThreads);
#pragma unroll
    for (int r = 0; r < kHeadDim / 2; r += 2) {
      const int i = (r / 2) % 2, col = (r / 4) * 8 + col_in_8;
      const int local_row = warp * 16 + lane / 4 + 8 * i;
      char* chunk = reinterpret_cast<char*>(s.o[consumer][col / kChunkElems]);
      *reinterpret_cast<uint32_t*>(chunk + swizzled_offset(local_row, col % kChunkElems)) =
          pack2(T{}, o[r] * out_scale[i], o[r + 1] * out_scale[i]);
    }
    fence_async_shared();
    named_barrier_sync(barrier, kWarpgroupThreads);
    if (thread == 0) {
#pragma unroll
      for (int c = 0; c < Smem::kChunks; ++c)
        tma_store(&maps.o, s.o[consumer][c], c * kChunkElems,
                  t.m_block * kBlockM + consumer * kRowsPerConsumer, t.head, t.batch);
      tma_store_commit();
    }
    if (p.lse && lane % 4 == 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int q_row = t.m_block * kBlockM + row_in_tile + 8 * i;
        if (q_row < p.seqlen_q)
          p.lse[(int64_t(t.batch) * p.heads_q + t.head) * p.seqlen_q + q_row] = row[i].lse();
      }
    }
  }
  if (thread == 0) tma_store_wait_read();  // shared memory must outlive the last store's reads
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads, 1)
    hopper_kernel(const AttnParams p, const __grid_constant__ TensorMaps maps, int num_tiles,
                  int m_blocks) {
  using Smem = SharedStorage<T, kHeadDim>;
  extern __shared__ char smem_raw[];
  Smem& s = *reinterpret_cast<Smem*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + kSwizzleAtomBytes - 1) & ~uintptr_t(kSwizzleAtomBytes - 1));
  const int role = warpgroup_index();
  if (threadIdx.x == 0) {
    constexpr int kConsumerWarps = kConsumers * kWarpgroupThreads / 32;
    mbar_init(&s.q_full, 1);
    mbar_init(&s.q_empty, kConsumerWarps);
    for (int i = 0; i < Smem::kStages; ++i) {
      mbar_init(&s.k_full[i], 1);
      mbar_init(&s.v_full[i], 1);
      mbar_init(&s.k_empty[i], kConsumerWarps);
      mbar_init(&s.v_empty[i], kConsumerWarps);
    }
    mbar_init_fence();
  }
  __syncthreads();
  if (role == 0) {
    regs_shrink_to<kProducerRegisters>();
    if (threadIdx.x == 0) {
      tma_prefetch_map(&maps.q);
      tma_prefetch_map(&maps.k);
      tma_prefetch_map(&maps.v);
      tma_prefetch_map(&maps.o);
      produce(p, maps, s, num_tiles, m_blocks);
    }
  } else {
    regs_grow_to<kConsumerRegisters>();
    consume(p, maps, s, num_tiles, m_blocks, role - 1);
  }
}

// ---- host side --------------------------------------------------------------------------------

PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static const auto fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      f = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// A 4-D map (head dim, seq, head, batch) over one (B, H, S, D) tensor, loading or storing
// boxes of 64 columns × `box_rows` rows, 128-byte swizzled.
bool make_map(CUtensorMap* map, const void* base, DType dtype, int dim, int seqlen, int heads,
              int batch, const int64_t* stride, int box_rows) {
  constexpr int kElemBytes = 2;
  // Sequence, head, batch: extents and byte strides. A dim of extent 1 is never stepped over,
  // so it gets a stride TMA accepts whatever torch reports for it (an empty K/V gets extent 1
  // and is never read).
  const int64_t extent[3] = {max(seqlen, 1), heads, batch};
  const int64_t elem_stride[3] = {stride[2], stride[1], stride[0]};
  cuuint64_t sizes[4] = {cuuint64_t(dim)}, strides[3];
  for (int i = 0; i < 3; ++i) {
    sizes[i + 1] = extent[i];
    strides[i] = extent[i] == 1 ? cuuint64_t(dim) * kElemBytes : elem_stride[i] * kElemBytes;
  }
  cuuint32_t box[4] = {cuuint32_t(kChunkElems), cuuint32_t(box_rows), 1, 1};
  cuuint32_t unit[4] = {1, 1, 1, 1};
  const auto type = dtype == DType::kFloat16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                             : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const auto encode = encode_tiled();
  return encode &&
         encode(map, type, 4, const_cast<void*>(base), sizes, strides, box, unit,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) ==
             CUDA_SUCCESS;
}

template <typename T, int kHeadDim>
cudaError_t launch(const AttnParams& p, cudaStream_t stream) {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  constexpr int kSmemBytes = sizeof(SharedStorage<T, kHeadDim>) + kSwizzleAtomBytes;
  const cudaError_t status =
      allow_shared_memory<hopper_kernel<T, kHeadDim>>(kSmemBytes, device);
  if (status != cudaSuccess) return status;

  TensorMaps maps;
  const bool ok =
      make_map(&maps.q, p.q, p.dtype, kHeadDim, p.seqlen_q, p.heads_q, p.batch, p.q_stride, kBlockM) &&
      make_map(&maps.k, p.k, p.dtype, kHeadDim, p.seqlen_k, p.heads_kv, p.batch, p.k_stride, kBlockN) &&
      make_map(&maps.v, p.v, p.dtype, kHeadDim, p.seqlen_k, p.heads_kv, p.batch, p.v_stride, kBlockN) &&
      make_map(&maps.o, p.o, p.dtype, kHeadDim, p.seqlen_q, p.heads_q, p.batch, p.o_stride,
               kRowsPerConsumer);
  if (!ok) return cudaErrorInvalidValue;
  const int m_blocks = ceil_div(p.seqlen_q, kBlockM);
  const int num_tiles = p.batch * p.heads_q * m_blocks;
  hopper_kernel<T, kHeadDim>
      <<<min(num_tiles, sms), kThreads, kSmemBytes, stream>>>(p, maps, num_tiles, m_blocks);
  return cudaGetLastError();
}

}  // namespace

cudaError_t hopper_forward(const AttnParams& p, cudaStream_t stream) {
  return dispatch<64, 128>(p, [&](auto tag) {
    using Tag = decltype(tag);
    return launch<typename Tag::Elem, Tag::kHeadDim>(p, stream);
  });
}

}  // namespace flashcore
