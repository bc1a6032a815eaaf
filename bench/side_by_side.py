"""Benchmark: scalegen against the official code, side by side in one process and interleaved rounds (CPU or GPU).

    python bench/side_by_side.py --official-dit /tmp/DiT --official-var /tmp/VAR [--rounds 3] [--device cpu]

Clones of facebookresearch/DiT and FoundationVision/VAR are given by path (never part of this repository; the
official DiT imports timm: `pip install timm`, or put a stand-in of timm's PatchEmbed / Attention / Mlp on
PYTHONPATH). Rows, each the median over rounds, official and scalegen alternating:

- DiT training at the CLI's defaults (`scalegen train dit`: DiT-S/2 on 32×32 Fashion-MNIST pixels, batch 64, AdamW
  lr 1e-4, EMA 0.9999, `--precision auto`): the official train.py step (forward, loss, backward, AdamW, EMA) on random
  tensors of the same shapes against the seconds per step that `train_dit` itself logs (data loading included);
- the same step with scalegen's model and diffusion in fp32, and in bf16 autocast where the device has bf16 units;
- VAR generation (depth 8, 10 scales up to 16×16, a small tokenizer, batch 8, cfg 1.5, top-k 900, top-p 0.96):
  the official `autoregressive_infer_cfg` against `VAR.generate` (fp32, and `precision="auto"`).
"""
from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from scalegen.diffusion.respace import create_diffusion
from scalegen.mixed_precision import autocast, resolve_precision
from scalegen.models.dit import build_dit
from scalegen.models.var import VARConfig, VAR
from scalegen.tokenizers.vqvae import build_vqvae
from scalegen.train.dit_task import DiTOptions, train_dit
from scalegen.train.optimization import update_ema
from scalegen.train.run_log import read_log
from scalegen.train.trainer import TrainConfig

from timing import seconds_per_call

BATCH, IMAGE_SIZE, CHANNELS, CLASSES = 64, 32, 1, 10  # `scalegen train dit` at its defaults
EMA_DECAY, LEARNING_RATE = 0.9999, 1e-4
CLI_STEPS = 6  # steps of the real training run; the last logged window (3 steps) is timed
VAR_DEPTH, VAR_PATCH_NUMS, VAR_BATCH, VAR_CLASSES = 8, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 8, 1000
VAR_CFG, VAR_TOP_K, VAR_TOP_P = 1.5, 900, 0.96


def import_from_clone(path: Path, module: str, names: list[str]) -> list:
    """`from module import names` out of a clone; its top-level packages (both clones have a `models`) are dropped
    from sys.modules afterwards so the other clone can import its own."""
    before = set(sys.modules)
    sys.path.insert(0, str(path))
    try:
        imported = importlib.import_module(module)
        return [getattr(imported, name) for name in names]
    finally:
        sys.path.remove(str(path))
        for name in set(sys.modules) - before:
            if not name.startswith(("torch", "numpy", "scalegen", "timm")):
                del sys.modules[name]


def official_dit_step(path: Path, device: torch.device):
    """The official train.py inner step for DiT-S/2 on the CLI's default shapes."""
    (DiT_models,) = import_from_clone(path, "models", ["DiT_models"])
    (official_diffusion,) = import_from_clone(path, "diffusion", ["create_diffusion"])
    model = DiT_models["DiT-S/2"](input_size=IMAGE_SIZE, in_channels=CHANNELS, num_classes=CLASSES).to(device)
    return training_step(model, official_diffusion(timestep_respacing=""), device, "fp32")


def training_step(model: torch.nn.Module, diffusion, device: torch.device, precision: str):
    """forward + diffusion loss + backward + AdamW + EMA on one random batch, as train.py's loop."""
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0)
    images = torch.randn(BATCH, CHANNELS, IMAGE_SIZE, IMAGE_SIZE, device=device)  # (B, 1, 32, 32)
    labels = torch.randint(0, CLASSES, (BATCH,), device=device)  # (B,)
    model.train()

    def step() -> None:
        t = torch.randint(0, diffusion.num_timesteps, (BATCH,), device=device)  # (B,)
        with autocast(precision, device):
            loss = diffusion.training_losses(model, images, t, dict(y=labels))["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        update_ema(ema, model, EMA_DECAY)

    return step


def scalegen_cli_seconds(device: torch.device) -> float:
    """Seconds per step that `scalegen train dit` at its defaults logs in its last window (its closing sample grid
    takes 2 steps instead of 50: it is not timed, only waited for)."""
    with tempfile.TemporaryDirectory() as folder:
        train_dit(DiTOptions(sample_steps=2), TrainConfig(out=folder, steps=CLI_STEPS, log_every=CLI_STEPS // 2,
                                            device=str(device), sample_every=CLI_STEPS * 10, logger="csv"))
        return BATCH / read_log(Path(folder))[-1]["images_per_second"]


def var_pair(path: Path, device: torch.device):
    """An official VAR and a scalegen VAR with the same weights, each as a generation call."""
    OfficialVAR, OfficialVQVAE = import_from_clone(path, "models", ["VAR", "VQVAE"])
    tokenizer = OfficialVQVAE(vocab_size=4096, z_channels=32, ch=32, test_mode=True, share_quant_resi=4,
                              v_patch_nums=VAR_PATCH_NUMS).to(device)
    official = OfficialVAR(vae_local=tokenizer, num_classes=VAR_CLASSES, depth=VAR_DEPTH, embed_dim=64 * VAR_DEPTH,
                           num_heads=VAR_DEPTH, norm_eps=1e-6, attn_l2_norm=True, patch_nums=VAR_PATCH_NUMS,
                           drop_path_rate=0.0).to(device).eval()
    ours_tokenizer = build_vqvae(vocab_size=4096, z_channels=32, ch=32, patch_nums=VAR_PATCH_NUMS).to(device)
    ours_tokenizer.load_state_dict(tokenizer.state_dict(), strict=True)
    config = VARConfig.for_depth(VAR_DEPTH, num_classes=VAR_CLASSES, patch_nums=VAR_PATCH_NUMS, vocab_size=4096,
                                 z_channels=32)
    ours = VAR(config, tokenizer=ours_tokenizer.eval()).to(device).eval()
    ours.load_state_dict(official.state_dict(), strict=True)
    labels = torch.randint(0, VAR_CLASSES, (VAR_BATCH,), device=device)  # (B,)

    def official_call() -> None:
        with torch.no_grad():
            official.autoregressive_infer_cfg(VAR_BATCH, labels, g_seed=0, cfg=VAR_CFG, top_k=VAR_TOP_K,
                                              top_p=VAR_TOP_P)

    def ours_call(precision: str):
        return lambda: ours.generate(labels, cfg=VAR_CFG, top_k=VAR_TOP_K, top_p=VAR_TOP_P, seed=0,
                                     precision=precision)

    return official_call, ours_call("fp32"), ours_call("auto")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-dit", type=Path, help="clone of facebookresearch/DiT")
    parser.add_argument("--official-var", type=Path, help="clone of FoundationVision/VAR")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed calls per round and row")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}; precision auto here means "
          f"{resolve_precision('auto', device)}")
    rows: dict[str, callable] = {}
    if args.official_dit:
        rows["DiT step, official (fp32)"] = official_dit_step(args.official_dit, device)
        ours = build_dit("DiT-S/2", input_size=IMAGE_SIZE, in_channels=CHANNELS, num_classes=CLASSES).to(device)
        # bf16 only where it is fast: on a CPU without bf16 matrix units it is many times slower than fp32.
        for precision in ("fp32", "bf16") if resolve_precision("auto", device) == "bf16" else ("fp32",):
            rows[f"DiT step, scalegen ({precision})"] = training_step(ours, create_diffusion(""), device, precision)
    if args.official_var:
        official, fp32, automatic = var_pair(args.official_var, device)
        rows.update({"VAR generation, official (fp32)": official, "VAR generation, scalegen (fp32)": fp32,
                     "VAR generation, scalegen (auto)": automatic})
    times: dict[str, list[float]] = {name: [] for name in rows}
    cli: list[float] = []
    for round_index in range(args.rounds):
        for name, call in rows.items():
            times[name].append(seconds_per_call(call, args.steps, 1, device))
        if args.official_dit:
            cli.append(scalegen_cli_seconds(device))
        print(f"round {round_index + 1}: " + ", ".join(f"{name} {values[-1] * 1000:.0f} ms"
                                                      for name, values in times.items()), flush=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    if cli:
        medians["DiT step, scalegen train dit at its defaults"] = statistics.median(cli)
    for name, seconds in medians.items():
        reference = "DiT step, official (fp32)" if name.startswith("DiT") else "VAR generation, official (fp32)"
        ratio = seconds / medians[reference] if reference in medians else float("nan")
        print(f"{name:48s} {seconds * 1000:8.1f} ms   {ratio:.2f}× the official time")


if __name__ == "__main__":
    main()
