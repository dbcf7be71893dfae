"""Runs one rung on a few shapes that cover its code paths, for compute-sanitizer:
    compute-sanitizer --tool memcheck  python3 scripts/sanitize.py hopper
    compute-sanitizer --tool racecheck python3 scripts/sanitize.py hopper
Shapes (B, Hq, Hkv, Sq, Sk, D): the mission shape (one query row per thread, 32-row tiles whose
consumers share rows, merging in shared memory), the same with 16 heads (two rows per thread) and
at D=128 (one row per thread, 64-row tiles) and D=80; few query tiles against many keys
(split-KV clusters merging through distributed shared memory, GQA, Sq ≠ Sk), also at D=88 (the
D=96 kernel, its last 8 columns zero-padded); a persistent grid walking several tiles per CTA,
at D=40 (three consumers: 192-row tiles fill the GPU; fp16, so P·V keeps the row sums); one
whose causal tiles are handed out dynamically, and non-causal D=128 tiles of 4 key tiles, more
than SMs, taken from a counter too (a stream's eager launches share one, each leaving it at
zero); D=256 and 160 over several tiles per CTA (each output staged in its tile's Q buffer; at
D=160 one of two); D=128 with 176-key tiles over 8k keys (the same staging, and its split-KV
cluster); query rows that end inside a tile, so that one consumer has no rows of its own there
(it passes its turns and hands the stages back); and D=128 and 96 with three consumers (each
turn's P·V waited for before its S; output staged in Q)."""

import sys

import torch

import flashcore

SHAPES = [(1, 8, 8, 512, 512, 64), (1, 16, 16, 512, 512, 64), (1, 8, 8, 512, 512, 128),
          (1, 8, 8, 512, 512, 80), (1, 2, 1, 200, 4000, 128), (1, 2, 1, 200, 4000, 88),
          (2, 24, 4, 520, 640, 40), (1, 60, 60, 300, 1024, 128), (1, 36, 36, 512, 512, 128),
          (2, 40, 8, 520, 700, 256), (1, 4, 2, 300, 8200, 128), (1, 40, 8, 1050, 600, 128),
          (1, 48, 12, 400, 2100, 128), (1, 48, 12, 400, 2100, 96), (1, 24, 8, 520, 700, 160)]

rung = sys.argv[1] if len(sys.argv) > 1 else "hopper"
for batch, heads_q, heads_kv, seqlen_q, seqlen_k, dim in SHAPES:
    for causal in (False, True):
        q = torch.randn(batch, heads_q, seqlen_q, dim, device="cuda", dtype=torch.float16)
        k, v = (torch.randn(batch, heads_kv, seqlen_k, dim, device="cuda", dtype=torch.float16)
                for _ in range(2))
        out, lse = flashcore.attention(q, k, v, causal=causal, backend=rung, return_lse=True)
        torch.cuda.synchronize()
        assert out.isfinite().all(), (batch, heads_q, seqlen_q, seqlen_k, dim, causal)
print(f"{rung}: {2 * len(SHAPES)} calls done")
