#!/bin/bash
# S2 quality (issue #8 item 5): the tiny model trained from scratch on passkey at 256 tokens,
# 8x the S2 local window (2 blocks x 16 tokens), dense vs s2, the same recipe and budget
# (6000 steps x 16 sequences, lr 2e-3, linear cool-down over the last 3000). One GPU; all
# runs side by side. Usage: bash benchmarks/quality/s2_passkey.sh [OUTDIR]
set -u
out=${1:-/tmp/s2_passkey}
mkdir -p "$out"
S='"block_size":16,"local_blocks":2,"vert_stride":4'
M='"max_position_embeddings":256'
while read -r name model attn seed; do
  python3 benchmarks/quality/passkey_train.py --backend nccl --steps 6000 --batch 16 --lr 2e-3 \
    --aw 10 --every 1000 --warmup 20 --cooldown 3000 --seed "$seed" --model "$model" \
    --attention "$attn" --eval 256 > "$out/$name.log" 2>&1 &
done <<LIST
dense-s0 {$M} {} 0
dense-s1 {$M} {} 1
s2-all-sparse-4h-s0 {$M} {"backend":"s2","s2":{$S,"dense_first":0,"dense_every":0}} 0
s2-all-sparse-8h-s1 {$M,"num_heads":8,"num_kv_heads":4} {"backend":"s2","s2":{$S,"dense_first":0,"dense_every":0}} 1
s2-hybrid-s0 {$M} {"backend":"s2","s2":{$S}} 0
s2-hybrid-s1 {$M} {"backend":"s2","s2":{$S}} 1
LIST
wait
for f in "$out"/*.log; do echo "== $f"; grep -E "^step|Error" "$f" | tail -6; done
