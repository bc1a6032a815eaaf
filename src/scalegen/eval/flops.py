"""Analytic compute of DiT and VAR: the papers' "Gflops" (multiply-accumulates) and the cost of one image.

Counting convention (fvcore's, which reproduces every DiT figure within 0.4%): one unit per multiply-accumulate
of linear layers, convolutions and attention matmuls (QKᵀ and AV, full T×T even under a mask), plus 4 per
element of an affine-free LayerNorm; embedding lookups, activations, softmax and elementwise ops count zero.
LightningDiT's block options follow the same rules: an RMSNorm counts 2 per element (LayerNorm's without the mean
and the subtraction), a learnable norm weight 1 more (as fvcore's affine norms), and RoPE's rotation, a linear map,
2 MACs per rotated element (a 2×2 matrix per channel pair). The VAE / VQVAE decoders are not included.
`var_sampling_macs` counts what a loaded VAR's generation runs, with these rules: torch's FLOP counter measures twice
its figure less the norms, which it does not count (nor, on CPU, the fused attention kernel: SDPA's math backend
shows its matmuls to it).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from scalegen.diffusion.objectives import objective_class, sampling_objective
from scalegen.errors import UserError
from scalegen.models.dit import DiTConfig, preset_config
from scalegen.models.flow_head import FLOW_BLOCK_CHUNKS, FLOW_FINAL_CHUNKS
from scalegen.models.layers import TIMESTEP_FREQUENCY_SIZE, swiglu_hidden_size
from scalegen.models.sampling_settings import (
    FLOW_DEFAULTS, VAR_DEFAULTS, VARSampling, chosen_settings, settings_line, values,
)
from scalegen.models.settings import ADALN_KINDS, MODEL_SIZES, OFFICIAL_BLOCK, PATCH_SIZES, BlockOptions
from scalegen.tokenizers.sd_vae import LATENT_CHANNELS, LATENT_DOWNSAMPLE
from scalegen.models.var import WIDTH_PER_DEPTH
from scalegen.tokenizers.quantizer import MultiScaleQuantizer, Phi
from scalegen.tokenizers.vqvae import OFFICIAL_VOCAB_SIZE, OFFICIAL_Z_CHANNELS, PATCH_NUMS_256, PATCH_NUMS_512

GIGA = 1e9
TERA = 1e12
LAYER_NORM_OPS_PER_ELEMENT = 4  # fvcore: mean, variance, subtract, divide for a LayerNorm without affine
RMS_NORM_OPS_PER_ELEMENT = 2  # mean square, divide
NORM_WEIGHT_OPS_PER_ELEMENT = 1  # fvcore: one more per element for a norm's learnable scale
ROPE_MACS_PER_ELEMENT = 2  # a rotation is a 2×2 matrix product per channel pair
SWIGLU_MATRICES = 3  # gate, value and output
MLP_RATIO = 4
ADALN_CHUNKS_BLOCK = 6  # shift/scale/gate for attention and MLP
ADALN_CHUNKS_FINAL = 2  # shift/scale
# Attention's linear MACs per token per block: qkv 3·D², projection D².
ATTENTION_LINEAR_MACS_PER_TOKEN = 3 + 1
GUIDANCE_HALVES = 2  # VAR's generation runs the conditional and the null-class rows at every scale, whatever the cfg

# (label, objective, sampler, steps, cfg) of the table's other DiT-XL/2 sampling rows: SiT's ODE, MeanFlow's one step.
SAMPLING_ROWS = (("DiT-XL/2 flow, 50 Euler", "flow", "euler", 50, 4.0),
                 ("DiT-XL/2 meanflow, 1 step", "meanflow", "meanflow", 1, 1.0),
                 ("DiT-XL/2 meanflow, 2 steps", "meanflow", "meanflow", 2, 1.0))
DIT_PAPER_GFLOPS = {  # DiT paper, Table 1 (256px) and Table 4 (XL/2 at 512px)
    ("DiT-S/2", 256): 6.06, ("DiT-S/4", 256): 1.41, ("DiT-S/8", 256): 0.36,
    ("DiT-B/2", 256): 23.01, ("DiT-B/4", 256): 5.56, ("DiT-B/8", 256): 1.42,
    ("DiT-L/2", 256): 80.71, ("DiT-L/4", 256): 19.70, ("DiT-L/8", 256): 5.01,
    ("DiT-XL/2", 256): 118.64, ("DiT-XL/4", 256): 29.05, ("DiT-XL/8", 256): 7.39,
    ("DiT-XL/2", 512): 524.6,
}
DIT_SAMPLING_STEPS = 250  # DiT's FID setting: 250 DDPM steps with classifier-free guidance
VAR_PATCH_NUMS = {256: PATCH_NUMS_256, 512: PATCH_NUMS_512}
VAR_DEPTHS = (16, 20, 24, 30)


def counted_flops(step: Callable[[], object]) -> float:
    """FLOPs of one call of `step` as torch's FLOP counter measures them (2 per multiply-accumulate, decoders and
    backward passes included when `step` runs them): the measured counterpart of the analytic figures here."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def mlp_macs_per_token(hidden_size: int, mlp_ratio: float, mlp: str) -> int:
    """MACs of one token through a block's MLP: GELU's two matrices, or SwiGLU's three at 2/3 of the width."""
    if mlp == "swiglu":
        return SWIGLU_MATRICES * hidden_size * swiglu_hidden_size(hidden_size, mlp_ratio)
    return 2 * hidden_size * int(hidden_size * mlp_ratio)


def dit_forward_macs(depth: int, hidden_size: int, patch_size: int, latent_size: int,
                     in_channels: int = LATENT_CHANNELS, learn_sigma: bool = True, mlp_ratio: float = MLP_RATIO,
                     options: BlockOptions = OFFICIAL_BLOCK, time_inputs: int = 1) -> int:
    """Multiply-accumulates of one DiT forward pass (adaLN blocks) for one image.

    Args:
        depth: number of blocks.
        hidden_size: width D.
        patch_size: patch side p.
        latent_size: latent side (image / 8).
        in_channels: latent channels.
        learn_sigma: output 2·in_channels (ε and the variance interpolation) instead of in_channels.
        mlp_ratio: the GELU MLP's width over D (SwiGLU's is 2/3 of it).
        options: LightningDiT's block options (norm, MLP, RoPE, QK-norm); the default is the official block.
        time_inputs: embedded times: 1 (t), or 2 (t and MeanFlow's t − r, each through its own timestep MLP).
    Returns:
        MACs (the paper's "flops").
    """
    tokens = (latent_size // patch_size) ** 2
    out_channels = 2 * in_channels if learn_sigma else in_channels
    norm_ops = LAYER_NORM_OPS_PER_ELEMENT if options.norm == "layernorm" else RMS_NORM_OPS_PER_ELEMENT
    query_key_elements = 2 * tokens * hidden_size
    block = (ATTENTION_LINEAR_MACS_PER_TOKEN * tokens * hidden_size ** 2  # qkv, projection
             + tokens * mlp_macs_per_token(hidden_size, mlp_ratio, options.mlp)
             + 2 * tokens ** 2 * hidden_size  # QKᵀ and AV
             + ADALN_CHUNKS_BLOCK * hidden_size ** 2  # adaLN modulation of the conditioning vector
             + 2 * norm_ops * tokens * hidden_size  # two norms
             + options.qk_norm * (RMS_NORM_OPS_PER_ELEMENT + NORM_WEIGHT_OPS_PER_ELEMENT) * query_key_elements
             + options.rope * ROPE_MACS_PER_ELEMENT * query_key_elements)
    patch_embed = tokens * patch_size ** 2 * in_channels * hidden_size
    timestep_embed = time_inputs * (TIMESTEP_FREQUENCY_SIZE * hidden_size + hidden_size ** 2)
    final = (ADALN_CHUNKS_FINAL * hidden_size ** 2 + LAYER_NORM_OPS_PER_ELEMENT * tokens * hidden_size
             + tokens * hidden_size * patch_size ** 2 * out_channels)
    return depth * block + patch_embed + timestep_embed + final


def dit_config_macs(config: DiTConfig) -> int:
    """Multiply-accumulates of one forward pass of a DiT built from `config`, for one input (of side
    config.input_size, a latent or pixel image), block options included."""
    if config.block not in ADALN_KINDS:
        raise UserError(f"the analytic count covers the {' and '.join(ADALN_KINDS)} blocks, not {config.block}; "
                        "measure that DiT with counted_flops")
    return dit_forward_macs(config.depth, config.hidden_size, config.patch_size, config.input_size, config.in_channels,
                            config.learn_sigma, config.mlp_ratio, config.block_options,
                            objective_class(config.objective).time_inputs)


def dit_sampling_macs(config: DiTConfig, sampler: str | None = None, steps: int | None = None, cfg: float | None = None,
                      interval: tuple[float, float] | None = None) -> float:
    """Multiply-accumulates of the network to sample one image: its forward pass times the objective's network calls
    (guided calls count twice); None takes the objective's default (and the config's guidance interval)."""
    objective = sampling_objective(config.objective)
    sampler, steps = objective.check_sampler(sampler), objective.check_steps(steps)
    calls = objective.network_calls(sampler, steps, objective.default_cfg if cfg is None else cfg,
                                    interval or config.cfg_interval)
    return float(dit_config_macs(config) * calls)


def parse_dit_preset(preset: str) -> tuple[int, int, int]:
    """(depth, hidden size, patch size) of a preset name such as "DiT-XL/2"."""
    config = preset_config(preset)
    return config.depth, config.hidden_size, config.patch_size


def dit_gflops(preset: str, image_size: int = 256) -> float:
    """The DiT paper's Gflops (10⁹ multiply-accumulates) of one forward pass.

    Args:
        preset: e.g. "DiT-XL/2".
        image_size: image side in pixels (latent = image / 8).
    Returns:
        Gflops, e.g. 118.6 for DiT-XL/2 at 256px.
    """
    depth, hidden_size, patch_size = parse_dit_preset(preset)
    return dit_forward_macs(depth, hidden_size, patch_size, image_size // LATENT_DOWNSAMPLE) / GIGA


def dit_image_macs(preset: str, image_size: int = 256, steps: int = DIT_SAMPLING_STEPS, cfg: bool = True) -> float:
    """MACs to sample one image: steps forward passes, each on a doubled batch with classifier-free guidance."""
    return dit_gflops(preset, image_size) * GIGA * steps * (2 if cfg else 1)


def var_block_macs(queries: int, keys: int, width: int, mlp_width: int, modulation: bool = True) -> int:
    """MACs of one VAR block (`AdaLNSelfAttn`) for one sequence: `queries` positions attending to `keys` (its own and
    the cached ones), its modulation of the class embedding (none with a shared AdaLN: `modulation` False)."""
    return (ATTENTION_LINEAR_MACS_PER_TOKEN * queries * width ** 2  # qkv, projection
            + 2 * queries * width * mlp_width  # the MLP's two matrices
            + 2 * queries * keys * width  # QKᵀ and AV against every key so far
            + modulation * ADALN_CHUNKS_BLOCK * width ** 2
            + 2 * LAYER_NORM_OPS_PER_ELEMENT * queries * width)  # two norms


def var_head_norm_macs(tokens: int, width: int) -> int:
    """MACs of VAR's AdaLN before its head (`head_nm`) for `tokens` positions of one sequence."""
    return ADALN_CHUNKS_FINAL * width ** 2 + LAYER_NORM_OPS_PER_ELEMENT * tokens * width


def var_image_macs(depth: int, patch_nums: tuple[int, ...], kv_cache: bool = True, cfg: bool = True,
                   vocab_size: int = OFFICIAL_VOCAB_SIZE, vae_channels: int = OFFICIAL_Z_CHANNELS) -> float:
    """MACs of the VAR transformer to generate one image, scale by scale.

    With the KV cache each scale runs only its own tokens, attending to the cached prefix. Without it every scale
    re-runs the whole prefix (a plain forward over all tokens so far). Logits are taken for the new scale only.

    Args:
        depth: VAR depth d (width 64·d).
        patch_nums: token-map sides per scale, e.g. (1, 2, 3, 4, 5, 6, 8, 10, 13, 16).
        kv_cache: whether keys and values of earlier scales are cached.
        cfg: classifier-free guidance doubles the batch (VAR always samples this way).
        vocab_size: codebook size.
        vae_channels: VQVAE latent channels (input of the word embedding).
    Returns:
        MACs per image.
    """
    width = WIDTH_PER_DEPTH * depth
    total, prefix = 0, 0
    for scale, side in enumerate(patch_nums):
        new_tokens = side * side
        prefix += new_tokens
        queries = new_tokens if kv_cache else prefix
        block = var_block_macs(queries, prefix, width, MLP_RATIO * width)
        class_tokens = 1 if scale == 0 or not kv_cache else 0  # position 0 is the class embedding, not a word
        embedded_tokens = queries - class_tokens
        head = var_head_norm_macs(new_tokens, width) + new_tokens * width * vocab_size
        total += depth * block + embedded_tokens * vae_channels * width + head
    return float(total * (2 if cfg else 1))


def flow_head_image_macs(patch_nums: tuple[int, ...], channels: int, width: int, condition_width: int, blocks: int,
                         steps: int, sampler: str = "euler", cfg: bool = True) -> float:
    """MACs of a flow head's sampling (`models/flow_head.py`) for one image: per token and guidance half its
    conditioning (once per scale) and its MLP at every ODE evaluation (`steps` per scale, two per step for Heun), and
    per evaluation the one time's embedding and modulation. Add them to `var_image_macs(..., vocab_size=0,
    vae_channels=channels)` (the transformer and the AdaLN before the head) for a flow VAR's image.

    Args:
        patch_nums: token-map sides per scale.
        channels: the token's dimension (the latent channels).
        width: the MLP's width (`VARConfig.head_width`).
        condition_width: the transformer's width.
        blocks: the MLP's residual blocks.
        steps: ODE steps per scale (`VARSampling.flow_steps`).
        sampler: "euler" or "heun" (`VARSampling.flow_sampler`).
        cfg: both guidance halves (the flow head always samples this way).
    Returns:
        MACs per image.
    """
    modulations = (FLOW_BLOCK_CHUNKS * blocks + FLOW_FINAL_CHUNKS) * width
    conditioning = condition_width * width + width * modulations  # per token and scale
    time = TIMESTEP_FREQUENCY_SIZE * width + width ** 2 + width * modulations  # per scale and evaluation
    block = 2 * width ** 2 + LAYER_NORM_OPS_PER_ELEMENT * width  # the two-layer MLP, the affine-free norm
    per_token = channels * width + blocks * block + LAYER_NORM_OPS_PER_ELEMENT * width + width * channels
    evaluations = steps * (2 if sampler == "heun" else 1)
    halves = 2 if cfg else 1
    tokens = sum(side * side for side in patch_nums)
    return float(tokens * halves * (conditioning + evaluations * per_token) + len(patch_nums) * evaluations * time)


def feature_accumulation_macs(quantizer: nn.Module) -> int:
    """MACs of a tokenizer's per-scale feature accumulation in one image's generation (`next_autoregressive_input`):
    a VQ quantizer's φ conv on the finest grid at every scale where φ is not the identity; a continuous scale plan's
    resampling counts zero."""
    if not isinstance(quantizer, MultiScaleQuantizer):
        return 0
    finest = quantizer.patch_nums[-1]
    total = 0
    for scale_index in range(len(quantizer.patch_nums)):
        phi = quantizer.phi(scale_index)
        if isinstance(phi, Phi):
            total += phi.in_channels * phi.out_channels * phi.kernel_size[0] * phi.kernel_size[1] * finest ** 2
    return total


def var_sampling_macs(model: nn.Module, settings: VARSampling | None = None) -> float:
    """Multiply-accumulates of the network to generate one image with a loaded VAR (`VAR.generate_tokens` at batch
    1), as it runs them: the transformer scale by scale with its KV cache, on both guidance halves whatever the cfg
    (the null-class rows run even at cfg 0), the word embedding on the image's own rows, the token head (VAR's logits,
    or the flow head's ODE at `flow_steps` and `flow_sampler`; a batch shares the flow head's time embedding, so it
    costs a little less per image) and the tokenizer's per-scale features. The tokenizer's decoder is excluded.

    Args:
        model: a VAR (`scalegen.models.var.VAR`) with its tokenizer.
        settings: what it samples with; None: its recommended settings (`VAR.sampling_settings`).
    Returns:
        MACs per image.
    """
    settings = model.sampling_settings(settings)
    if settings.pruning is not None or settings.refiner is not None:
        raise UserError("the count covers one VAR computing every token: measure FastVAR pruning or a CoDe refiner "
                        "with counted_flops")
    config = model.config
    width, patch_nums, channels = config.width, config.patch_nums, config.z_channels
    quantizer = model.tokenizer.quantize
    flow = model.token_head.continuous_tokens
    shared = config.shared_aln
    halves, own_rows, prefix = 0, 0, 0  # MACs of the doubled rows, and of the image's own
    for scale_index, side in enumerate(patch_nums):
        tokens = side * side
        prefix += tokens
        halves += config.depth * var_block_macs(tokens, prefix, width, round(width * config.mlp_ratio), not shared)
        halves += var_head_norm_macs(tokens, width) + (0 if flow else tokens * width * config.vocab_size)
        own_rows += 0 if scale_index == 0 else tokens * channels * width  # scale 0 starts from the class embedding
        own_rows += settings.more_smooth * tokens * config.vocab_size * channels  # the codebook mixture
    halves += shared * ADALN_CHUNKS_BLOCK * width ** 2  # one shared projection of the class embedding
    total = GUIDANCE_HALVES * halves + own_rows + feature_accumulation_macs(quantizer)
    if flow:
        model.token_head.sampler(model, settings, None)  # its one-line refusals of what it cannot sample with
        total += flow_head_image_macs(patch_nums, channels, config.head_width or width, width, config.head_blocks,
                                      settings.flow_steps, settings.flow_sampler)
    return float(total)


def var_sampling_report(model: nn.Module, name: str, cfg: float | None = None, flow_steps: int | None = None,
                        flow_sampler: str | None = None) -> str:
    """What `scalegen flops --var` prints: the settings (each given one, else the model's recommended one, else the
    default, with where it came from) and the network's sampling GMACs and GFLOPs per image (`var_sampling_macs`).

    Args:
        model: a loaded VAR.
        name: how to call it (its path).
        cfg, flow_steps, flow_sampler: the given settings (None: not given); a flow head's settings only for one.
    Returns:
        Two lines of text.
    """
    flow_given = {"flow_steps": flow_steps, "flow_sampler": flow_sampler}
    chosen = chosen_settings({"cfg": cfg}, model.sampling, model.sampling_origin, VAR_DEFAULTS)
    if model.token_head.continuous_tokens:
        chosen.update(chosen_settings(flow_given, model.sampling, model.sampling_origin, FLOW_DEFAULTS))
    elif any(value is not None for value in flow_given.values()):
        raise UserError(f"--flow-steps and --flow-sampler set a flow head's sampling; {name} has the "
                        f"{model.config.token_head} head: drop them")
    macs = var_sampling_macs(model, model.sampling_settings(**values(chosen)))
    return (f"{name}: VAR with the {model.config.token_head} head, {settings_line(chosen)}\n"
            f"per image: {macs / GIGA:.6g} GMACs, {2 * macs / GIGA:.6g} GFLOPs (network: transformer with KV cache, "
            "both guidance halves, head, the tokenizer's per-scale features; its decoder excluded)")


def flops_table(image_size: int = 256) -> str:
    """The text table `scalegen flops` prints: DiT presets against the paper, then per-image sampling cost."""
    smallest = LATENT_DOWNSAMPLE * max(PATCH_SIZES)
    if image_size <= 0 or image_size % smallest:
        raise UserError(f"--image-size {image_size}: the table needs a positive multiple of {smallest} "
                        f"(the SD VAE's {LATENT_DOWNSAMPLE}× times the largest patch, {max(PATCH_SIZES)}), e.g. 256")
    lines = [f"DiT forward pass at {image_size}px, in Gflops (10^9 multiply-accumulates, as the DiT paper; "
             "real FLOPs are twice that)",
             f"{'preset':<10} {'ours':>9} {'paper':>9} {'diff %':>8}"]
    for size in MODEL_SIZES:
        for patch in PATCH_SIZES:
            preset = f"DiT-{size}/{patch}"
            ours = dit_gflops(preset, image_size)
            paper = DIT_PAPER_GFLOPS.get((preset, image_size))
            paper_text = f"{paper:9.2f} {100 * (ours / paper - 1):+8.2f}" if paper else f"{'-':>9} {'-':>8}"
            lines.append(f"{preset:<10} {ours:9.2f} {paper_text}")
    lines += ["", f"Cost of one {image_size}px image, in TMACs (10^12 multiply-accumulates; real FLOPs are twice "
              "that), transformer only, with classifier-free guidance",
              f"{'model':<28} {'TMACs':>9}"]
    lines.append(f"{'DiT-XL/2, 250 steps':<28} {dit_image_macs('DiT-XL/2', image_size) / TERA:9.2f}")
    latent = preset_config("DiT-XL/2", input_size=image_size // LATENT_DOWNSAMPLE, learn_sigma=False)
    for label, objective, sampler, steps, cfg in SAMPLING_ROWS:
        macs = dit_sampling_macs(replace(latent, objective=objective), sampler, steps, cfg)
        lines.append(f"{label:<28} {macs / TERA:9.2f}")
    if image_size in VAR_PATCH_NUMS:
        for depth in VAR_DEPTHS:
            for kv_cache in (True, False):
                label = f"VAR-d{depth}, {'KV cache' if kv_cache else 'no cache'}"
                macs = var_image_macs(depth, VAR_PATCH_NUMS[image_size], kv_cache=kv_cache)
                lines.append(f"{label:<28} {macs / TERA:9.2f}")
    return "\n".join(lines)
