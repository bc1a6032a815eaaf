#!/usr/bin/env bash
# The recipe of the shipped Fashion-MNIST models (src/scalegen/assets/fashion_mnist/RECIPE.md says why each choice):
# the DiT (flow matching + REPA) models the latents of a small KL tokenizer aligned with REPA's encoder (VA-VAE; both
# trained on a 2-core CPU), the one-step DiT those of the earlier multi-scale VQ tokenizer; the VAR predicts the tokens of a second, finer tokenizer trained with a patch GAN (both trained on one H100:
# minutes there, hours on a CPU). Then both are exported into the package (fp16: the DiT's EMA, the VAR's last-step
# weights) and their curves plotted.
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

# The earlier DiT (on the VQ tokenizer above): flow matching with logit-normal t and REPA (block 2 aligned with a
# small encoder of our own, not the classifier that scores FID). The one-step DiT below starts from it.
$SCALEGEN train classifier --width 16 --feature-dim 64 --steps 600 --seed 1 --out "$RUNS/encoder" \
  --export "$RUNS/encoder.safetensors"
$SCALEGEN train dit --tokenizer "$RUNS/tokenizer" --data fashion-mnist --image-size 32 \
  --model DiT-S/2 --depth 6 --hidden-size 192 --num-heads 3 --latent-cache \
  --batch-size 128 --lr 6e-4 --warmup-steps 200 --grad-clip 1.0 --ema 0.999 --lr-decay-to 0.1 --steps 6000 \
  --objective flow --t-sampling logit-normal --repa-encoder "$RUNS/encoder.safetensors" --repa-depth 2 \
  --checkpoint-every 500 --log-every 25 --sample-steps 25 --out "$RUNS/dit"

# The shipped DiT's tokenizer: a KL autoencoder aligned with REPA's encoder (VA-VAE's margin losses), then 1,000
# steps with the patch GAN from its weights; the DiT, the same recipe as above on its latents (RECIPE.md: the best
# latent space of the time-to-quality table), 4,000 steps.
KL="--data fashion-mnist --image-size 32 --ch 32 --ch-mult 1,2,2 --num-res-blocks 1 --norm-groups 8 \
  --latent-channels 8 --batch-size 64 --align-encoder $RUNS/encoder.safetensors --align-weight 0.5 \
  --checkpoint-every 250 --log-every 25"
$SCALEGEN train kl $KL --lr 1e-3 --warmup-steps 100 --lr-decay-to 0.1 --steps 2500 --out "$RUNS/tokenizer_kl_align"
$SCALEGEN train kl $KL --lr 2e-4 --warmup-steps 50 --lr-decay-to 0.1 --gan-weight 0.1 --gan-start-step 0 \
  --steps 1000 --init-from "$RUNS/tokenizer_kl_align" --out "$RUNS/tokenizer_kl_align_gan"
$SCALEGEN train dit --tokenizer "$RUNS/tokenizer_kl_align_gan" --data fashion-mnist --image-size 32 \
  --model DiT-S/2 --depth 6 --hidden-size 192 --num-heads 3 --latent-cache \
  --batch-size 128 --lr 6e-4 --warmup-steps 200 --grad-clip 1.0 --ema 0.999 --lr-decay-to 0.1 --steps 4000 \
  --objective flow --t-sampling logit-normal --repa-encoder "$RUNS/encoder.safetensors" --repa-depth 2 \
  --checkpoint-every 500 --log-every 25 --sample-steps 25 --out "$RUNS/dit_kl"

# The VAR's tokenizer: 16×16 finest scale, 512 codes, a patch GAN from step 429. Its odd step counts are what fitted
# the GPU session's minutes at the measured throughput (RECIPE.md).
$SCALEGEN train vqvae --data fashion-mnist --image-size 32 --patch-nums 1,2,3,4,5,6,8,10,13,16 --ch 32 --ch-mult 1,2 \
  --num-res-blocks 1 --norm-groups 8 --no-attention --vocab-size 512 --z-channels 8 \
  --batch-size 256 --lr 1e-3 --warmup-steps 200 --lr-decay-to 0.1 --dead-code-every 100 \
  --gan-weight 0.1 --gan-start-step 429 --steps 1289 --num-workers 4 --sample-every 0 \
  --checkpoint-every 322 --log-every 50 --out "$RUNS/tokenizer_var"
$SCALEGEN train var --tokenizer "$RUNS/tokenizer_var" --data fashion-mnist \
  --depth 5 --width 192 --num-heads 3 --token-cache \
  --batch-size 256 --lr 1e-3 --warmup-steps 300 --grad-clip 2 --ema 0.999 --lr-decay-to 0.1 --steps 3200 \
  --num-workers 4 --sample-every 0 --checkpoint-every 400 --log-every 50 --out "$RUNS/var"

$SCALEGEN export --run "$RUNS/dit_kl" --out "$SHIPPED/dit"  # its EMA weights (RECIPE.md)

# The one-step DiT: MeanFlow fine-tuned from the earlier (VQ) DiT — from its fp16 export, shipped as dit/ until
# issue 22; its run's EMA here (its interval embedding starts at zero, so it starts as
# that flow model), guidance 2 trained in, in three stages (RECIPE.md says why): 1,500 steps with logit-normal t and
# half the examples at r < t, resumed to 4,500 (the learning rate's decay restarted there), then 1,000 steps with
# uniform t and three quarters at r < t, from the step-4,500 weights (later options win over $MEANFLOW's).
MEANFLOW="--tokenizer $RUNS/tokenizer --data fashion-mnist --image-size 32 --model DiT-S/2 --depth 6 --hidden-size 192 \
  --num-heads 3 --latent-cache --init-from $RUNS/dit --objective meanflow --t-sampling logit-normal \
  --logit-mean -0.4 --mean-fraction 0.5 --train-cfg 2 --batch-size 128 --lr 1e-4 --warmup-steps 100 --grad-clip 1.0 \
  --ema 0.999 --lr-decay-to 0.1 --precision fp32 --checkpoint-every 250 --keep-checkpoints 10 --log-every 25 \
  --sample-steps 1 --out $RUNS/dit_meanflow"
$SCALEGEN train dit $MEANFLOW --steps 1500
$SCALEGEN train dit $MEANFLOW --steps 4500
$SCALEGEN train dit $MEANFLOW --init-from "$RUNS/dit_meanflow/checkpoints/step-0004500" --t-sampling uniform \
  --logit-mean 0 --mean-fraction 0.75 --warmup-steps 50 --ema 0.998 --steps 1000 --out "$RUNS/dit_meanflow_uniform"
$SCALEGEN export --run "$RUNS/dit_meanflow_uniform" --out "$SHIPPED/dit_meanflow"
$SCALEGEN export --run "$RUNS/var" --out "$SHIPPED/var" --weights raw

# The VAR's refiner (CoDe: it generates the two finest scales after the VAR drafted the others): depth 2, started
# from the shipped VAR's first two blocks, embeddings and head, on this 2-core CPU; the run was stopped at step 911 of
# this 3,000-step schedule (45 min) and its raw weights of that step are shipped (RECIPE.md).
$SCALEGEN train var --tokenizer "$SHIPPED/var" --data fashion-mnist --depth 2 --width 192 --num-heads 3 --token-cache \
  --init-from "$SHIPPED/var" --batch-size 64 --lr 3e-4 --warmup-steps 50 --grad-clip 2 --ema 0.999 --steps 3000 \
  --sample-every 0 --checkpoint-every 100 --log-every 20 --precision auto --out "$RUNS/var_refiner"
$SCALEGEN export --run "$RUNS/var_refiner/checkpoints/step-0000911" --out "$SHIPPED/var_refiner" --weights raw
$SCALEGEN plot "$RUNS/tokenizer" "$RUNS/dit" "$RUNS/tokenizer_var" "$RUNS/var" --by run \
  --metric loss,l1,l2,quantizer,mse,repa,accuracy --log-y --out "$SHIPPED/curves.png"
