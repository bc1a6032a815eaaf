"""The continuous multi-scale tokenizer (`scalegen.tokenizers.continuous_scales`): VAR's residual plan without a
quantizer gives the latent back (float64), FlowAR's plan ends at the latent itself, the teacher-forcing input is the
quantizer's recipe on continuous tokens, the kind is registered (its config and weights round-trip), the latents'
normalisation and each scale's spread are measured deterministically (the tokens then have unit size per scale and
still give the latent back), and bad scales are one-line errors."""
import pytest
import torch
import torch.nn.functional as F

from scalegen.errors import UserError
from scalegen.files import json_config
from scalegen.tokenizers.codec import kind_of, registered_kind
from scalegen.tokenizers.continuous_scales import (
    ContinuousScalePlan, ContinuousScales, ContinuousScalesConfig, default_patch_nums, measure_mean_normalization,
    measure_token_scales,
)
from scalegen.tokenizers.kl_vae import KLVAE, LatentNormalization
from tests_support import tiny_fashion
from test_kl_tokenizer import TINY_KL, tiny_images

PATCH_NUMS = (1, 2, 3, 4, 6, 8)


def latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)  # (B, c, H, W)


def test_the_residual_plan_gives_the_latent_back_in_float64() -> None:
    f = latents()
    plan = ContinuousScalePlan(3, PATCH_NUMS, "residual")
    tokens = plan.features_to_tokens(f)
    assert [tuple(scale.shape) for scale in tokens] == [(2, side * side, 3) for side in PATCH_NUMS]
    cumulative = plan.tokens_to_features(tokens, all_scales=True)
    error = (cumulative[-1] - f).abs().max().item()
    assert error <= 8 * torch.finfo(torch.float64).eps * f.abs().max().item()  # one subtraction and one addition
    # each scale explains part of what is left (the coarse scales explain less than everything)
    left = [(f - f_hat).square().sum().item() for f_hat in cumulative]
    assert all(earlier > later for earlier, later in zip(left, left[1:])) and left[0] < f.square().sum().item()
    # each scale's tokens are the area-downsampled residual after the scales before
    residual = f - cumulative[2]
    assert torch.equal(tokens[3], F.interpolate(residual, size=(4, 4), mode="area").flatten(2).transpose(1, 2))


def test_flowars_plan_ends_at_the_latent_and_each_scale_is_the_latent_downsampled() -> None:
    f = latents(1)
    plan = ContinuousScalePlan(3, PATCH_NUMS, "downsampled")
    tokens = plan.features_to_tokens(f)
    assert torch.equal(plan.tokens_to_features(tokens), f)
    assert torch.equal(tokens[2], F.interpolate(f, size=(3, 3), mode="area").flatten(2).transpose(1, 2))


@pytest.mark.parametrize("plan_name", ["residual", "downsampled"])
def test_the_teacher_forcing_input_is_the_accumulated_latent_downsampled_to_the_next_scale(plan_name) -> None:
    f = latents(2)
    plan = ContinuousScalePlan(3, PATCH_NUMS, plan_name)
    tokens = plan.features_to_tokens(f)
    cumulative = plan.tokens_to_features(tokens, all_scales=True)
    expected = torch.cat([F.interpolate(f_hat, size=(side, side), mode="area").flatten(2).transpose(1, 2)
                          for f_hat, side in zip(cumulative, PATCH_NUMS[1:])], dim=1)  # (B, L - 1, c)
    assert torch.equal(plan.tokens_to_var_input(tokens), expected)


def test_the_kind_is_registered_and_its_config_and_weights_round_trip() -> None:
    torch.manual_seed(0)
    vae = KLVAE(TINY_KL).eval()
    normalization = LatentNormalization(torch.tensor([0.5, -1.0, 0.0, 2.0]), torch.tensor([2.0, 0.5, 1.0, 4.0]))
    tokenizer = ContinuousScales.from_kl(vae, normalization, (1, 2, 4)).eval()
    kind = kind_of(tokenizer)
    assert kind.name == "klscales" and kind.serves_var and kind.continuous and kind.codec_class is None
    rebuilt = registered_kind(kind.name).model_class(ContinuousScalesConfig(**json_config(tokenizer.config)))
    rebuilt.load_state_dict(tokenizer.state_dict(), strict=True)
    images = tiny_images()
    tokens = tokenizer.img_to_tokens(images)
    assert [tuple(scale.shape) for scale in tokens] == [(4, 1, 4), (4, 4, 4), (4, 16, 4)]
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(tokens, rebuilt.img_to_tokens(images)))
    assert tokenizer.vocab_size == 0 and tokenizer.z_channels == 4 and tokenizer.image_size == 8
    # the tokens are the normalised posterior means: all scales together decode as the posterior mean does
    decoded = vae.decode(vae.encode_moments(images)[0]).clamp(-1, 1)
    torch.testing.assert_close(kind.round_trip(tokenizer, images), decoded, atol=1e-5, rtol=0)


def test_the_normalisation_is_measured_from_posterior_means_deterministically() -> None:
    torch.manual_seed(0)
    vae = KLVAE(TINY_KL).eval()
    data = tiny_fashion(8)
    first, second = measure_mean_normalization(vae, data), measure_mean_normalization(vae, data)
    assert torch.equal(first.shift, second.shift) and torch.equal(first.scale, second.scale)
    images = torch.stack([data[(index, False)]["image"] for index in range(len(data))])
    normalised = first(vae.encode_moments(images)[0]).double().transpose(0, 1).flatten(1)  # (c, N·h·w)
    assert normalised.mean(1).abs().max().item() < 1e-5
    assert (normalised.std(1) - 1).abs().max().item() < 1e-5


@pytest.mark.parametrize("plan_name", ["residual", "downsampled"])
def test_tokens_are_divided_by_their_scales_spread_and_the_latent_still_comes_back(plan_name) -> None:
    f = latents(3)
    unit, spread = ContinuousScalePlan(3, PATCH_NUMS, plan_name), ContinuousScalePlan(3, PATCH_NUMS, plan_name)
    spread.token_scale.copy_(torch.tensor([0.5, 2.0, 0.25, 4.0, 0.125, 3.0]))
    tokens, unit_tokens = spread.features_to_tokens(f), unit.features_to_tokens(f)
    for scale, (scaled, plain) in enumerate(zip(tokens, unit_tokens)):
        torch.testing.assert_close(scaled * spread.token_scale[scale].double(), plain, rtol=4e-16, atol=0)
    bound = 8 * torch.finfo(torch.float64).eps * f.abs().max().item()
    assert (spread.tokens_to_features(tokens) - f).abs().max().item() <= bound
    assert (spread.tokens_to_var_input(tokens) - unit.tokens_to_var_input(unit_tokens)).abs().max().item() <= bound


def test_each_scales_spread_is_measured_so_its_tokens_have_unit_size() -> None:
    torch.manual_seed(0)
    vae = KLVAE(TINY_KL).eval()
    data = tiny_fashion(8)
    tokenizer = ContinuousScales.from_kl(vae, measure_mean_normalization(vae, data), (1, 2, 4)).eval()
    spread = measure_token_scales(tokenizer, data)
    assert torch.equal(spread, measure_token_scales(tokenizer, data)) and spread.shape == (3,)
    assert (spread != 1).all()  # measured before any scale is set, so not the identity's
    tokenizer.quantize.token_scale.copy_(spread)
    images = torch.stack([data[(index, False)]["image"] for index in range(len(data))])
    for scale_tokens in tokenizer.img_to_tokens(images):
        assert abs(scale_tokens.double().square().mean().sqrt().item() - 1) < 1e-5


def test_bad_scales_are_one_line_errors() -> None:
    assert default_patch_nums(8) == PATCH_NUMS and default_patch_nums(4) == (1, 2, 3, 4)
    fields = {name: getattr(TINY_KL, name) for name in vars(TINY_KL)}
    for patch_nums in [(1, 2), (2, 1, 4), (0, 4)]:
        with pytest.raises(UserError, match="must grow from 1 or more and end at the latent side 4") as raised:
            ContinuousScalesConfig(**fields, patch_nums=patch_nums)
        assert "\n" not in str(raised.value)
    with pytest.raises(UserError, match="unknown scale plan 'pyramid'"):
        ContinuousScalesConfig(**fields, patch_nums=(1, 4), plan="pyramid")
