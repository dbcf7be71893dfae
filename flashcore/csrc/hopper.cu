// FlashCore Phase 3 — `hopper`: warp-specialised, persistent FlashAttention forward for sm_90a.
//
// What it adds over `triton`: the Hopper machinery by hand.
//   - A producer warpgroup (one thread) streams Q, K and V tiles with TMA (128-byte swizzle)
//     into a ring of shared-memory stages (Q: two buffers, so the next tile's Q loads early,
//     where shared memory holds them, else one; the output is staged in a buffer of its own,
//     or in its tile's Q);
//     each stage completes on a "full" mbarrier and is handed back on an "empty" one. It
//     keeps 40 registers (setmaxnreg); the two consumer warpgroups take 232 each. When
//     192-row tiles fill the GPU, three consumers (32 / 160 registers) at D=64, and at D=128
//     from 2k keys: a consumer's softmax is latency-bound (without it the GEMMs and their
//     protocol reach the GPU's matmul rate), and a third warp per scheduler hides it
//     (D=64 +7–25%, D=128 +3–10%).
//   - Each consumer warpgroup owns 64 query rows of the tile. S = Q·Kᵀ is one chain of
//     wgmma with both operands in shared memory; the online softmax (exp2, scale folded into
//     one FFMA) runs on the accumulator registers; P stays in those registers, rounded to 16
//     bits, as the A operand of O += P·V (V read MN-major from shared memory). In fp16 at D=64
//     (three consumers) P·V is 8 columns wider, over a block of ones, and keeps the rows' sums:
//     no FADDs for them in the softmax, which bounds that kernel (+3% on average, up to +9%).
//   - Overlap inside a warpgroup: S of key tile n is issued together with P·V of tile n + 1,
//     and the softmax of tile n runs while that P·V is on the tensor cores. Between the
//     consumers, ping-pong: they take turns issuing GEMMs (named barriers), so one's softmax
//     hides under the others' GEMMs.
//   - Epilogue: O normalised in registers, written swizzled to shared memory (its own buffer,
//     or the consumer's rows of Q), stored by TMA (rows past the end are clipped); LSE from
//     registers.
//   - Persistent grid: one CTA per SM (non-causal over more tiles than SMs, as many as the rounds
//     need: D=64 S=512 +3%). Static rounds alternating direction, each tile worked out by the
//     producer and the consumers alike; causal: longest tiles first within sections of half a
//     round of heads (balanced loads, a head's K/V stays in L2), or, where those heads' K/V
//     outgrow half of L2, within sections of the heads that fit, taken from a counter as CTAs
//     come free, the producer handing each index to the consumers with its Q. The counter is
//     left at zero by each launch's last CTA, so eager launches on a stream share one and no
//     memset precedes them; those take every causal tile from it (D=128 S=512 +1.3%), and
//     non-causal tiles of at most 4 key tiles above D=64, on every SM (D=128 S=512 +2%).
//   - Few tiles (few heads, short queries): the two consumers share a 64-row tile (its Q loaded
//     as 64 rows), taking every other key tile, and the one done first hands its registers to
//     the other through shared memory (in the spare Q buffer where they fit, so without waiting
//     for the other to leave K/V: mission −1%). Many keys too: a cluster of 2–8 CTAs per
//     tile, each taking a share (≥ 4) of the key tiles; their unnormalised (O, max, sum) rows
//     meet through distributed shared memory and are merged in the same kernel (no second
//     launch, no memset).
//     Fewer still (over half the SMs idle, no split): kernels with one query row per thread,
//     each consumer's 64-row wgmma carrying 32 query rows (Q's 8-row groups read 512 bytes
//     apart, every other one padding), so twice the CTAs share the softmax (mission −15 to −20%),
//     with K loaded two key tiles ahead of V, the order the consumers' turns need them (−2%).
//   - Programmatic dependent launch: the next kernel in the stream may launch once every CTA
//     has set up its barriers, and each thread waits for the previous kernel before touching
//     global memory, so launches and set-up overlap the kernel before (mission 6.2 → 5.6 µs);
//     the first tile is planned before that wait, by the producer and the consumers (→ 5.1).
// Key tiles run last to first, so the masked tiles (causal diagonal, ragged end) come first
// and the rest pay no mask cost; where a consumer's rows see no further than the first half of
// that tile (a causal tile's first 64 rows), its S and softmax cover the half (causal S=512
// +2–4%). Each consumer walks only the key tiles its own rows reach (a
// causal tile's early rows reach fewer; rows past the last query none), passing the CTA's
// others without work. Bookkeeping kept off the critical path: tile indices divide by
// host-precomputed multipliers (FastDiv), each GEMM builds one wgmma descriptor per operand and
// steps it by constants, and shared memory is addressed as such (STS/ATOMS, not generic).
//
// Kernels (Config): D=64 with 128-key tiles and two or three consumers; D=80, 96 and 128 with
// 128-key tiles and two or three consumers (three: O, S and P do not fit side by side in 160
// registers, so each turn issues the last P·V, waits for it and issues S into P's registers;
// the output is staged in Q); at D=128 also 176-key tiles where rows see > 4k keys on average
// and 192-row tiles do not fill the GPU (fewer, longer iterations: +3–9% over two 128-key
// consumers there, but 4–6% below three; one Q buffer, so shorter launches lose more to each
// tile's wait for its store and next Q); D=160 and 256 with 80-key tiles (a 64×256 output
// takes 128 registers; 80 keys measured 6–9% over 64), two Q buffers at 160 and one at 256,
// without the few-tile modes (they spilled at 256). The two-consumer 128-key kernels at D=64 to
// 128 also come with one query row per thread, for launches that leave most SMs idle.
// D=80, 96 and 160 keep rows of whole 64-column chunks in shared memory (the last part zeros),
// but their Q·Kᵀ takes 5, 6 or 10 K steps and their P·V is as wide as the head dim: on the next
// wider kernel a quarter or more of the MMA work was padding (D=96 +6–21%, D=80 +11–20%, D=160
// +9–48% at 256–16k keys; 4 and 8 heads × 512 rows −11 to −18% time).
// Other head dims (32–256 in steps of 8) run the next wider kernel; TMA fills the columns past
// the head dim with zeros on loads and clips them on the output store. Rows narrower than a
// 64-column box land 2.3–4.9× slower by TMA (benchmarks/intake.cu), which bounds small launches
// below D=64.
// Limits: fp16/bf16; 16-byte aligned rows (TMA). Any S, Sq ≠ Sk, bottom-right causal, GQA/MQA
// by index, BHSD/BSHD strides, LSE, fully masked rows → 0.
// Measured (H100, two sweeps 2026-11-26 12:35, cuDNN in the same run): forward 1.014–1.26× cuDNN
// over the BENCH grid (D=64 non-causal 423–528 TFLOP/s, D=128 502–665), ≥ 1.0× at all 24 points
// in both (and in the four sweeps of the two builds before). Closest: D=128 non-causal S=512, at
// the GPU's ridge (256 FLOP per byte of HBM traffic, each tile's first Q·Kᵀ, last P·V and
// epilogue alone): by medians of 6 alternated repetitions 0.997–1.023 in 14 runs over five
// machine starts with tiles from the counter, 0.975–0.997 in twelve before (cuDNN's kernel there
// is the same design and takes the same cycles, ncu); D=128 causal 512 1.008–1.012;
// D=256 1.01–1.08× (run 06:55; small launches 1.04–1.29×); D=80, 96 and 160 1.10–1.34× (run
// 05:45, 1k–4k keys; small launches 1.35–2.0×); mission shape 3.89 / 3.89 µs against cuDNN's
// 9.21 / 9.57 (3.84–3.99 / 3.84–3.94 in the other runs of these kernels; what bounds it:
// docs/notes.md); few-tile long-key shapes 1.5–1.6× cuDNN. Without its softmax the steady loop
// reaches the GPU's matmul rate (~710 TFLOP/s).
// History: docs/notes.md.
#include <cudaTypedefs.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <type_traits>

#include "common.cuh"
#include "hopper_ptx.cuh"

namespace flashcore {
namespace {

using namespace sm90;

constexpr int kMmaM = 64;                      // the M of one wgmma: a consumer's rows of Q
constexpr int kMmaK = 16;                      // the K of one 16-bit wgmma
constexpr int kMaxSplits = 8;                  // CTAs of a split-KV cluster (portable maximum)
constexpr int kMinSplitKeyTiles = 4;           // key tiles each CTA of a split keeps, at least
constexpr int kSharedMemoryBytes = 227 * 1024;  // an H100 SM's shared memory per block

// One kernel: element type, head dim (64, 80, 96, 128, 160 or 256), consumer warpgroups (2, or 3
// when the tiles fill the GPU: more warps to hide each one's softmax latency), keys per K/V
// tile (128; 176 at D=128 over long keys with two consumers; 80 at D=160 and 256, where shared
// memory runs out)
// and query rows per thread: each thread holds two rows of its consumer's 64-row accumulators,
// or, in the kernels for launches that leave most SMs idle, one: the other is padding, so a
// consumer carries 32 query rows and twice the CTAs share the softmax.
template <typename T_, int kHeadDim_, int kConsumers_, int kBlockN_, int kThreadRows_ = 2>
struct Config {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_, kConsumers = kConsumers_, kBlockN = kBlockN_;
  static constexpr int kThreadRows = kThreadRows_;
  static constexpr int kConsumerRows = kThreadRows * kMmaM / 2;  // query rows per consumer
  static constexpr int kBlockM = kConsumers * kConsumerRows;       // query rows per tile
  static constexpr int kThreads = (1 + kConsumers) * kWarpgroupThreads;
  // Registers per thread after setmaxnreg. Warpgroups trade registers only within what the CTA
  // was launched with, its threads times the cap at entry (64K / threads, down to a multiple of
  // 8); asking for more waits forever (docs/notes.md: four consumers).
  static constexpr int kProducerRegisters = kConsumers == 2 ? 40 : 32;
  static constexpr int kConsumerRegisters = kConsumers == 2 ? 232 : 160;
  static_assert(kWarpgroupThreads * (kProducerRegisters + kConsumers * kConsumerRegisters) <=
                    65536 / kThreads / 8 * 8 * kThreads, "more registers than the CTA starts with");
  // A row in shared memory: whole 64-column chunks (128-byte swizzle rows); at D=80, 96 and 160
  // the last is part padding, zero-filled by TMA and skipped by the GEMMs.
  static constexpr int kChunks = ceil_div(kHeadDim, kChunkElems);
  static constexpr int kRowElems = kChunks * kChunkElems;
  static constexpr int kStages = kHeadDim <= 64 ? 4 : 2;
  // fp16 at D=64 with three consumers (launches whose tiles fill the GPU), where the softmax
  // bounds the kernel: P·V is 8 columns wider, over a block of ones in shared memory, so the
  // tensor cores keep each row's running sum of P in the last accumulator columns (the sum of
  // the very fp16 P that P·V multiplies), and the softmax has no FADDs or shuffles for it
  // (about +3% on the grid, −2.5 to +9%). Not in bf16, whose 8-bit P summed so moved the LSE
  // by up to 1.6e-3, nor in the small-launch kernels, where the wider P·V cost more (mission
  // +0.16 µs).
  static constexpr bool kSumsInPv = std::is_same_v<T, __half> && kHeadDim == 64 && kConsumers == 3;
  static constexpr int kOutRegs = kHeadDim / 2 + (kSumsInPv ? 4 : 0);  // a thread's P·V accumulator
  static constexpr int kOnesBytes = kSumsInPv ? kBlockN * kChunkElems * sizeof(T) : 0;
  // Q: two buffers (the next tile's Q loads while this one's finishes) where shared memory
  // holds them, else one. The output is staged in a buffer of its own where that fits too,
  // else in each consumer's own rows of the tile's Q, which then goes back only once the output
  // is stored (with one Q buffer, the next tile's Q loads after that). 1 KB: the barriers;
  // kOnesBytes: the block of ones below.
  static constexpr int kQBytes = kConsumers * kMmaM * kRowElems * sizeof(T);  // a Q buffer
  static constexpr int kKVBytes = 2 * kStages * kBlockN * kRowElems * sizeof(T);
  static constexpr int kQBuffers = 2 * kQBytes + kKVBytes + kOnesBytes + 1024 <= kSharedMemoryBytes ? 2 : 1;
  static constexpr bool kOwnOutput =
      (kQBuffers + 1) * kQBytes + kKVBytes + kOnesBytes + 1024 <= kSharedMemoryBytes;
  // Few tiles: consumers sharing rows, clusters splitting keys (two consumers, D ≤ 128; no
  // splits with one row per thread, which is for launches too short to split).
  static constexpr bool kFewTileModes = kConsumers == 2 && kHeadDim <= 128;
  static constexpr bool kSplitKeys = kFewTileModes && kThreadRows == 2;
  static constexpr int kScoreRegs = kBlockN / 2;  // a thread's share of a 64 × kBlockN S tile
  static constexpr int kPSteps = kBlockN / kMmaK;  // K steps of P·V
  // Three consumers above D=64: O, S and P do not fit side by side in 160 registers, so a turn
  // issues the previous key tile's P·V, waits for it, then issues S into P's registers (the
  // consumer's softmax hides under the other two's GEMMs rather than under its own P·V).
  static constexpr bool kPvBeforeS = kConsumers == 3 && kHeadDim > 64;
  // A consumer whose rows see only the first half of its first key tile (the causal diagonal
  // of a tile's first rows, a short ragged end) computes S and the softmax over that half
  // (not in the kPvBeforeS kernel: its 160 registers spill with the second prologue).
  static constexpr bool kHalfFirst = kBlockN == 128 && !kPvBeforeS;
};

template <class C>
struct SharedStorage {
  using T = typename C::T;
  static constexpr int kChunks = C::kChunks, kStages = C::kStages, kQBuffers = C::kQBuffers;
  static constexpr bool kOwnOutput = C::kOwnOutput;  // output staging of its own, or in Q
  // Q: the tile's rows one after another. With one row per thread, each consumer's wgmma reads
  // its 8-row groups 512 bytes apart (issue_qk), so every other group, the padding, overlaps
  // the next rows, and the last one up to 512 bytes past them: still in this buffer.
  T q[kQBuffers][kChunks][C::kConsumers * kMmaM * kChunkElems];
  T k[kStages][kChunks][C::kBlockN * kChunkElems];
  T v[kStages][kChunks][C::kBlockN * kChunkElems];
  std::conditional_t<kOwnOutput, T[C::kConsumers][kChunks][C::kConsumerRows * kChunkElems], char> o;
  int tile[kQBuffers];  // tiles from the counter: the one whose Q is in each buffer, with q_full
  uint64_t q_full[kQBuffers], q_empty[kQBuffers];
  uint64_t k_full[kStages], k_empty[kStages], v_full[kStages], v_empty[kStages];
  // C::kSumsInPv: a 64-column chunk of ones for every key of a tile, P·V's B past V's columns
  // (last, so that the other kernels' layout does not move).
  alignas(C::kSumsInPv ? kSwizzleAtomBytes : 1)
      std::conditional_t<C::kSumsInPv, T[C::kOnesBytes / sizeof(T)], char> ones;

  // Split keys, over buffers free by then. Cluster (over Q, K and V): the unnormalised results
  // of its CTAs for the rows this CTA merges (row j·R + r: CTA j's result for row r of this
  // CTA's share of R rows); rows padded by 8 floats so a warp's row-strided writes spread over
  // the banks. Shared rows: the accumulator registers (of its query rows) of the consumer that
  // finishes first, for the other; in the second Q buffer where they fit and no split comes
  // after (a CTA sharing rows has one tile, so that buffer never loads: they are written as
  // soon as that consumer is done), else over K and V once both consumers are done with those.
  struct Partial {
    float o[C::kBlockM][C::kHeadDim + 8];
    float max[C::kBlockM], sum[C::kBlockM];  // log2-scaled running max, full row sum
  };
  static constexpr int kOFragments = C::kHeadDim / 4 * C::kThreadRows;
  using Fragments = float[kOFragments + 4][kWarpgroupThreads];  // O, then max and sum of each row
  static constexpr bool kFragmentsInQ = !C::kSplitKeys && kQBuffers == 2 && sizeof(Fragments) <= sizeof(q[0]);
  static_assert(sizeof(Partial) <= sizeof(q) + sizeof(k) + sizeof(v) &&
                sizeof(Fragments) <= sizeof(k) + sizeof(v), "split-key results must fit");
  __device__ Partial& partial() { return *reinterpret_cast<Partial*>(q); }
  __device__ Fragments& fragments() {
    if constexpr (kFragmentsInQ) return *reinterpret_cast<Fragments*>(q[kQBuffers - 1]);
    else return *reinterpret_cast<Fragments*>(k);
  }
  // Chunk c of the output staging of a consumer's rows from `first_row` of Q buffer qb's tile.
  __device__ T* output(int qb, int first_row, int c) {
    if constexpr (kOwnOutput) return o[first_row / C::kConsumerRows][c];
    else return &q[qb][c][first_row * kChunkElems];
  }
};

struct TensorMaps {
  CUtensorMap q, k, v, o;
};

// How a launch's tiles (batch·head, query tile) map to CTAs. Persistent (splits = 1): one CTA
// per SM, taking one tile per round, or the next tile from a counter when it is free (causal
// where their K/V outgrow L2, and in eager launches causal and short non-causal tiles). Few
// tiles: the two consumers share 64-row tiles, each taking every other key tile; fewer still,
// a cluster of `splits` CTAs per tile, each taking a share of its key tiles. One tile per CTA
// in both.
struct Schedule {
  int tiles, m_blocks;
  FastDiv by_m_blocks, by_heads, by_group;  // m_blocks, heads_q, heads_q / heads_kv
  int tile_rows;                    // kBlockM, or kConsumerRows when the consumers share rows
  int splits_log2;                  // CTAs per tile (a cluster): 1 << splits_log2, 1: no split
  int section_heads, section_skew;  // causal order: heads per section, missing from the first
  FastDiv by_section_tiles, by_section_heads;  // section_heads · m_blocks, section_heads
  int* next_tile;  // dynamic scheduling: the next tile and the CTAs done, both zero; else null
};
// The few-tile modes (compiled out of the kernels without them).
template <class C> __device__ __forceinline__ bool shares_rows(const Schedule& w) {
  return C::kFewTileModes && w.tile_rows < C::kBlockM;
}
template <class C> __device__ __forceinline__ bool splits_keys(const Schedule& w) {
  return C::kSplitKeys && w.splits_log2 > 0;
}
// The tile a CTA (a cluster, in split-KV) takes in `round` of a static schedule: rounds
// alternate direction, so a CTA that took one of a round's longest tiles takes one of the
// next round's shortest.
__device__ __forceinline__ int tile_index(const Schedule& w, int round) {
  const int ctas = gridDim.x >> w.splits_log2, cta = blockIdx.x >> w.splits_log2;
  return round * ctas + (round % 2 ? ctas - 1 - cta : cta);
}
// The tiles in that order. Non-causal: one head's query tiles next to each other, so they
// share K/V in L2. Causal: within each section of heads, the longest tiles (last query rows)
// first. Static: a section is half a round, so with the alternating rounds every CTA gets the
// same mix of lengths, and a head's query tiles run at most a round apart (K/V still in L2).
// Dynamic: the same, or, where fewer heads' K/V fit in half of L2, a section is those heads; the
// first is then the short one, so the last tiles of all are a full section's shortest.
struct Tile {
  int batch, head, row;  // row: the tile's first query row
};
__device__ __forceinline__ Tile tile_at(const AttnParams& p, const Schedule& w, int index) {
  int bh = w.by_m_blocks.div(index), m_block = index - bh * w.m_blocks;
  if (p.causal) {
    const int section = w.by_section_tiles.div(index + w.section_skew * w.m_blocks);
    const int first = max(0, section * w.section_heads - w.section_skew);
    const int width = min((section + 1) * w.section_heads - w.section_skew, p.batch * p.heads_q) - first;
    const int r = index - first * w.m_blocks;
    int q;  // sections are section_heads wide, but the first with a skew and a short last one
    if (width == w.section_heads)
      q = w.by_section_heads.div(r);
    else
      q = r / width;
    bh = first + r - q * width;
    m_block = w.m_blocks - 1 - q;
  }
  const int batch = w.by_heads.div(bh);
  return {batch, bh - batch * p.heads_q, m_block * w.tile_rows};
}
// This CTA's rank in its split-KV cluster (0 without a split; splits are powers of two).
__device__ __forceinline__ int split_rank(const Schedule& w) { return blockIdx.x & ((1 << w.splits_log2) - 1); }
// Keys that query rows [first, first + rows) see: as far as their last valid row sees.
__device__ __forceinline__ int keys_seen(const AttnParams& p, int first, int rows) {
  return visible_keys(p, min(p.seqlen_q, first + rows) - 1);
}
// This CTA's key tiles [begin, end) of a query tile: those its rows reach, or the CTA's share
// of them in a split-KV cluster.
struct KeyRange {
  int begin, end;
};
template <int kBlockN>
__device__ __forceinline__ KeyRange key_range(const AttnParams& p, const Schedule& w, const Tile& t) {
  const int n = ceil_div(keys_seen(p, t.row, w.tile_rows), kBlockN);
  const int rank = split_rank(w);
  return {(rank * n) >> w.splits_log2, ((rank + 1) * n) >> w.splits_log2};
}
// Where the key tiles of a consumer's 64 rows from `first`, which see `own_keys` keys
// (keys_seen), end within the CTA's: below its end where they reach fewer (causal: a tile's
// later rows see further), at its beginning for rows past the last query.
template <int kBlockN>
__device__ __forceinline__ int own_key_end(const AttnParams& p, const KeyRange& keys, int first, int own_keys) {
  if (first >= p.seqlen_q) return keys.begin;
  return max(keys.begin, min(keys.end, ceil_div(own_keys, kBlockN)));
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
// Parity of the mbarrier phase that the `iter`-th use of a ring of `slots` buffers waits for.
__device__ __forceinline__ uint32_t ring_phase(int iter, int slots) {
  return uint32_t(iter / slots) & 1;
}
// Where row `q_row` of a tile's head goes in the (B, Hq, Sq) LSE output.
__device__ __forceinline__ int64_t lse_index(const AttnParams& p, const Tile& t, int q_row) {
  return (int64_t(t.batch) * p.heads_q + t.head) * p.seqlen_q + q_row;
}
// One arrival per consumer warp, after the warp's own wgmma reads of the stage are done.
__device__ __forceinline__ void warp_release(uint64_t* bar) {
  __syncwarp();
  if (threadIdx.x % 32 == 0) mbar_arrive(bar);
}

// The producer: one thread issues every TMA load of the CTA's tiles.
template <class C>
__device__ void produce(const AttnParams& p, const TensorMaps& maps, SharedStorage<C>& s,
                        const Schedule& w) {
  using Smem = SharedStorage<C>;
  constexpr uint32_t kKVBytes = sizeof(Smem::k[0]);
  const uint32_t q_bytes = w.tile_rows * C::kRowElems * sizeof(typename C::T);  // the tile's rows of Q
  int kv_iter = 0, index = tile_index(w, 0);
  for (int round = 0;; ++round) {
    // The tile goes to the consumers with its Q; past the last one, an arrival without Q.
    const int qb = round % Smem::kQBuffers;
    mbar_wait(&s.q_empty[qb], ring_phase(round, Smem::kQBuffers) ^ 1);
    // Tiles from the counter go to the consumers with their Q (atomic: see consume); static ones
    // the consumers work out themselves.
    if (w.next_tile) atomicExch(&s.tile[qb], index);
    if (index >= w.tiles) {
      // Past its last draw: the last CTA to get here leaves the counter at zero for the next
      // launch (see tile_counter), as no CTA draws again.
      if (w.next_tile && atomicAdd(w.next_tile + 1, 1) == int(gridDim.x) - 1) {
        w.next_tile[0] = 0;
        w.next_tile[1] = 0;
      }
      mbar_arrive(&s.q_full[qb]);
      return;
    }
    const Tile t = tile_at(p, w, index);
    const KeyRange keys = key_range<C::kBlockN>(p, w, t);
    const int head_kv = w.by_group.div(t.head);
    // The first tile's place is worked out from parameters alone while the previous kernel
    // may still run; global memory only after it has finished.
    if (round == 0) wait_for_previous_grid();
    // Asked for now, so the answer is back long before it is needed.
    const int next = w.next_tile ? gridDim.x + atomicAdd(w.next_tile, 1) : tile_index(w, round + 1);
    mbar_arrive_expect_tx(&s.q_full[qb], q_bytes);
#pragma unroll
    for (int c = 0; c < Smem::kChunks; ++c)
      tma_load(s.q[qb][c], &maps.q, &s.q_full[qb], c * kChunkElems, t.row, t.head, t.batch);
    // Key tile n = keys.end − 1 − i (the tile's i-th, last first) of K or V into its stage,
    // once the consumers have handed that stage back.
    const auto load = [&](bool is_k, int i) {
      const int iter = kv_iter + i, stage = iter % Smem::kStages;
      uint64_t* full = is_k ? &s.k_full[stage] : &s.v_full[stage];
      mbar_wait(is_k ? &s.k_empty[stage] : &s.v_empty[stage], ring_phase(iter, Smem::kStages) ^ 1);
      mbar_arrive_expect_tx(full, kKVBytes);
#pragma unroll
      for (int c = 0; c < Smem::kChunks; ++c)
        tma_load(is_k ? s.k[stage][c] : s.v[stage][c], is_k ? &maps.k : &maps.v, full,
                 c * kChunkElems, (keys.end - 1 - i) * C::kBlockN, head_kv, t.batch);
    };
    // In the order the consumers first need them: K then V of each key tile; but consumers
    // sharing rows take alternate key tiles, each turn a Q·Kᵀ with the P·V of the tile two
    // before, so in the one-row kernels, where the ring holds all the tile's key tiles, K runs
    // two tiles ahead of V (mission −2%; two rows per thread lost 2% at 16 causal heads).
    const int count = max(0, keys.end - keys.begin);
    const int lead = C::kThreadRows == 1 && shares_rows<C>(w) && count <= Smem::kStages ? 2 : 0;
    for (int i = 0; i < count + lead; ++i) {
      if (i < count) load(true, i);
      if (i >= lead) load(false, i - lead);
    }
    kv_iter += count;
    index = next;
  }
}

// ---- consumer pieces: one thread's share of a warpgroup's 64-row fragments ----------------
// Accumulator entry 4t + 2i + j of a thread sits at row `row + 8i` of the consumer's 64 and
// column 8t + `col` + j (hopper_ptx.cuh); i picks one of the thread's two rows, and only
// i < kThreadRows are query rows (the others, with one row per thread, padding).

// S = Q·Kᵀ for the consumer's rows from `first_row` and the stage's first 2 · kScoreRegs keys;
// asynchronous (committed). The wgmma's 64 rows are 8 groups of 8 (a warp's 16: two), each a
// 1 KB swizzle atom of Q; with one row per thread the groups are read 512 bytes apart, so the
// even ones are the query rows' atoms and the odd ones, padding, straddle two of them.
template <class C, int kScoreRegs>
__device__ __forceinline__ void issue_qk(float (&sc)[kScoreRegs], SharedStorage<C>& s, int qb,
                                         int stage, int first_row) {
  constexpr uint32_t kGroupBytes = kSwizzleAtomBytes * C::kThreadRows / 2;
  const uint64_t q = smem_desc(&s.q[qb][0][first_row * kChunkElems], 16, kGroupBytes);
  const uint64_t k = smem_desc(&s.k[stage][0][0], 16, kSwizzleAtomBytes);
#pragma unroll
  for (int kk = 0; kk < C::kHeadDim / kMmaK; ++kk) {
    // 4 K steps per 64-element chunk
    const uint32_t offset = (kk % 4) * kMmaK * sizeof(typename C::T), chunk = kk / 4;
    Wgmma<typename C::T>::ss(sc, desc_advance(q, chunk * sizeof(s.q[0][0]) + offset),
                             desc_advance(k, chunk * sizeof(s.k[0][0]) + offset), kk > 0);
  }
  wgmma_commit();
}

// O += P·V, P from registers, V MN-major (head dim contiguous); asynchronous (committed). With
// C::kSumsInPv the columns past V's are the block of ones: the descriptor's step between 64-column
// chunks is the way from the stage's V to it.
template <class C>
__device__ __forceinline__ void issue_pv(float (&o)[C::kOutRegs], const uint32_t (&pa)[C::kPSteps][4],
                                         SharedStorage<C>& s, int stage) {
  uint32_t chunk_bytes = C::kBlockN * kSwizzleBytes;  // between V's 64-column chunks
  if constexpr (C::kSumsInPv) chunk_bytes = smem_addr(s.ones) - smem_addr(&s.v[stage][0][0]);
  const uint64_t v = smem_desc(&s.v[stage][0][0], chunk_bytes, kSwizzleAtomBytes);
#pragma unroll
  for (int kk = 0; kk < C::kPSteps; ++kk)  // 16 rows of V (keys) per K step
    Wgmma<typename C::T>::rs(o, pa[kk], desc_advance(v, kk * kMmaK * kSwizzleBytes), true);
  wgmma_commit();
}

// Online softmax of one score tile, in place: masks keys at or past each row's limit (tiles
// that hold such keys only), raises the running maxima, and turns scores into unnormalised
// probabilities exp2(s·scale·log2e − max). Returns each row's correction for the output.
// Only the thread's first kRows rows (the query rows); the rows' sums too unless P·V keeps them.
template <int kRows, bool kSums, int kScoreRegs>
__device__ __forceinline__ void softmax_tile(float (&sc)[kScoreRegs], OnlineSoftmax (&row)[2],
                                             float (&correction)[2], bool masked, int first_key,
                                             const int (&limit)[2], float scale_log2) {
  if (masked) {
#pragma unroll
    for (int r = 0; r < kScoreRegs; ++r)
      if ((r / 2) % 2 < kRows && first_key + (r / 4) * 8 + r % 2 >= limit[(r / 2) % 2]) sc[r] = -INFINITY;
  }
  // Short dependency chains (4 partial maxima and 2 partial sums per row, both rows at once):
  // a warp's softmax is latency-bound, with one other consumer warp per scheduler to hide it.
  constexpr int kPairs = kScoreRegs / 4;  // a thread's (two-column) pairs in each of its rows
  float mx[2][4], shift[2], sum[2][2] = {};
#pragma unroll
  for (int i = 0; i < kRows; ++i)
#pragma unroll
    for (int t = 0; t < kPairs; ++t) {
      const float m = fmaxf(sc[4 * t + 2 * i], sc[4 * t + 2 * i + 1]);
      mx[i][t % 4] = t < 4 ? m : fmaxf(mx[i][t % 4], m);
    }
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const float m = quad_max(fmaxf(fmaxf(mx[i][0], mx[i][1]), fmaxf(mx[i][2], mx[i][3]))) * scale_log2;
    correction[i] = row[i].rescale(m);
    shift[i] = row[i].shift();
  }
#pragma unroll
  for (int t = 0; t < kPairs; ++t)
#pragma unroll
    for (int r = 0; r < 2 * kRows; ++r) {  // register 4t + r: row i = r / 2
      float& x = sc[4 * t + r];
      x = fast_exp2(fmaf(x, scale_log2, -shift[r / 2]));
      if constexpr (kSums) sum[r / 2][t % 2] += x;
    }
  if constexpr (kSums)
#pragma unroll
    for (int i = 0; i < kRows; ++i) row[i].sum += sum[i][0] + sum[i][1];  // the quad's add up at the end
}

// P rounded to 16 bits: the accumulator registers re-read as P·V's A fragments, no shuffles;
// P·V's K steps past the scores (keys not computed) and the padding rows get zeros. (Register j
// of a K step holds row i = j % 2.)
template <typename T, int kRows, int kScoreRegs, int kPSteps>
__device__ __forceinline__ void to_operand(const float (&sc)[kScoreRegs], uint32_t (&pa)[kPSteps][4]) {
  static_assert(kScoreRegs / 8 <= kPSteps);
#pragma unroll
  for (int kk = 0; kk < kPSteps; ++kk)
#pragma unroll
    for (int j = 0; j < 4; ++j)
      pa[kk][j] = kk < kScoreRegs / 8 && j % 2 < kRows ? pack2(T{}, sc[8 * kk + 2 * j], sc[8 * kk + 2 * j + 1]) : 0u;
}

// The thread's query rows of the output times their factors (padding rows are left as they are).
template <int kRows, int kRegs>
__device__ __forceinline__ void scale_rows(float (&o)[kRegs], const float (&factor)[2]) {
#pragma unroll
  for (int r = 0; r < kRegs; ++r)
    if ((r / 2) % 2 < kRows) o[r] *= factor[(r / 2) % 2];
}

// Ping-pong: the consumers take turns issuing their GEMMs (hardware barriers kTurn + c), so
// one's softmax runs while the other's GEMMs keep the tensor cores busy.
// Barrier 0 is __syncthreads, 1 + c consumer c's own; then one turn barrier per consumer, and
// the shared-rows merge (the consumer done first → the other).
template <int kConsumers> constexpr int kTurnBarrier = 1 + kConsumers;
template <int kConsumers> constexpr int kMergeBarrier = kTurnBarrier<kConsumers> + kConsumers;
template <int kConsumers>
__device__ __forceinline__ void wait_turn(int consumer) {
  named_barrier_sync(kTurnBarrier<kConsumers> + consumer, 2 * kWarpgroupThreads);
}
// The turn passes to the next consumer, c + 1 mod kConsumers: for two, 1 − c; for more, read
// from a table of 4-bit entries (ptxas serialises every wgmma, C7520, when the barrier id
// comes from `%`).
template <int kConsumers>
__device__ __forceinline__ int next_turn_barrier(int consumer) {
  if constexpr (kConsumers == 2) return kTurnBarrier<2> + 1 - consumer;
  constexpr unsigned kNext = [] {
    unsigned table = 0;
    for (int c = 0; c < kConsumers; ++c) table |= unsigned((c + 1) % kConsumers) << (4 * c);
    return table;
  }();
  return kTurnBarrier<kConsumers> + int((kNext >> (4 * consumer)) & 0xF);
}
__device__ __forceinline__ void pass_turn(int next_turn_barrier) {
  named_barrier_arrive(next_turn_barrier, 2 * kWarpgroupThreads);
}

// A consumer warpgroup: 64 query rows of each tile, from Q·Kᵀ to the stored output.
// Software-pipelined: the Q·Kᵀ of the next key tile is issued with the P·V of the current
// one, and the softmax of the next runs while that P·V is still on the tensor cores.
template <class C>
__device__ void consume(const AttnParams& p, const TensorMaps& maps, SharedStorage<C>& s,
                        const Schedule& w, int consumer) {
  using Smem = SharedStorage<C>;
  using T = typename C::T;
  constexpr int kHeadDim = C::kHeadDim, kConsumers = C::kConsumers, kBlockN = C::kBlockN;
  constexpr int kRows = C::kThreadRows;
  const int thread = threadIdx.x % kWarpgroupThreads;
  const int warp = thread / 32, lane = thread % 32;
  // Rows: this consumer's kConsumerRows of the tile, or all of them when the consumers share
  // them (and take every other key tile: consumer c the c-th from the end, then every
  // kConsumers-th).
  const bool shared = shares_rows<C>(w);
  const int first_row = shared ? 0 : consumer * C::kConsumerRows;
  const int row_in_tile = first_row + warp * 8 * kRows + lane / 4;  // the thread's row i = 0
  const int col = 2 * (lane % 4);
  const int step = shared ? kConsumers : 1, skip = shared ? consumer : 0;
  const int own_barrier = 1 + consumer, next_turn = next_turn_barrier<kConsumers>(consumer);
  if (consumer == kConsumers - 1) pass_turn(next_turn);  // consumer 0 goes first
  int kv_iter = 0;
  for (int round = 0;; ++round) {
    const int qb = round % Smem::kQBuffers;
    // The tile: in a static schedule (and the first of any) the producer's, tile_index(w,
    // round), which the bookkeeping below works out before its Q lands (the first while the
    // previous kernel may still run; D=128 S=512 +0.5%). Tiles taken from the counter come
    // with their Q, ordered by q_full (release/acquire), and read atomically as well so that
    // compute-sanitizer's racecheck, which does not follow mbarriers, sees no hazard; read by
    // one lane per warp (a warp's 32 atomics on one address run one after another).
    const bool known = round == 0 || w.next_tile == nullptr;
    if (!known) mbar_wait(&s.q_full[qb], ring_phase(round, Smem::kQBuffers));
    const int index = known ? tile_index(w, round)
                            : __shfl_sync(0xffffffff, lane == 0 ? atomicAdd(&s.tile[qb], 0) : 0, 0);
    if (index >= w.tiles) break;
    const Tile t = tile_at(p, w, index);
    const KeyRange keys = key_range<kBlockN>(p, w, t);
    const int own_keys = keys_seen(p, t.row + first_row, C::kConsumerRows);
    const int own_end = own_key_end<kBlockN>(p, keys, t.row + first_row, own_keys);
    // Key tiles at or past this index hold keys some of the consumer's rows must not see.
    const int first_masked = visible_keys(p, t.row + first_row) / kBlockN;
    int limit[2];
#pragma unroll
    for (int i = 0; i < kRows; ++i) limit[i] = visible_keys(p, t.row + row_in_tile + 8 * i);
    if (round == 0) wait_for_previous_grid();  // before the epilogue's stores, the first global access
    if (known) mbar_wait(&s.q_full[qb], ring_phase(round, Smem::kQBuffers));
    OnlineSoftmax row[2];
    float o[C::kOutRegs], sc[C::kScoreRegs], correction[2];
    uint32_t pa[C::kPSteps][4];
#pragma unroll
    for (int r = 0; r < C::kOutRegs; ++r) o[r] = 0.f;

    // This consumer's key tiles: n, n - step, … ≥ keys.begin, the kv-th loads of the ring on.
    int n = keys.end - 1 - skip, kv = kv_iter + skip, stage = kv % Smem::kStages;
    kv_iter += max(0, keys.end - keys.begin);
    // S of key tile n is in registers: hand its K stage back (and Q after the last, unless
    // the output is staged in it).
    const auto release_k = [&] {
      warp_release(&s.k_empty[stage]);
      if (Smem::kOwnOutput && n - step < keys.begin) warp_release(&s.q_empty[qb]);
    };
    // Output staged in Q: Q goes back once the output's store has read it (or was not needed).
    const auto release_q_late = [&] {
      if constexpr (!Smem::kOwnOutput) {
        if (thread == 0) tma_store_wait_read();
        named_barrier_sync(own_barrier, kWarpgroupThreads);
        warp_release(&s.q_empty[qb]);
      }
    };
    // The P·V reading stage `pv` is done: its registers are final, its V stage goes back.
    const auto finish_pv = [&](int pv) {
      wgmma_wait<0>();
      fence_registers(o);
#pragma unroll
      for (int kk = 0; kk < C::kPSteps; ++kk) fence_registers(pa[kk]);
      warp_release(&s.v_empty[pv]);
    };
    // The CTA's key tiles past the consumer's own: no work, but the turns go round as usual and
    // each stage goes back once it has landed (its arrival then counts for this use).
    for (; n >= own_end; n -= step, kv += step, stage = kv % Smem::kStages) {
      wait_turn<kConsumers>(consumer);
      pass_turn(next_turn);
      mbar_wait(&s.k_full[stage], ring_phase(kv, Smem::kStages));
      warp_release(&s.k_empty[stage]);
      mbar_wait(&s.v_full[stage], ring_phase(kv, Smem::kStages));
      warp_release(&s.v_empty[stage]);
    }
    if (n < keys.begin) {  // no keys of its own: the output rows are zeros
      if (own_end < keys.end) {  // it passed the CTA's: and the turn of their last P·V
        wait_turn<kConsumers>(consumer);
        pass_turn(next_turn);
      }
      if (Smem::kOwnOutput) warp_release(&s.q_empty[qb]);
    } else {
      // Prologue: S of the first key tile alone, over its first half where the rows see no
      // further (P's other half is then zero). Each width is a whole turn of its own: a wgmma
      // under a run-time condition inside a turn makes ptxas serialise every wgmma.
      const auto prologue = [&](auto& scores) {
        wait_turn<kConsumers>(consumer);
        mbar_wait(&s.k_full[stage], ring_phase(kv, Smem::kStages));
        wgmma_fence();
        issue_qk(scores, s, qb, stage, first_row);
        pass_turn(next_turn);
        wgmma_wait<0>();
        fence_registers(scores);
        release_k();
        softmax_tile<kRows, !C::kSumsInPv>(scores, row, correction, n >= first_masked, n * kBlockN + col, limit, p.scale_log2);
        to_operand<T, kRows>(scores, pa);
      };
      if (!(C::kHalfFirst && own_keys - n * kBlockN <= kBlockN / 2)) {
        prologue(sc);
      } else if constexpr (C::kHalfFirst) {
        float half_sc[C::kScoreRegs / 2];  // not sc's first half: ptxas then serialises wgmma (C7511)
        prologue(half_sc);
      }
      // Steady state: S of tile n and P·V of the previous one go to the tensor cores together;
      // the softmax of tile n runs while that P·V is still in flight.
      // (C::kPvBeforeS: that P·V first, done, then S.)
      for (n -= step; n >= keys.begin; n -= step) {
        const int pv_stage = stage, pv_kv = kv;
        kv += step;
        stage = kv % Smem::kStages;
        wait_turn<kConsumers>(consumer);
        if constexpr (C::kPvBeforeS) {
          mbar_wait(&s.v_full[pv_stage], ring_phase(pv_kv, Smem::kStages));
          scale_rows<kRows>(o, correction);
          fence_registers(o);
          wgmma_fence();
          issue_pv(o, pa, s, pv_stage);
          finish_pv(pv_stage);
        }
        mbar_wait(&s.k_full[stage], ring_phase(kv, Smem::kStages));
        fence_registers(o);
        wgmma_fence();
        issue_qk(sc, s, qb, stage, first_row);
        if constexpr (!C::kPvBeforeS) {
          mbar_wait(&s.v_full[pv_stage], ring_phase(pv_kv, Smem::kStages));
          issue_pv(o, pa, s, pv_stage);
        }
        pass_turn(next_turn);
        wgmma_wait<C::kPvBeforeS ? 0 : 1>();  // S done (two consumers: P·V may still run)
        fence_registers(sc);
        release_k();
        softmax_tile<kRows, !C::kSumsInPv>(sc, row, correction, n >= first_masked, n * kBlockN + col, limit, p.scale_log2);
        if constexpr (!C::kPvBeforeS) {
          finish_pv(pv_stage);
          scale_rows<kRows>(o, correction);
        }
        to_operand<T, kRows>(sc, pa);
      }
      // Epilogue of the loop: P·V of the last key tile.
      wait_turn<kConsumers>(consumer);
      mbar_wait(&s.v_full[stage], ring_phase(kv, Smem::kStages));
      if constexpr (C::kPvBeforeS) scale_rows<kRows>(o, correction);
      fence_registers(o);
      wgmma_fence();
      issue_pv(o, pa, s, stage);
      pass_turn(next_turn);
      finish_pv(stage);
    }
    // Sharing rows, the consumer with fewer key tiles takes empty turns at the end, so the two
    // keep alternating (at the start, its partner would wait, holding the turn, for a stage
    // only its next P·V frees: a deadlock with two stages). Turns: one per key tile, one for
    // the last P·V.
    if (shared) {
      const auto turns = [&](int c) {
        const int tiles = max(0, ceil_div(keys.end - keys.begin - c, kConsumers));
        return tiles > 0 ? tiles + 1 : 0;
      };
      for (int i = turns(consumer); i < turns(1 - consumer); ++i) {
        wait_turn<kConsumers>(consumer);
        pass_turn(next_turn);
      }
    }

#pragma unroll
    for (int i = 0; i < kRows; ++i) {  // C::kSumsInPv: P·V's columns of ones (row i: register 2i past O)
      if constexpr (C::kSumsInPv) row[i].sum = o[kHeadDim / 2 + 2 * i];
      else row[i].sum = quad_sum(row[i].sum);
    }
    // Sharing rows, the consumer that finishes first (under the turns consumer 0 when the tile
    // has an even number of key tiles, else consumer 1) leaves its results to the other, which
    // merges them register by register and stores the output.
    const int merger = 1 - (keys.end - keys.begin) % 2;
    if (shared) {
      // Fragment f of the query rows' output registers: register 4t + 2i + j, f = 2(kRows·t + i) + j.
      auto& frag = s.fragments();
      const auto o_fragment = [&](int r) -> float& { return frag[r / 4 * 2 * kRows + r % 4][thread]; };
      constexpr int kMax = Smem::kOFragments, kSum = kMax + 2;  // fragments of the rows' max, sum
      if constexpr (!Smem::kFragmentsInQ)
        named_barrier_sync(kMergeBarrier<kConsumers>, 2 * kWarpgroupThreads);  // both are done with K/V
      if (consumer != merger) {
#pragma unroll
        for (int r = 0; r < kHeadDim / 2; ++r)
          if ((r / 2) % 2 < kRows) o_fragment(r) = o[r];
#pragma unroll
        for (int i = 0; i < kRows; ++i) {
          frag[kMax + i][thread] = row[i].max;
          frag[kSum + i][thread] = row[i].sum;
        }
        named_barrier_arrive(kMergeBarrier<kConsumers>, 2 * kWarpgroupThreads);
      } else {
        named_barrier_sync(kMergeBarrier<kConsumers>, 2 * kWarpgroupThreads);
        float mine[2], theirs[2];
#pragma unroll
        for (int i = 0; i < kRows; ++i)
          row[i].merge({frag[kMax + i][thread], frag[kSum + i][thread]}, mine[i], theirs[i]);
#pragma unroll
        for (int r = 0; r < kHeadDim / 2; ++r)
          if ((r / 2) % 2 < kRows)
            o[r] = o[r] * mine[(r / 2) % 2] + o_fragment(r) * theirs[(r / 2) % 2];
      }
    }
    if (splits_keys<C>(w)) {  // cluster: send each row's result to the CTA merging it
      release_q_late();    // before the cluster barrier, which the producer joins once Q is back
      cluster_sync_relaxed();  // every CTA of the cluster is done with its Q and K/V stages
      if (!shared || consumer == merger) {
        auto& part = s.partial();
        const int rows = w.tile_rows >> w.splits_log2, rank = split_rank(w);
#pragma unroll
        for (int i = 0; i < kRows; ++i) {
          const int r = row_in_tile + 8 * i, owner = r / rows, slot = rank * rows + r % rows;
#pragma unroll
          for (int t = 0; t < kHeadDim / 8; ++t)
            st_cluster(cluster_addr(&part.o[slot][8 * t + col], owner), o[4 * t + 2 * i], o[4 * t + 2 * i + 1]);
          if (lane % 4 == 0) {
            st_cluster(cluster_addr(&part.max[slot], owner), row[i].max);
            st_cluster(cluster_addr(&part.sum[slot], owner), row[i].sum);
          }
        }
      }
      continue;  // one tile per CTA in this mode
    }
    if (shared && consumer != merger) {  // its results went to the other
      release_q_late();
      continue;
    }

    // Epilogue: O / sum → swizzled shared memory → TMA store; LSE from the quad leaders.
    float out_scale[2];
#pragma unroll
    for (int i = 0; i < kRows; ++i) out_scale[i] = row[i].output_scale();
    if (!Smem::kOwnOutput || round > 0) {  // a buffer of its own is free in the first round
      if (thread == 0) tma_store_wait_read();  // the previous tile's store has read its buffer
      named_barrier_sync(own_barrier, kWarpgroupThreads);
    }
#pragma unroll
    for (int r = 0; r < kHeadDim / 2; r += 2) {
      const int i = (r / 2) % 2, c = (r / 4) * 8 + col;
      if (i >= kRows) continue;
      char* chunk = reinterpret_cast<char*>(s.output(qb, first_row, c / kChunkElems));
      *reinterpret_cast<uint32_t*>(chunk + swizzled_offset(warp * 8 * kRows + lane / 4 + 8 * i, c % kChunkElems)) =
          pack2(T{}, o[r] * out_scale[i], o[r + 1] * out_scale[i]);
    }
    fence_async_shared();
    named_barrier_sync(own_barrier, kWarpgroupThreads);
    if (thread == 0) {
#pragma unroll
      for (int c = 0; c < Smem::kChunks; ++c)
        tma_store(&maps.o, s.output(qb, first_row, c), c * kChunkElems, t.row + first_row, t.head, t.batch);
      tma_store_commit();
    }
    release_q_late();
    if (p.lse && lane % 4 == 0) {
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int q_row = t.row + row_in_tile + 8 * i;
        if (q_row < p.seqlen_q)
          p.lse[lse_index(p, t, q_row)] = row[i].lse();
      }
    }
  }
  if (thread == 0) tma_store_wait_read();  // shared memory must outlive the last store's reads
}

// Split-KV epilogue, after a cluster barrier: this CTA's R = tile rows / splits rows (R·rank
// onwards), merged from the results the cluster's CTAs stored here, and written out. One thread
// per 4 columns of a row; `thread` counts the consumers' threads.
template <class C>
__device__ void combine(const AttnParams& p, const Schedule& w, SharedStorage<C>& s, int thread) {
  using T = typename C::T;
  constexpr int kRowThreads = C::kRowElems / 4, kRowsPerPass = C::kConsumers * kWarpgroupThreads / kRowThreads;
  const Tile t = tile_at(p, w, tile_index(w, 0));
  const int rows = w.tile_rows >> w.splits_log2, col = thread % kRowThreads * 4;
  const auto& part = s.partial();
  if (col >= p.head_dim) return;  // the kernel's padding columns (head dim below kHeadDim)
  for (int r = thread / kRowThreads; r < rows; r += kRowsPerPass) {
    const int q_row = t.row + split_rank(w) * rows + r;
    if (q_row >= p.seqlen_q) break;
    // Merge the CTAs' (max, sum, O) one at a time, as the online softmax merges key tiles.
    OnlineSoftmax merged;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int slot = r; slot < w.tile_rows; slot += rows) {
      float mine, theirs;
      merged.merge({part.max[slot], part.sum[slot]}, mine, theirs);
      const float4 o_j = *reinterpret_cast<const float4*>(&part.o[slot][col]);
      acc = make_float4(acc.x * mine + o_j.x * theirs, acc.y * mine + o_j.y * theirs,
                        acc.z * mine + o_j.z * theirs, acc.w * mine + o_j.w * theirs);
    }
    const float scale = merged.output_scale();
    T* out = static_cast<T*>(p.o) + t.batch * p.o_stride[0] + t.head * p.o_stride[1] +
             q_row * p.o_stride[2] + col;
    *reinterpret_cast<uint2*>(out) =
        make_uint2(pack2(T{}, acc.x * scale, acc.y * scale), pack2(T{}, acc.z * scale, acc.w * scale));
    if (p.lse && col == 0)
      p.lse[lse_index(p, t, q_row)] = merged.lse();
  }
}

template <class C>
__global__ void __launch_bounds__(C::kThreads, 1)
    hopper_kernel(const AttnParams p, const __grid_constant__ TensorMaps maps, const Schedule w) {
  using Smem = SharedStorage<C>;
  // 1 KB-aligned (swizzle atoms), and used as declared: through an integer cast (to align it
  // by hand) the compiler loses the address space, and every access to s becomes a generic
  // load, store or GPU-scope atomic.
  extern __shared__ __align__(kSwizzleAtomBytes) char smem_raw[];
  Smem& s = *reinterpret_cast<Smem*>(smem_raw);
  const int role = warpgroup_index();
  if (threadIdx.x == 0) {
    constexpr int kConsumerWarps = C::kConsumers * kWarpgroupThreads / 32;
    const int kv_readers = shares_rows<C>(w) ? kConsumerWarps / C::kConsumers : kConsumerWarps;
    for (int i = 0; i < Smem::kQBuffers; ++i) {
      mbar_init(&s.q_full[i], 1);
      mbar_init(&s.q_empty[i], kConsumerWarps);
    }
    for (int i = 0; i < Smem::kStages; ++i) {
      mbar_init(&s.k_full[i], 1);
      mbar_init(&s.v_full[i], 1);
      mbar_init(&s.k_empty[i], kv_readers);
      mbar_init(&s.v_empty[i], kv_readers);
    }
    mbar_init_fence();
  }
  if constexpr (C::kSumsInPv) {  // P·V's block of ones, read by the wgmmas (the async proxy)
    const uint32_t ones = pack2(typename C::T{}, 1.f, 1.f);
    for (int i = threadIdx.x; i < int(sizeof(s.ones) / sizeof(uint4)); i += blockDim.x)
      reinterpret_cast<uint4*>(s.ones)[i] = make_uint4(ones, ones, ones, ones);
    fence_async_shared();
  }
  __syncthreads();
  allow_dependents_to_launch();  // they launch once every CTA of this one has got here
  if (role == 0) {
    regs_shrink_to<C::kProducerRegisters>();
    if (threadIdx.x == 0) {
      tma_prefetch_map(&maps.q);
      tma_prefetch_map(&maps.k);
      tma_prefetch_map(&maps.v);
      tma_prefetch_map(&maps.o);
      produce(p, maps, s, w);  // waits for the previous kernel before its first load
    }
  } else {
    regs_grow_to<C::kConsumerRegisters>();
    consume(p, maps, s, w, role - 1);  // waits for the previous kernel once its first tile is planned
  }
  if (splits_keys<C>(w)) {  // the consumers sent their results (two barriers)
    if (role == 0) cluster_sync_relaxed();
    cluster_sync();
    if (role > 0) combine(p, w, s, threadIdx.x - kWarpgroupThreads);
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
// boxes of 64 columns × `box_rows` rows, 128-byte swizzled. Columns past `dim` (the kernel's
// padding) load as zeros and are not stored.
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

// A launch with clusters of `splits` CTAs (1: no cluster).
template <class C>
struct ClusterLaunch {
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute attrs[2];
  ClusterLaunch(int ctas, int splits, int smem_bytes, cudaStream_t stream) {
    config.gridDim = dim3(ctas);
    config.blockDim = dim3(C::kThreads);
    config.dynamicSmemBytes = smem_bytes;
    config.stream = stream;
    attrs[0].id = cudaLaunchAttributeClusterDimension;
    attrs[0].val.clusterDim.x = splits;
    attrs[0].val.clusterDim.y = attrs[0].val.clusterDim.z = 1;
    // Programmatic dependent launch: the kernel may start while the previous one in the stream
    // ends; it waits for it (griddepcontrol.wait) before touching global memory.
    attrs[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[1].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attrs;
    config.numAttrs = 2;
  }
  ClusterLaunch(const ClusterLaunch&) = delete;  // config points into it
};

// Clusters of `splits` CTAs the GPU runs at once: fewer than SMs / splits, as a cluster's CTAs
// must share one GPC (on an H100 with this kernel's 1 CTA per SM: 30 clusters of 4, not 33).
template <class C>
int max_active_clusters(int splits, int smem_bytes, int device) {
  static int known[64][kMaxSplits + 1];  // per device and width: count + 1, 0 = not asked yet
  int& entry = known[device % 64][splits];
  if (entry == 0) {
    const ClusterLaunch<C> launch(splits, splits, smem_bytes, nullptr);
    cudaLaunchConfig_t config = launch.config;
    config.numAttrs = 1;  // the cluster shape only
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, hopper_kernel<C>, &config) != cudaSuccess)
      clusters = 0;
    entry = clusters + 1;
  }
  return entry - 1;
}

// Whether launches on `stream` share its tile counter: not while it is being captured (the graph
// may replay on any stream, beside eager launches), nor on the per-thread default stream (one
// handle, a stream per thread).
bool counter_per_stream(cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  return stream != cudaStreamPerThread && cudaStreamIsCapturing(stream, &capture) == cudaSuccess &&
         capture == cudaStreamCaptureStatusNone;
}

// The counter a dynamic launch draws its tiles from, at zero, and left at zero by the launch's
// last CTA. Eager launches share one per device and stream (8 bytes, kept for the process's
// life), zeroed once: their stream runs them one after another, each drawing only once the
// previous kernel has ended (griddepcontrol.wait), so no memset comes before the kernel. Other
// launches get one of their own, zeroed in stream order; `own` returns it, to be freed after
// the launch. `shared`: counter_per_stream(stream).
cudaError_t tile_counter(int device, cudaStream_t stream, bool shared, int** counter, int** own) {
  cudaError_t s;
  static std::mutex mutex;
  static std::map<std::pair<int, cudaStream_t>, int*> counters;
  std::unique_lock<std::mutex> lock(mutex, std::defer_lock);
  if (shared) {
    lock.lock();
    const auto found = counters.find({device, stream});
    if (found != counters.end()) {
      *counter = found->second;
      return cudaSuccess;
    }
  }
  if ((s = cudaMallocAsync(counter, 2 * sizeof(int), stream)) != cudaSuccess) return s;
  if ((s = cudaMemsetAsync(*counter, 0, 2 * sizeof(int), stream)) != cudaSuccess) {
    cudaFreeAsync(*counter, stream);
    return s;
  }
  if (shared)
    counters[{device, stream}] = *counter;
  else
    *own = *counter;
  return cudaSuccess;
}

// A launch's schedule, its CTAs (times splits), whether it hands tiles out dynamically, and
// whether its stream's counter may serve (counter_per_stream; asked only where it decides).
struct Plan {
  Schedule w;
  int ctas;
  bool dynamic, per_stream;
};
template <class C>
Plan plan(const AttnParams& p, int device, int sms, int smem_bytes, cudaStream_t stream) {
  Schedule w{};
  const int heads = p.batch * p.heads_q, key_tiles = ceil_div(p.seqlen_k, C::kBlockN);
  // Few tiles: 64-row tiles, with the consumers sharing rows and splitting keys, if they fit in
  // one wave and each consumer keeps two K/V stages in flight (or the ring holds every key
  // tile): with one, each key tile waits for its own load (B=1 H=1 S=8k D=128: 95 µs, against
  // 64 split over clusters). Otherwise, or also, each tile's keys split over a cluster of CTAs,
  // as wide as still runs in one wave and leaves every consumer enough key tiles to pay for the
  // merge.
  constexpr int kConsumers = C::kConsumers, kStages = C::kStages;
  const bool shared = C::kFewTileModes && (kStages >= 2 * kConsumers || key_tiles <= kStages) &&
                      key_tiles >= kConsumers &&
                      heads * ceil_div(p.seqlen_q, C::kConsumerRows) <= sms;
  w.tile_rows = shared ? C::kConsumerRows : C::kBlockM;
  w.m_blocks = ceil_div(p.seqlen_q, w.tile_rows);
  w.by_m_blocks = FastDiv(w.m_blocks);
  w.by_heads = FastDiv(p.heads_q);
  w.by_group = FastDiv(p.heads_q / p.heads_kv);
  w.tiles = heads * w.m_blocks;
  const int sharing = shared ? kConsumers : 1;
  for (int log2 = 1; C::kSplitKeys && (1 << log2) <= kMaxSplits &&
                     key_tiles >= (sharing << log2) * kMinSplitKeyTiles;
       ++log2)
    if (w.tiles <= max_active_clusters<C>(1 << log2, smem_bytes, device)) w.splits_log2 = log2;
  const int splits = 1 << w.splits_log2;
  // Non-causal over more tiles than SMs, as many CTAs as the rounds need (no part-empty last
  // round): the same rounds, each CTA reading HBM beside fewer others. Causal keeps every SM,
  // which takes up the tiles' unequal lengths (−0.5 to −2.8% without; docs/notes.md). So do
  // tiles of at most 4 key tiles in the two-consumer kernels above D=64, taking tiles from the
  // counter as they come free, where it is their stream's (S=512 D=80, 96, 128 +2–3%, S=320
  // D=160 +5%, D=256 ±0; with a memset before each kernel, in graphs, D=96 −5%).
  const bool short_shape = !p.causal && splits == 1 && w.tiles > sms && key_tiles <= 4 &&
                           C::kHeadDim > 64 && kConsumers == 2;
  const bool per_stream = (short_shape || (p.causal && splits == 1 && w.tiles > sms)) &&
                          counter_per_stream(stream);
  const bool short_tiles = short_shape && per_stream;
  const int ctas = splits > 1                ? w.tiles
                   : p.causal || short_tiles ? std::min(w.tiles, sms)
                                             : ceil_div(w.tiles, ceil_div(w.tiles, sms));
  // Causal sections (see tile_at): half a round of heads, unless their K/V would outgrow half
  // of L2; then sections of the heads that fit, handed out dynamically. So are the half-round
  // sections where the counter is the stream's (eager): D=128 S=512 +1.3%, D=64 512 and 1k ±0.
  w.section_heads = std::max(1, ctas / 2);
  bool dynamic = short_tiles;
  if (p.causal && w.tiles > ctas) {
    int l2_bytes = 0;
    cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device);
    const int64_t kv_bytes = std::max<int64_t>(  // K and V of one query head's share
        1, int64_t(2) * p.seqlen_k * C::kHeadDim * sizeof(typename C::T) * p.heads_kv / p.heads_q);
    const int fit = int(std::clamp<int64_t>(l2_bytes / 2 / kv_bytes, 1, heads));
    if (fit < w.section_heads) {
      w.section_heads = fit;
      w.section_skew = (fit - heads % fit) % fit;
      dynamic = true;
    }
    dynamic = dynamic || per_stream;
  }
  w.by_section_heads = FastDiv(w.section_heads);
  w.by_section_tiles = FastDiv(w.section_heads * w.m_blocks);
  return {w, ctas, dynamic, per_stream};
}

template <class C>
cudaError_t launch(const AttnParams& p, cudaStream_t stream, int device, int sms) {
  constexpr int kSmemBytes = sizeof(SharedStorage<C>);
  static_assert(kSmemBytes <= kSharedMemoryBytes, "over an H100 SM's shared memory per block");
  const cudaError_t status = allow_shared_memory<hopper_kernel<C>>(kSmemBytes, device);
  if (status != cudaSuccess) return status;

  auto [w, ctas, dynamic, per_stream] = plan<C>(p, device, sms, kSmemBytes, stream);
  // A launch that leaves over half the SMs idle without splitting keys runs on the kernel with
  // one query row per thread: twice the CTAs, each thread with half the softmax (mission shape
  // −15 to −20%). Not the 176-key kernel (it runs over > 4k keys, where such launches split),
  // nor head dims below 64 (the D=64 kernel on zero-padded columns), where it measured +5 to
  // +29% at 8 heads × 512 rows (D = 32–56): there TMA lands the narrow rows 2.3–4.9× slower, and
  // twice the CTAs load them (docs/notes.md).
  if constexpr (C::kSplitKeys && C::kBlockN == 128)
    if (w.splits_log2 == 0 && 2 * ctas <= sms && (C::kHeadDim > 64 || p.head_dim == 64))
      return launch<Config<typename C::T, C::kHeadDim, C::kConsumers, C::kBlockN, 1>>(p, stream, device, sms);
  TensorMaps maps;  // Q in boxes of a tile's rows (kConsumerRows where the consumers share them)
  const bool ok =
      make_map(&maps.q, p.q, p.dtype, p.head_dim, p.seqlen_q, p.heads_q, p.batch, p.q_stride, w.tile_rows) &&
      make_map(&maps.k, p.k, p.dtype, p.head_dim, p.seqlen_k, p.heads_kv, p.batch, p.k_stride, C::kBlockN) &&
      make_map(&maps.v, p.v, p.dtype, p.head_dim, p.seqlen_k, p.heads_kv, p.batch, p.v_stride, C::kBlockN) &&
      make_map(&maps.o, p.o, p.dtype, p.head_dim, p.seqlen_q, p.heads_q, p.batch, p.o_stride,
               C::kConsumerRows);
  if (!ok) return cudaErrorInvalidValue;
  int* own_counter = nullptr;
  if (dynamic) {
    const cudaError_t s = tile_counter(device, stream, per_stream, &w.next_tile, &own_counter);
    if (s != cudaSuccess) return s;
  }
  const int splits = 1 << w.splits_log2;
  const ClusterLaunch<C> launch(ctas * splits, splits, kSmemBytes, stream);
  const cudaError_t launched = cudaLaunchKernelEx(&launch.config, hopper_kernel<C>, p, maps, w);
  if (own_counter) {
    const cudaError_t freed = cudaFreeAsync(own_counter, stream);
    if (launched == cudaSuccess) return freed;
  }
  return launched;
}

// The head dims with kernels of their own, ascending; any other runs the next wider kernel.
template <int... kDims>
struct KernelHeadDims {
  static int covering(int head_dim) {
    int dim = 0;
    (void)((head_dim <= kDims && (dim = kDims, true)) || ...);
    return dim;
  }
  template <class Launch>
  static cudaError_t dispatch(const AttnParams& p, Launch&& launch) {
    return flashcore::dispatch<kDims...>(p, launch);
  }
};
using HopperHeadDims = KernelHeadDims<64, 80, 96, 128, 160, 256>;

}  // namespace

cudaError_t hopper_forward(const AttnParams& p, cudaStream_t stream) {
  if (p.head_dim < 32 || p.head_dim > 256 || p.head_dim % 8) return cudaErrorInvalidValue;
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  AttnParams kernel_dims = p;  // the kernel whose head dim covers p's, zero-padded by TMA
  kernel_dims.head_dim = HopperHeadDims::covering(p.head_dim);
  // Three consumers (192-row tiles) once those tiles fill the GPU: at D=64 (+7–25%; causal under
  // 2k keys +8–15% since each consumer walks only the key tiles its rows reach), and at D=80 to
  // 128 from 2k keys (D=128 +3–10% at 2k–8k, and +4–6% at 8k–16k over the 176-key tiles below;
  // at 1k −3 to +1%, at 512 the 192-row tiles' padding loses; D=96 +4–10% at 2k–16k, D=80
  // +10–15% at 4k).
  const bool three = int64_t(p.batch) * p.heads_q * ceil_div(p.seqlen_q, 3 * kMmaM) >= sms &&
                     (kernel_dims.head_dim == 64 || (kernel_dims.head_dim <= 128 && p.seqlen_k >= 2048));
  // Else, 176-key tiles at D=128 where a query row sees over 4k keys on average (+3–9% over two
  // consumers with 128-key tiles); not below, where each tile's wait for its output store and
  // next Q (one Q buffer) costs more (up to −14% at 512 keys; docs/notes.md).
  const bool wide = !three && kernel_dims.head_dim == 128 &&
                    p.seqlen_k - (p.causal ? p.seqlen_q / 2 : 0) > 4096;
  return HopperHeadDims::dispatch(kernel_dims, [&](auto tag) {
    using T = typename decltype(tag)::Elem;
    constexpr int kHeadDim = decltype(tag)::kHeadDim;
    if constexpr (kHeadDim == 128)
      if (wide) return launch<Config<T, 128, 2, 176>>(p, stream, device, sms);
    if constexpr (kHeadDim <= 128)
      if (three) return launch<Config<T, kHeadDim, 3, 128>>(p, stream, device, sms);
    return launch<Config<T, kHeadDim, 2, (kHeadDim > 128 ? 80 : 128)>>(p, stream, device, sms);
  });
}

}  // namespace flashcore
