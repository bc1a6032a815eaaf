"""What each training run trains besides its loop settings: the option dataclasses of the tasks (DiT and its
objective, the VQ and KL tokenizers and their losses, VAR, the classifier), free of torch so that the command line's
parsers show their defaults without loading the tasks (scalegen.train.*_task import these from here and train them).
A method that needs the objectives' registry imports it when it is called.
"""
from __future__ import annotations

import math

from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from scalegen.classes import FASHION_MNIST_NAME
from scalegen.diffusion.names import OBJECTIVE_ENTRIES, objective_settings
from scalegen.errors import UserError
from scalegen.eval.settings import ClassifierConfig
from scalegen.models.settings import CATEGORICAL_HEAD, OFFICIAL_BLOCK, AttentionBackend
from scalegen.runs.names import PIXEL_SPACE
from scalegen.train.settings import VAR_BASE_LR

if TYPE_CHECKING:
    from scalegen.diffusion.objective import Objective

DEFAULT_OBJECTIVE = "ddpm"  # the DiT paper's
REPA_WEIGHT = 0.5  # REPA's λ
REPA_DEFAULT_DEPTH = 2  # the aligned block when an encoder is given (REPA: about a third of the depth)
ALIGNMENT_WEIGHT = 1.5  # REPA-E's weight of the REPA loss that reaches the tokenizer (its vae-align-proj-coeff)
COSINE_MARGIN = 0.5  # VA-VAE's m₁
DISTANCE_MARGIN = 0.25  # VA-VAE's m₂


@dataclass(frozen=True, init=False)
class ObjectiveConfig:
    """How the DiT is trained: its objective and that objective's settings, and REPA. Stored in every checkpoint's
    config as "objective" (`stored`), with every registered objective's settings (those of the others at their
    defaults).

    Built as `ObjectiveConfig(name="meanflow", guidance=2.0, repa_depth=2)`: each setting keyword belongs to the
    objectives whose settings dataclass has a field of its name (`scalegen.diffusion.settings`); giving one that the
    chosen objective lacks a value other than its default is a one-line error.

    Fields:
        name: a registered objective ("ddpm", "flow", "meanflow": `scalegen.diffusion.names.OBJECTIVE_ENTRIES`).
        settings: its settings dataclass, e.g. `MeanFlowSettings(guidance=2.0)`.
        repa_depth: REPA's block (1-based; 0: no REPA), repa_weight: λ of its loss.
    """

    name: str
    settings: Any
    repa_depth: int
    repa_weight: float

    def __init__(self, name: str = DEFAULT_OBJECTIVE, repa_depth: int = 0, repa_weight: float = REPA_WEIGHT,
                 settings: Any = None, **values: Any) -> None:
        """Args:
            name, repa_depth, repa_weight: the fields.
            settings: the objective's settings dataclass (None: from `values`).
            values: settings by name (the objective's, or another's left at its default, as the command line gives).
        """
        from scalegen.diffusion.objectives import objective_class  # torch: not for the parsers

        objective_class(name)
        table, own = objective_settings(), OBJECTIVE_ENTRIES[name].settings
        values = {**(asdict(settings) if settings is not None else {}), **values}
        unknown = [key for key in values if key not in table]
        if unknown:
            raise UserError(f"{unknown[0]!r} is no setting of any objective; the settings are {', '.join(table)}")
        numbers = [*((table[key].flag, value) for key, value in values.items()), ("--repa-weight", repa_weight)]
        for flag, value in numbers:
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{flag} is {value}; give a finite number")
        for key, value in values.items():
            setting = table[key]
            if name not in setting.owners and value != setting.default:
                raise UserError(f"{setting.flag} {value} is a setting of --objective {' or '.join(setting.owners)}, "
                                f"not {name}; leave it at its default")
        own_names = {field.name for field in fields(own)}
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "settings", own(**{key: value for key, value in values.items() if key in own_names}))
        object.__setattr__(self, "repa_depth", repa_depth)
        object.__setattr__(self, "repa_weight", repa_weight)
        self.objective(learn_sigma=False, num_classes=1, class_dropout=0.0)  # checks the settings' values

    def stored(self) -> dict:
        """The config's "objective" entry: the name, every registered setting (this objective's values, the others'
        defaults) and REPA's."""
        own = asdict(self.settings)
        settings = {key: own.get(key, setting.default) for key, setting in objective_settings().items()}
        return {"name": self.name, **settings, "repa_depth": self.repa_depth, "repa_weight": self.repa_weight}

    def objective(self, learn_sigma: bool, num_classes: int, class_dropout: float,
                  guidance_interval: tuple[float, float] | None = None) -> Objective:
        """The training objective for a model of these properties."""
        from scalegen.diffusion.objectives import training_objective  # torch: not for the parsers

        return training_objective(self.name, {**asdict(self.settings), "learn_sigma": learn_sigma,
                                              "num_classes": num_classes, "class_dropout": class_dropout,
                                              "guidance_interval": guidance_interval})


@dataclass
class DiTOptions:
    """What a DiT run trains besides the loop settings (`TrainConfig`): the model, its latent space, its data.

    Fields:
        model: preset name ("DiT-S/2" … "DiT-XL/8"); depth / hidden_size / num_heads / patch_size override it.
        data: "fashion-mnist", a folder of its IDX files, or an ImageNet-style folder.
        image_size: image side in pixels.
        vae: a local SD-VAE folder or file: diffuse its latents; None (or "none") for pixel space.
        tokenizer: a `train vqvae` run: diffuse its quantized features instead (not with vae).
        latent_cache: encode the data set once into RUN/latents/ (every rank encodes its shards).
        block: the conditioning block ("adaln_zero", the paper's, or an ablation).
        norm, mlp, rope, qk_norm: LightningDiT's block options for the adaLN blocks ("rmsnorm" norms, a "swiglu"
            MLP, 2-D RoPE, QK-norm); the defaults are DiT's block (see `BlockOptions`).
        class_dropout: label dropout for classifier-free guidance.
        learn_sigma: predict the variance interpolation too (None: where the objective can, i.e. for ddpm).
        sample_steps, sample_cfg: the periodic sample grid's steps and guidance scale.
        init_from: start from these weights (an official .pt/.pth, a run or an export): fine-tuning.
        cfg_interval: (low, high) noise levels at which guidance applies, stored as the model's sampling default;
            a MeanFlow model also trains its guidance in only there. None: every step.
        objective: the objective and its settings, REPA's block and weight (`ObjectiveConfig`).
        repa_encoder: REPA's frozen encoder (`train classifier --export` file; None: no REPA); REPA aligns block
            `objective.repa_depth` (REPA_DEFAULT_DEPTH when that is 0).
        end_to_end: REPA-E: tune the KL tokenizer with the DiT (needs a `train kl` tokenizer and a REPA encoder).
        end_to_end_weight: REPA-E: the weight of the REPA loss that reaches the tokenizer.
        tokenizer_lr: REPA-E: the tokenizer's learning rate (None: the DiT's).
    """

    model: str = "DiT-S/2"
    data: str = FASHION_MNIST_NAME
    image_size: int = 32
    vae: str | None = None
    tokenizer: str | None = None
    latent_cache: bool = False
    block: str = "adaln_zero"
    norm: str = OFFICIAL_BLOCK.norm
    mlp: str = OFFICIAL_BLOCK.mlp
    rope: bool = OFFICIAL_BLOCK.rope
    qk_norm: bool = OFFICIAL_BLOCK.qk_norm
    class_dropout: float = 0.1
    learn_sigma: bool | None = None
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    sample_steps: int = 50
    sample_cfg: float = 4.0
    init_from: str | None = None
    cfg_interval: tuple[float, float] | None = None
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    repa_encoder: str | None = None
    end_to_end: bool = False
    end_to_end_weight: float = ALIGNMENT_WEIGHT
    tokenizer_lr: float | None = None

    @property
    def pixel_space(self) -> bool:
        return self.vae is None or self.vae.lower() == PIXEL_SPACE

    @property
    def learns_sigma(self) -> bool:
        from scalegen.diffusion.objectives import objective_class  # torch: not for the parsers

        return self.learn_sigma if self.learn_sigma is not None else objective_class(self.objective.name).learns_sigma

    def objective_config(self) -> ObjectiveConfig:
        """The run's `ObjectiveConfig`: REPA's block is 0 without an encoder, REPA_DEFAULT_DEPTH when unset."""
        if not self.repa_encoder:
            return replace(self.objective, repa_depth=0)
        return replace(self.objective, repa_depth=self.objective.repa_depth or REPA_DEFAULT_DEPTH)


@dataclass
class ReconstructionLosses:
    """Weights and schedule of the loss terms every tokenizer has: reconstruction, perceptual, patch GAN."""

    l1: float = 1.0
    l2: float = 1.0
    lpips: float = 1.0  # applies only with an LPIPS network (the options' lpips_weights)
    gan: float = 0.0
    gan_start_step: int = 0
    discriminator_width: int = 64
    discriminator_layers: int = 3
    discriminator_lr: float | None = None  # None: the tokenizer's own lr


@dataclass
class TokenizerLosses(ReconstructionLosses):
    """The VQ tokenizer's loss terms: the shared ones and the quantizer's."""

    quantizer: float = 1.0
    dead_code_every: int = 100  # re-initialise dead codes every N steps (0: never)


@dataclass
class VQVAEOptions:
    """What a tokenizer run trains besides the loop settings (`TrainConfig`): the tokenizer, its losses, its data.

    The architecture fields are `VQVAEConfig`'s (channels follow the data set); `use_attention` switches both the
    level and the middle attention blocks. `lpips_weights` is a local LPIPS-VGG state dict: it enables the perceptual
    loss, weighted by `losses.lpips`. `init_from` starts from these weights (a tokenizer run, export or official
    vae .pth): fine-tuning.
    """

    data: str = FASHION_MNIST_NAME
    image_size: int = 32
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    norm_groups: int = 32
    use_attention: bool = True
    vocab_size: int = 512
    z_channels: int = 16
    share_quant_resi: int = 4
    lpips_weights: str | None = None
    losses: TokenizerLosses = field(default_factory=TokenizerLosses)
    init_from: str | None = None


@dataclass
class KLLosses(ReconstructionLosses):
    """The KL tokenizer's loss terms: the shared ones, the KL divergence, VA-VAE's alignment.

    Fields (beyond `ReconstructionLosses`):
        kl: weight of the mean KL divergence per latent element.
        alignment: VA-VAE's hyper-weight of the alignment losses (0: no alignment; needs an encoder).
        adaptive_alignment: scale it by ‖∇L_rec‖ / ‖∇L_align‖ at the encoder's last conv (VA-VAE's adaptive weight).
        cosine_margin, distance_margin: VA-VAE's m₁ and m₂.
    """

    kl: float = 1e-6
    alignment: float = 0.0
    adaptive_alignment: bool = True
    cosine_margin: float = COSINE_MARGIN
    distance_margin: float = DISTANCE_MARGIN


@dataclass
class KLVAEOptions:
    """What a KL tokenizer run trains besides the loop settings (`TrainConfig`): the tokenizer, its losses, its data.

    The architecture fields are `KLVAEConfig`'s (channels and image size follow the data). `lpips_weights` is a local
    LPIPS-VGG state dict (the perceptual loss); `align_encoder` a REPA encoder file (`train classifier --export`),
    VA-VAE's alignment target (weight `losses.alignment`). `init_from` starts from these weights: fine-tuning.
    """

    data: str = FASHION_MNIST_NAME
    image_size: int = 32
    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    norm_groups: int = 8
    use_attention: bool = False
    latent_channels: int = 8
    lpips_weights: str | None = None
    align_encoder: str | None = None
    losses: KLLosses = field(default_factory=KLLosses)
    init_from: str | None = None


@dataclass
class VAROptions:
    """What a VAR run trains besides the loop settings (`TrainConfig`): the transformer, its tokenizer, its data.

    Fields:
        tokenizer: a `train vqvae` run, checkpoint or export, or an official vae .pth (copied into the run); for the
            flow head a KL tokenizer (`train kl`, or a DiT run on one), copied with its scale plan and normalisation.
        depth: blocks; width 64·depth and depth heads unless `width` / `num_heads` say otherwise.
        data, image_size: the data set; image_size None takes the tokenizer's.
        token_cache: tokenize the data set once into RUN/tokens/ (every rank tokenizes its shards).
        label_smoothing, label_dropout: the cross-entropy's smoothing and the class dropout for guidance.
        base_lr: the recipe's lr is base_lr · max(batch, 768) / 256.
        sample_cfg, sample_top_p: the periodic sample grid's guidance and nucleus.
        init_from: start from these weights (an official .pt/.pth, a run or an export): fine-tuning.
        attention: teacher forcing through "sdpa" (a dense block-causal mask, the official path) or "flex"
            (FlexAttention's block-sparse mask; GPU only for training, SDPA with a warning elsewhere).
        token_head: what the positions predict, a registered token head (`scalegen.models.token_heads`): "categorical"
            (VAR's, on a VQ tokenizer) or "flow" (continuous tokens, on a KL tokenizer: `models/flow_head.py`).
        patch_nums: with the flow head on a KL tokenizer, the token grid side per scale (None: 1,2,3,4,6,8,… up to the
            latent side); a VQ tokenizer has its own.
        head_width, head_blocks: the flow head's MLP: its width (None: the transformer's) and residual blocks.
        head_draws: the flow head's noise draws per token in training (MAR's diffusion batch multiplier): each
            token's loss is the mean over this many noises and times, the transformer run once.
        context_noise: xAR's noisy context, for a head of continuous tokens: in training, the tokens that make the
            teacher-forcing input are (1 − τ)·x + τ·ε with τ ~ U(0, context_noise) per image and scale (the targets
            stay clean), so the transformer learns from contexts as imperfect as its own samples; 0: clean; None:
            the head's recommendation (`TokenHead.context_noise`: the flow head's measured in bench/README.md).
    """

    tokenizer: str
    depth: int = 16
    width: int | None = None
    num_heads: int | None = None
    data: str = FASHION_MNIST_NAME
    image_size: int | None = None
    token_cache: bool = False
    label_smoothing: float = 0.0
    label_dropout: float = 0.1
    base_lr: float = VAR_BASE_LR
    sample_cfg: float = 4.0
    sample_top_p: float = 0.95
    init_from: str | None = None
    attention: AttentionBackend = "sdpa"
    token_head: str = CATEGORICAL_HEAD
    patch_nums: tuple[int, ...] | None = None
    head_width: int | None = None
    head_blocks: int = 3
    head_draws: int = 1
    context_noise: float | None = None


@dataclass
class ClassifierOptions:
    """What a classifier run trains besides the loop settings (`TrainConfig`).

    Fields:
        data: "fashion-mnist" or a folder of its four IDX files (the test split scores the result).
        width, feature_dim: the network (`ClassifierConfig`).
        export: after training, write the better of EMA/raw weights (fp16), the test-set statistics and a JSON card
            to this .safetensors file.
        command: the command line that ran, recorded on the card.
    """

    data: str = FASHION_MNIST_NAME
    width: int = ClassifierConfig.width
    feature_dim: int = ClassifierConfig.feature_dim
    export: str | None = None
    command: str | None = None
