"""Benchmark: the shipped VAR's generation time and quality, the official code beside ours and each speed-up.

    python bench/var_speed.py --official-var /tmp/VAR [--refiner RUN_OR_EXPORT] [--setting NAME] …
                              [--batch-sizes 1,64] [--rounds 3] [--num-samples 2000] [--json bench/var_speed.json]

The official `autoregressive_infer_cfg` (a clone of FoundationVision/VAR given by path, never part of this
repository) runs with the shipped VAR's weights and the shipped tokenizer's quantizer (the official quantizer class,
loaded with our quantizer's weights; the official VQVAE's fixed architecture cannot hold our decoder, so both decode
with ours). Settings (`--setting`, default all; the shipped VAR's sampling settings, cfg 1.5, no top-k / top-p):

- `official`: the official generation (fp32);
- `default`: `VAR.generate` (fp32): the official tokens (checked: the same images for the same seed);
- `bf16`: bf16 autocast (where the CPU or GPU has bf16 units);
- `inverse-cdf`: tokens drawn by inverting the cumulative distribution (`draws="inverse-cdf"`);
- `pruned`: cached token pruning at scalegen's default (`TokenPruning()`: 30 % of the last scale's tokens);
  `pruned-fastvar`: FastVAR's own ratios (40 % and 50 % of the last two scales');
- `refiner`: CoDe, the `--refiner` VAR generating the last two scales;
- combinations joined by `+` (`bf16+inverse-cdf+pruned+refiner`).

Time: seconds per image at each batch size (calls of that batch, at least 32 images), the median over interleaved
rounds (every setting once per round, in turn). Quality: `--num-samples` images (an equal number per class, seeds 0, 1, … per batch of 250, the same for
every setting), FID against the real test set and the accuracy of the class asked for, in the shipped classifier's
features (`scalegen eval --features fmnist`); the official setting's images are the default's (checked), so it is not
scored twice. Settings already in the JSON file are not scored again.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from scalegen import load_var
from scalegen.eval.fmnist import fmnist_report
from scalegen.images import to_uint8
from scalegen.models.var_pruning import FASTVAR_FRACTIONS, TokenPruning
from scalegen.runs.names import SHIPPED_VAR

from side_by_side import import_from_clone

SAMPLE_BATCH = 250
TIMED_IMAGES = 32  # images per timing at each batch size (one call at batch 32 or more)
CLASSES = 10
SPEEDUPS = ("bf16", "inverse-cdf", "pruned", "pruned-fastvar", "refiner")
SETTINGS = ("official", "default", "bf16", "inverse-cdf", "pruned", "pruned-fastvar", "refiner", "bf16+inverse-cdf",
            "bf16+inverse-cdf+pruned", "bf16+inverse-cdf+refiner", "bf16+inverse-cdf+pruned+refiner")


def official_generator(clone: Path, ours: torch.nn.Module) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """The official VAR class with our weights, as (labels, seed) -> images in [0, 1]."""
    OfficialVAR, VectorQuantizer2 = import_from_clone(clone, "models", ["VAR", "VectorQuantizer2"])
    config, tokenizer = ours.config, ours.tokenizer
    tokenizer_config = tokenizer.config
    quantizer = VectorQuantizer2(
        vocab_size=config.vocab_size, Cvae=config.z_channels, using_znorm=False, beta=tokenizer_config.beta,
        default_qresi_counts=tokenizer_config.phi_count, v_patch_nums=config.patch_nums,
        quant_resi=tokenizer_config.quant_resi, share_quant_resi=tokenizer_config.share_quant_resi,
    )
    quantizer.load_state_dict(tokenizer.quantize.state_dict(), strict=True)

    class TokenizerProxy(torch.nn.Module):
        """What the official VAR reads of its VQVAE: Cvae, vocab_size, the quantizer and the decoder."""

        def __init__(self) -> None:
            super().__init__()
            self.Cvae, self.vocab_size, self.quantize = config.z_channels, config.vocab_size, quantizer

        def fhat_to_img(self, features: torch.Tensor) -> torch.Tensor:
            return tokenizer.features_to_img(features)  # (B, C, H, W) in [-1, 1]

    official = OfficialVAR(
        vae_local=TokenizerProxy(), num_classes=config.num_classes, depth=config.depth, embed_dim=config.width,
        num_heads=config.num_heads, mlp_ratio=config.mlp_ratio, norm_eps=config.norm_eps, shared_aln=config.shared_aln,
        attn_l2_norm=config.attn_l2_norm, patch_nums=config.patch_nums, drop_path_rate=0.0,
    ).eval()
    official.load_state_dict(ours.state_dict(), strict=True)

    @torch.no_grad()
    def generate(labels: torch.Tensor, seed: int) -> torch.Tensor:
        return official.autoregressive_infer_cfg(labels.shape[0], labels, g_seed=seed, cfg=ours.sampling["cfg"])

    return generate


def our_generator(model: torch.nn.Module, setting: str, refiner: torch.nn.Module | None
                  ) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """`VAR.generate` with a setting's speed-ups, as (labels, seed) -> images in [0, 1]."""
    parts = set(setting.split("+")) - {"default"}
    unknown = parts - set(SPEEDUPS)
    if unknown:
        raise SystemExit(f"unknown speed-up {sorted(unknown)}: use default or {', '.join(SPEEDUPS)} joined by +")
    if "refiner" in parts and refiner is None:
        raise SystemExit(f"setting {setting} needs --refiner")
    pruning = (TokenPruning(FASTVAR_FRACTIONS) if "pruned-fastvar" in parts else TokenPruning() if "pruned" in parts
               else None)
    options = dict(precision="bf16" if "bf16" in parts else "fp32", pruning=pruning,
                   refiner=refiner if "refiner" in parts else None,
                   draws="inverse-cdf" if "inverse-cdf" in parts else "multinomial")
    return lambda labels, seed: model.generate(labels, seed=seed, **options)


def seconds_per_image(generate: Callable[[torch.Tensor, int], torch.Tensor], batch: int) -> float:
    """Wall-clock seconds per image of calls at this batch size (as many calls as make TIMED_IMAGES images)."""
    labels = torch.arange(batch) % CLASSES  # (B,)
    calls = max(TIMED_IMAGES // batch, 1)
    started = time.perf_counter()
    for seed in range(calls):
        generate(labels, seed)
    return (time.perf_counter() - started) / (calls * batch)


def quality(generate: Callable[[torch.Tensor, int], torch.Tensor], num_samples: int) -> dict:
    """FID and accuracy of `num_samples` images in the shipped classifier's features, and the seconds they took."""
    labels = torch.arange(num_samples) % CLASSES  # (N,)
    started = time.perf_counter()
    images = torch.cat([generate(chunk, index) for index, chunk in enumerate(labels.split(SAMPLE_BATCH))])  # (N, 1, H, W)
    seconds = time.perf_counter() - started
    report = fmnist_report(to_uint8(images)[:, 0].numpy(), labels.numpy())
    return {"fid": report["fid"], "accuracy": report["accuracy"], "sampling_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-var", type=Path, help="clone of FoundationVision/VAR (the official setting)")
    parser.add_argument("--refiner", help="a VAR on the shipped VAR's tokenizer (run folder or export) for CoDe")
    parser.add_argument("--setting", action="append", help=f"settings to run (default: all of {', '.join(SETTINGS)})")
    parser.add_argument("--batch-sizes", default="1,64", help="batch sizes timed")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds, the median kept (0: no timing)")
    parser.add_argument("--num-samples", type=int, default=2000, help="samples scored per setting (0: no scores)")
    parser.add_argument("--json", type=Path, default=Path("bench/var_speed.json"), help="results, read and extended")
    args = parser.parse_args()

    model = load_var(SHIPPED_VAR).eval()
    refiner = None
    if args.refiner:
        refiner = load_var(args.refiner).eval()
        refiner.attach_tokenizer(model.tokenizer)
    settings = args.setting or [name for name in SETTINGS if "refiner" not in name or refiner is not None]
    if "official" in settings and args.official_var is None:
        settings.remove("official")
    generators = {name: official_generator(args.official_var, model) if name == "official"
                  else our_generator(model, name, refiner) for name in settings}
    if "official" in generators and "default" in generators:
        labels = torch.arange(2 * CLASSES) % CLASSES  # (N,)
        same = torch.equal(generators["official"](labels, 0), generators["default"](labels, 0))
        print(f"official and default images identical: {same}")

    results = json.loads(args.json.read_text()) if args.json.exists() else {}
    batch_sizes = [int(value) for value in args.batch_sizes.split(",")]
    for batch in batch_sizes if args.rounds else []:
        for generate in generators.values():
            seconds_per_image(generate, batch)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in generators}
        for _ in range(args.rounds):
            for name, generate in generators.items():
                times[name].append(seconds_per_image(generate, batch))
        for name in generators:
            results.setdefault(name, {})[f"seconds_per_image_batch_{batch}"] = statistics.median(times[name])
    if args.num_samples:
        for name, generate in generators.items():
            if name == "official" or results.get(name, {}).get("num_samples") == args.num_samples:
                continue
            results.setdefault(name, {}).update(quality(generate, args.num_samples), num_samples=args.num_samples)
            print(f"{name}: FID {results[name]['fid']:.2f}, accuracy {results[name]['accuracy']:.3f}", flush=True)
    args.json.write_text(json.dumps(results, indent=1))

    official = results.get("official", {})
    print(f"{'setting':24s}" + "".join(f"  s/img @{batch:<4d} × official" for batch in batch_sizes) + "    FID  accuracy")
    for name in generators:
        row = results[name]
        cells = ""
        for batch in batch_sizes:
            key = f"seconds_per_image_batch_{batch}"
            seconds = row.get(key, float("nan"))
            cells += f"  {seconds:9.4f}  {seconds / official.get(key, float('nan')):9.2f}×"
        scores = f"  {row['fid']:6.2f}  {row['accuracy']:.3f}" if "fid" in row else ""
        print(f"{name:24s}{cells}{scores}")


if __name__ == "__main__":
    main()
