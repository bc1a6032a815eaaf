"""Benchmark: VAR generation throughput (images/s), with the KV cache and without it.

    python bench/var_sample.py --depth 16 --image-size 256 --patch-nums 1,2,3,4,5,6,8,10,13,16 --batch-size 1,64 --device cuda
    python bench/var_sample.py --depth 4 --image-size 32 --patch-nums 1,2,3,4,6,8 --batch-size 1,64 --device cpu

Randomly initialised weights (a small tokenizer of the given scales, decode included). "no cache" recomputes the
whole prefix (all earlier scales, teacher forced with the block-causal mask) at every scale, which is what
generation costs without a KV cache; both draw from the same seeded generator, so their tokens should agree.
"""
from __future__ import annotations

import argparse
import time

import torch

from scalegen.models.var import VAR, build_var
from scalegen.models.var_sampling import filter_logits, sample_tokens
from scalegen.tokenizers.vqvae import build_vqvae

from timing import peak_memory_gib

NUM_CLASSES = 1000
CFG, TOP_K, TOP_P = 1.5, 900, 0.96  # the paper's FID setting


@torch.no_grad()
def generate_without_cache(model: VAR, labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, list]:
    """`VAR.generate` with the prefix recomputed at every scale instead of cached; returns (images, tokens)."""
    quantizer = model.tokenizer.quantize
    batch = len(labels)
    cond = model.class_emb(torch.cat((labels, torch.full_like(labels, model.config.num_classes))))  # (2B, C)
    block_cond = model.block_condition(cond)
    level_and_position = model.lvl_embed(model.lvl_1L) + model.pos_1LC  # (1, L, C)
    scale_inputs = [cond.unsqueeze(1) + model.pos_start]  # per scale (2B, p², C)
    finest = model.patch_nums[-1]
    features = cond.new_zeros(batch, model.config.z_channels, finest, finest)  # (B, Cvae, p_K, p_K)
    all_tokens, length = [], 0
    for scale_index, patch in enumerate(model.patch_nums):
        length += patch * patch
        x = torch.cat(scale_inputs, dim=1) + level_and_position[:, :length]  # (2B, length, C)
        mask = model.attn_bias_for_masking[..., :length, :length]  # (1, 1, length, length)
        for block in model.blocks:
            x = block(x, block_cond, attn_mask=mask)  # (2B, length, C)
        both_logits = model.token_head.output(model, x[:, -patch * patch :], cond)  # (2B, p², V)
        guidance = CFG * scale_index / max(model.num_scales - 1, 1)
        logits = (1 + guidance) * both_logits[:batch] - guidance * both_logits[batch:]  # (B, p², V)
        tokens = sample_tokens(filter_logits(logits, TOP_K, TOP_P), generator)  # (B, p²)
        all_tokens.append(tokens)
        embedded = quantizer.embedding(tokens).transpose(1, 2).reshape(batch, -1, patch, patch)  # (B, Cvae, p, p)
        features, next_input = quantizer.next_autoregressive_input(scale_index, features, embedded)
        if scale_index + 1 < model.num_scales:
            scale_inputs.append(model.word_embed(next_input.flatten(2).transpose(1, 2)).repeat(2, 1, 1))
    return model._decode(features), all_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--patch-nums", default="1,2,3,4,5,6,8,10,13,16")
    parser.add_argument("--batch-size", default="1,64", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    patch_nums = tuple(int(side) for side in args.patch_nums.split(","))
    ratio = args.image_size // patch_nums[-1]
    levels = ratio.bit_length()  # ch_mult length giving that downsample ratio
    tokenizer = build_vqvae(vocab_size=4096, z_channels=32, ch=32, patch_nums=patch_nums, ch_mult=(1,) * levels,
                            num_res_blocks=1).to(device).eval()
    model = build_var(tokenizer, depth=args.depth, num_classes=NUM_CLASSES).to(device).eval()
    parameters = sum(parameter.numel() for parameter in model.parameters()) / 1e6
    print(f"VAR-d{args.depth} ({parameters:.1f}M params), {args.image_size}px, scales {patch_nums}, device {device}")
    for batch_size in (int(size) for size in args.batch_size.split(",")):
        labels = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
        runs = {
            "kv cache": lambda generator: model.generate(labels, cfg=CFG, top_k=TOP_K, top_p=TOP_P,
                                                         generator=generator),
            "no cache": lambda generator: generate_without_cache(model, labels, generator)[0],
        }
        for name, run in runs.items():
            run(torch.Generator(device).manual_seed(0))  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            for repeat in range(args.repeats):
                run(torch.Generator(device).manual_seed(repeat))
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - started) / args.repeats
            print(f"batch {batch_size:3d}  {name}: {batch_size / seconds:8.2f} images/s ({seconds * 1000:.0f} ms/batch)")
        cached = model.generate_tokens(labels, cfg=CFG, top_k=TOP_K, top_p=TOP_P,
                                       generator=torch.Generator(device).manual_seed(0))
        _, uncached = generate_without_cache(model, labels, torch.Generator(device).manual_seed(0))
        agreement = (torch.cat(cached.tokens, 1) == torch.cat(uncached, 1)).float().mean().item()
        print(f"batch {batch_size:3d}  tokens equal with and without cache: {agreement * 100:.1f}%")
    print(f"peak memory {peak_memory_gib(device):.2f} GiB")


if __name__ == "__main__":
    main()
