"""Benchmark: VAR's attention paths — a teacher-forced training step with SDPA (dense mask) vs FlexAttention
(block-sparse mask), and generation with the static KV cache vs a cache grown by concatenation.

    python bench/var_attention.py --depth 4 --image-size 32 --patch-nums 1,2,3,4,6,8 --batch-size 8 --device cpu
    python bench/var_attention.py --depth 16 --image-size 256 --patch-nums 1,2,3,4,5,6,8,10,13,16 \
        --batch-size 32 --device cuda

Randomly initialised weights (a small tokenizer of the given scales; generation includes the decode). FlexAttention
has no backward pass on CPU: there its training row is the SDPA fallback, and a forward-only row shows flex itself.
On CUDA, flex is compiled at its first call (not timed: the warm-up call takes it).
"""
from __future__ import annotations

import argparse
import functools
import warnings

import torch
import torch.nn.functional as F

from scalegen.models import var_generation
from scalegen.models.var import VAR, build_var
from scalegen.models.var_blocks import flex_unavailable_reason
from scalegen.tokenizers.vqvae import build_vqvae

from timing import peak_memory_gib, seconds_per_call

NUM_CLASSES = 1000
CFG, TOP_K, TOP_P = 1.5, 900, 0.96  # the paper's FID setting


class GrowingKVCache:
    """The KV cache before the static one, for comparison: it grows by `torch.cat` at every scale."""

    def __init__(self, max_length: int) -> None:
        self.keys: torch.Tensor | None = None  # (B, H, L_seen, head_dim)
        self.values: torch.Tensor | None = None  # (B, H, L_seen, head_dim)

    def extend(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat((self.keys, keys), dim=2)  # (B, H, L_seen + l, head_dim)
            self.values = torch.cat((self.values, values), dim=2)  # (B, H, L_seen + l, head_dim)
        return self.keys, self.values

    def slots(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.new = (keys.new_empty(keys.shape), values.new_empty(values.shape))  # written by the attention
        return self.new

    def fill(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.extend(*self.new)


def training_step(model: VAR, labels: torch.Tensor, var_input: torch.Tensor, targets: torch.Tensor) -> None:
    """One teacher-forced forward + cross-entropy + backward (gradients discarded)."""
    model.zero_grad(set_to_none=True)
    logits = model(labels, var_input)  # (B, L, V)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()


def time_generation(
    model: VAR, labels: torch.Tensor, cache_class: type, repeats: int, device: torch.device
) -> tuple[float, torch.Tensor]:
    """Seconds per `generate` call with the generation loop building its caches from `cache_class`, and the
    images of seed 0."""
    static_cache = var_generation.KVCache
    var_generation.KVCache = cache_class  # the generation loop looks the cache class up by this name
    try:
        def run() -> torch.Tensor:
            return model.generate(labels, cfg=CFG, top_k=TOP_K, top_p=TOP_P,
                                  generator=torch.Generator(device).manual_seed(0))

        return seconds_per_call(run, repeats, 1, device), run()
    finally:
        var_generation.KVCache = static_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch-nums", default="1,2,3,4,6,8")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    patch_nums = tuple(int(side) for side in args.patch_nums.split(","))
    levels = (args.image_size // patch_nums[-1]).bit_length()  # ch_mult length giving that downsample ratio
    tokenizer = build_vqvae(vocab_size=4096, z_channels=32, ch=32, patch_nums=patch_nums, ch_mult=(1,) * levels,
                            num_res_blocks=1).to(device).eval()
    model = build_var(tokenizer, depth=args.depth, num_classes=NUM_CLASSES).to(device)
    parameters = sum(parameter.numel() for parameter in model.parameters()) / 1e6
    print(f"VAR-d{args.depth} ({parameters:.1f}M params), {args.image_size}px, scales {patch_nums} "
          f"(L = {model.sequence_length}), batch {args.batch_size}, device {device}, torch {torch.__version__}")

    batch = args.batch_size
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    var_input = torch.randn(batch, model.sequence_length - model.first_length, model.config.z_channels, device=device)
    targets = torch.randint(0, model.config.vocab_size, (batch, model.sequence_length), device=device)
    reason = flex_unavailable_reason(torch.zeros(1, device=device, requires_grad=True))  # for a training step
    for attention in ("sdpa", "flex"):
        model.attention = attention
        model.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the CPU fallback warns at every call; it is reported once below
            step = functools.partial(training_step, model, labels, var_input, targets)
            seconds = seconds_per_call(step, args.repeats, 1, device)
        fallback = f"  (falls back to SDPA: {reason})" if attention == "flex" and reason else ""
        print(f"training forward+backward  {attention}: {seconds * 1000:8.1f} ms/step{fallback}")
        model.eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flex's "called without torch.compile" note in eager mode
            seconds = seconds_per_call(lambda: model(labels, var_input), args.repeats, 1, device)
        print(f"teacher forcing, no grad   {attention}: {seconds * 1000:8.1f} ms/forward")

    model.eval()
    model.attention = "sdpa"
    static_seconds, static_images = time_generation(model, labels, var_generation.KVCache, args.repeats, device)
    growing_seconds, growing_images = time_generation(model, labels, GrowingKVCache, args.repeats, device)
    for name, seconds in (("static cache", static_seconds), ("growing cache", growing_seconds)):
        print(f"generation ({name:13s}): {seconds * 1000:8.1f} ms/batch, {batch / seconds:7.2f} images/s")
    print(f"images equal with both caches: {torch.equal(static_images, growing_images)}")
    print(f"peak memory {peak_memory_gib(device):.2f} GiB")


if __name__ == "__main__":
    main()
