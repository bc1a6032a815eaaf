"""The VAR token-head seam (`scalegen.models.token_heads`): a toy head registered from this file alone trains, caches
its tokens, loads and generates through the public API; VAR's categorical head keeps the official keys (its outputs'
parity with the official code is test_var.py's); the registry refuses an unknown head in one line."""
from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import nn

from scalegen.data.store import CachedArrays
from scalegen.errors import UserError
from scalegen.models.token_heads import (
    CategoricalHead, HeadLoss, ScaleDraw, ScaleGuidance, TokenHead, build_token_head, register_token_head,
)
from scalegen.models.var import VAR, VARConfig
from scalegen.runs.folder import RunFolder
from scalegen.runs.loading import load_var
from scalegen.train.run_log import read_log
from scalegen.train.task_options import VAROptions
from scalegen.train.trainer import TrainConfig
from scalegen.train.var_task import train_var
from tests_support import write_fashion_subset
from test_var_training import TINY_VAR, tokenizer_folder

TOY = "toy-regression"
CFG = 2.0


@register_token_head(TOY)
class RegressionHead(TokenHead):
    """Predicts each position's codebook vector (MSE), guides the vectors linearly, draws the nearest codebook entry;
    its tokens are the tokenizer's ids, cached as int32 (VAR's head would store int16 for this vocabulary)."""

    strengths: list[float] = []  # every guidance strength asked of the head, in order

    def layers(self) -> dict[str, nn.Module]:
        return {"feature_head": nn.Linear(self.config.width, self.config.z_channels)}

    def initialize(self, model: nn.Module) -> None:
        pass  # the VAR's truncated-normal init is enough

    def output(self, model: nn.Module, hidden: torch.Tensor, cond: torch.Tensor,
               targets: torch.Tensor | None = None) -> torch.Tensor:
        return model.feature_head(hidden.float())  # (B, l, Cvae)

    def loss(self, model: nn.Module, output: torch.Tensor, targets: torch.Tensor,
             label_smoothing: float = 0.0) -> HeadLoss:
        codebook = model.tokenizer.quantize.embedding
        per_position = (output - codebook(targets)).square().mean(-1)  # (B, L)
        return HeadLoss(per_position, {"nearest": (nearest_codes(codebook, output) == targets).float()})

    def targets(self, tokenizer: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
        return tokenizer.img_to_tokens(images)

    def var_input(self, tokenizer: nn.Module, targets: Sequence[torch.Tensor]) -> torch.Tensor:
        return tokenizer.tokens_to_var_input(targets)

    def cache_dtype(self, tokenizer: nn.Module) -> torch.dtype:
        return torch.int32

    def guide(self, both: torch.Tensor, strength: float) -> torch.Tensor:
        self.strengths.append(strength)
        batch = both.shape[0] // 2
        return both[:batch] + strength * (both[:batch] - both[batch:])  # (B, l, Cvae)

    def sampler(self, model: nn.Module, settings, generator: torch.Generator | None) -> NearestCodeSampler:
        return NearestCodeSampler(model.tokenizer.quantize.embedding)

    def features_per_scale(self, tokenizer: nn.Module, tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return tokenizer.quantize.tokens_to_features(tokens, all_scales=True)


def nearest_codes(codebook: nn.Embedding, vectors: torch.Tensor) -> torch.Tensor:
    """The id (B, l) of the codebook entry nearest to each vector (B, l, Cvae)."""
    return torch.cdist(vectors, codebook.weight.expand(vectors.shape[0], -1, -1)).argmin(-1)  # (B, l)


class NearestCodeSampler:
    def __init__(self, codebook: nn.Embedding) -> None:
        self.codebook = codebook

    def sample(self, both: torch.Tensor, guidance: ScaleGuidance, scale_index: int) -> ScaleDraw:
        guided = guidance.combine(both, scale_index)  # (B, l, Cvae)
        tokens = nearest_codes(self.codebook, guided)  # (B, l)
        return ScaleDraw(tokens, self.codebook(tokens), guided)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.codebook(tokens)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A tiny VAR with the toy head trained a few steps by `train_var`, with a token cache, and loaded back."""
    root = tmp_path_factory.mktemp("toy")
    tokenizer_folder(root / "vq")
    write_fashion_subset(root / "data")
    options = VAROptions(tokenizer=str(root / "vq"), depth=1, width=32, num_heads=2, data=str(root / "data"),
                         token_cache=True, sample_cfg=CFG, token_head=TOY)
    train_var(options, TrainConfig(out=str(root / "var"), steps=12, batch_size=16, lr=3e-3, warmup_steps=0,
                                   log_every=1, device="cpu"))
    return root / "var", load_var(root / "var")


def test_a_toy_head_trains_through_its_loss_and_caches_its_own_tokens(toy_run) -> None:
    run, model = toy_run
    rows = read_log(run)
    assert sum(row["loss"] for row in rows[-3:]) < sum(row["loss"] for row in rows[:3])
    assert {"nearest", "loss_4x4", "nearest_4x4"} <= set(rows[-1]) and "accuracy" not in rows[-1]
    cached = CachedArrays(RunFolder(run).token_cache)
    assert cached.row("tokens", 0, False).dtype == torch.int32  # the head's cache dtype, not VAR's int16
    assert model.config.token_head == TOY and isinstance(model.token_head, RegressionHead)
    assert {name for name in model.state_dict() if "head" in name} == {"feature_head.weight", "feature_head.bias"}


def test_a_toy_head_generates_with_its_own_guidance_and_draws(toy_run) -> None:
    _, model = toy_run
    RegressionHead.strengths.clear()
    sampled = model.generate_tokens([0, 1, 2], cfg=CFG, seed=0)
    scales = len(model.patch_nums)
    assert RegressionHead.strengths == [CFG * index / (scales - 1) for index in range(scales)]
    codebook = model.tokenizer.quantize.embedding
    for tokens, guided, patch in zip(sampled.tokens, sampled.logits, model.patch_nums):
        assert guided.shape == (3, patch * patch, model.config.z_channels)  # vectors, not logits
        assert torch.equal(tokens, nearest_codes(codebook, guided))
    images = model.generate([0, 1, 2], cfg=CFG, seed=0)
    assert images.shape == (3, 1, 8, 8) and 0 <= float(images.min()) <= float(images.max()) <= 1
    keep = torch.zeros(4, 4)
    keep[:, :2] = 1  # keep the left half
    source = [torch.randint(0, TINY_VAR["vocab_size"], (1, patch * patch)) for patch in model.patch_nums]
    edited = model.generate_tokens([3], source_tokens=source, keep_mask=keep, seed=0)
    kept = keep.flatten().bool()
    assert torch.equal(edited.tokens[-1][:, kept], source[-1][:, kept])


def test_vars_head_keeps_the_official_keys_and_is_the_default() -> None:
    config = VARConfig(**TINY_VAR)
    assert config.token_head == "categorical" and isinstance(build_token_head(config), CategoricalHead)
    names = {name for name in VAR(config).state_dict() if name.startswith("head")}
    assert names == {"head_nm.ada_lin.1.weight", "head_nm.ada_lin.1.bias", "head.weight", "head.bias"}


def test_an_unknown_head_is_a_one_line_error_and_a_name_is_registered_once() -> None:
    with pytest.raises(UserError, match="unknown VAR token head 'diffusion'.*categorical.*flow.*toy-regression") as raised:
        VAR(VARConfig(**TINY_VAR, token_head="diffusion"))
    assert "\n" not in str(raised.value)
    with pytest.raises(ValueError, match="registered already"):
        register_token_head(TOY)(CategoricalHead)
