"""Benchmark: how much of a KL tokenizer's latents each scale of a continuous scale plan explains (issue 33, item 1).

    python bench/continuous_scales.py [--tokenizer shipped:dit] [--patch-nums 1,2,3,4,6,8] [--count 2048]

The first `count` Fashion-MNIST training images are encoded by the KL tokenizer (default: the shipped DiT's, found
with `scalegen.runs.loading.load_tokenizer`), their posterior means normalised per channel over the same images
(`measure_mean_normalization`, as `train var --token-head flow` does), and taken to the scales by both plans of
`scalegen.tokenizers.continuous_scales`: VAR's "residual" (each scale the area-downsampled residual still to explain)
and FlowAR's "downsampled" (each scale the latent itself downsampled). Printed per plan and scale: the fraction of the
latents' variance still unexplained by f̂ after that scale, the tokens' variance there (what the flow head draws from
noise at that scale), and the PSNR of the image decoded from f̂ against the image decoded from the whole latent. Not a
test: it prints figures (float64 sums, CPU).
"""
from __future__ import annotations

import argparse

import torch

from scalegen.classes import FASHION_MNIST_NAME
from scalegen.data.registry import open_source
from scalegen.data.source import unflipped_loader
from scalegen.runs.loading import load_tokenizer
from scalegen.tokenizers.continuous_scales import (
    SCALE_PLANS, ContinuousScales, default_patch_nums, measure_mean_normalization,
)

BATCH_SIZE = 256


@torch.no_grad()
def plan_figures(tokenizer: ContinuousScales, images: torch.Tensor) -> list[dict]:
    """Per scale: unexplained variance fraction, token variance and PSNR (dB) of the decoded partial latent."""
    latents = tokenizer.img_to_features(images).double()  # (N, c, h, w)
    total = (latents - latents.mean((0, 2, 3), keepdim=True)).square().sum()
    tokens = tokenizer.quantize.features_to_tokens(latents)
    reference = tokenizer.features_to_img(latents.float()).double()  # (N, C, H, W)
    rows = []
    for side, scale_tokens, f_hat in zip(tokenizer.patch_nums, tokens,
                                         tokenizer.quantize.tokens_to_features(tokens, all_scales=True)):
        decoded = tokenizer.features_to_img(f_hat.float()).double()  # (N, C, H, W)
        mse = (decoded - reference).square().mean()
        rows.append({"side": side, "unexplained": float((latents - f_hat).square().sum() / total),
                     "token_variance": float(scale_tokens.var()),
                     "psnr": float(10 * torch.log10(4 / mse)) if mse > 0 else float("inf")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default="shipped:dit", help="a KL tokenizer, or a run holding one")
    parser.add_argument("--patch-nums", default=None, help="token grid sides (default: 1,2,3,4,6,8,… to the latent)")
    parser.add_argument("--count", type=int, default=2048, help="images")
    args = parser.parse_args()
    torch.manual_seed(0)
    vae = load_tokenizer(args.tokenizer).eval()
    dataset = open_source(FASHION_MNIST_NAME, vae.image_size)
    images = torch.cat([batch.image for batch in unflipped_loader(dataset, BATCH_SIZE, args.count)])
    normalization = measure_mean_normalization(vae, dataset, count=args.count)
    patch_nums = (tuple(int(side) for side in args.patch_nums.split(",")) if args.patch_nums
                  else default_patch_nums(vae.config.latent_size))
    print(f"{args.tokenizer}: {len(images)} images, latents {vae.config.latent_channels}×{vae.config.latent_size}², "
          f"scales {','.join(map(str, patch_nums))}")
    for plan in SCALE_PLANS:
        tokenizer = ContinuousScales.from_kl(vae, normalization, patch_nums, plan).eval()
        print(f"plan {plan}")
        print("  side  unexplained  token var  PSNR dB")
        for row in plan_figures(tokenizer, images):
            print(f"  {row['side']:4d}  {row['unexplained']:11.4f}  {row['token_variance']:9.4f}  {row['psnr']:7.2f}")


if __name__ == "__main__":
    main()
