#!/usr/bin/env bash
# The recipe of the shipped Fashion-MNIST models (src/scalegen/assets/fashion_mnist/RECIPE.md says why each choice):
# a multi-scale VQ tokenizer, then a DiT in its latent space and a VAR on its tokens, trained side by side with one
# CPU thread each, then exported (last-step weights, fp16) into the package and their curves plotted.
#
# Usage: scripts/train_fashion_mnist.sh [RUNS_FOLDER]   (default runs/fashion_mnist; re-running resumes)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/fashion_mnist}
SHIPPED=src/scalegen/assets/fashion_mnist
SCALEGEN=".venv/bin/python -m scalegen"

$SCALEGEN train vqvae --data fashion-mnist --image-size 32 --patch-nums 1,2,3,4,6,8 --ch 16 --ch-mult 1,2,2 \
  --num-res-blocks 1 --norm-groups 8 --no-attention --vocab-size 256 --z-channels 8 \
  --batch-size 64 --lr 1e-3 --lr-decay-to 0.1 --dead-code-every 100 --steps 2500 \
  --checkpoint-every 250 --log-every 25 --out "$RUNS/tokenizer"

export OMP_NUM_THREADS=1  # the two trainings below share the machine, one thread each: matched compute
$SCALEGEN train dit --tokenizer "$RUNS/tokenizer" --data fashion-mnist --image-size 32 \
  --model DiT-S/2 --depth 6 --hidden-size 192 --num-heads 3 --latent-cache \
  --batch-size 128 --lr 6e-4 --warmup-steps 200 --grad-clip 1.0 --ema 0.999 --lr-decay-to 0.1 --steps 6000 \
  --checkpoint-every 250 --log-every 25 --sample-steps 50 --out "$RUNS/dit" &
dit=$!
$SCALEGEN train var --tokenizer "$RUNS/tokenizer" --data fashion-mnist \
  --depth 6 --width 128 --num-heads 4 --token-cache \
  --batch-size 64 --lr 1e-3 --ema 0.995 --steps 2100 \
  --checkpoint-every 250 --log-every 25 --out "$RUNS/var" &
var=$!
wait "$dit"  # each wait fails the script when its training failed
wait "$var"
unset OMP_NUM_THREADS

$SCALEGEN export --run "$RUNS/dit" --out "$SHIPPED/dit" --weights raw  # raw beat the EMA weights (RECIPE.md)
$SCALEGEN export --run "$RUNS/var" --out "$SHIPPED/var" --weights raw
.venv/bin/python scripts/plot_curves.py "$RUNS" "$SHIPPED/curves.png"
