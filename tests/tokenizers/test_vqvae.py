"""Tests of the VAR multi-scale VQVAE tokenizer (scalegen.vqvae, scalegen.quantizer, scalegen.vqvae_layers).

Golden data in tests/golden/vqvae_official_tiny_{weights,golden}.safetensors comes from the official VAR code
(github.com/FoundationVision/VAR, models/{basic_vae,quant,vqvae}.py) with a tiny config: the official VQVAE with
vocab 64, z_channels 8, ch 8, patch_nums (1,2,3,4,6,8), its Encoder/Decoder swapped for official ones with
ch_mult (1,2), num_res_blocks 1, GroupNorm default groups set to 4, weights rounded to float16. Produced by
    cd /tmp/official/VAR && PYTHONPATH=/tmp/official/VAR /tmp/offvenv/bin/python \
        /tmp/golden_vqvae/make_golden.py /work/main/tests/golden
(the generating script is kept outside the repository).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from scalegen.errors import UserError
from scalegen.tokenizers.quantizer import MultiScaleQuantizer, phi_indices
from scalegen.tokenizers.vqvae import VQVAE, VQVAEConfig, build_vqvae
from tests_support import GOLDEN

OFFICIAL_PARAMETERS = 108_948_355  # "108.95M": parameters only, the ema_vocab_hit_SV buffer is not counted
TINY_PATCH_NUMS = (1, 2, 3, 4, 6, 8)
GOLDEN_TOLERANCE = dict(rtol=0, atol=1e-5)


def official_tiny() -> VQVAE:
    """Our model in the configuration of the golden data, holding the official random weights."""
    model = build_vqvae(vocab_size=64, z_channels=8, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                        patch_nums=TINY_PATCH_NUMS, norm_groups=4)
    weights = {k: v.float() for k, v in load_file(GOLDEN / "vqvae_official_tiny_weights.safetensors").items()}
    model.load_state_dict(weights, strict=True)
    return model.eval()


def tiny(**overrides) -> VQVAE:
    torch.manual_seed(0)
    options = dict(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                   patch_nums=TINY_PATCH_NUMS, norm_groups=8)
    return build_vqvae(**{**options, **overrides})


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN / "vqvae_official_tiny_golden.safetensors")


def read_key_table(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            continue
        key, shape, _ = line.split("\t")
        rows.append((key, tuple(int(n) for n in shape.strip("()").split(",") if n.strip())))
    return rows


def test_full_size_state_dict_matches_official_keys_and_parameter_count():
    with torch.device("meta"):
        model = build_vqvae()
    ours = [(key, tuple(value.shape)) for key, value in model.state_dict().items()]
    assert ours == read_key_table(GOLDEN / "var_tokenizer_vae_ch160v4096z32.tsv")
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMETERS
    assert (model.patch_nums, model.vocab_size, model.z_channels, model.downsample_ratio) == (
        (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 4096, 32, 16)
    assert model.image_size == 256


def test_phi_tick_rule():
    assert phi_indices(10, 4) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    quantizer = MultiScaleQuantizer(16, 4, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), share_quant_resi=4)
    convs = list(quantizer.quant_resi.qresi_ls)
    assert [convs.index(quantizer.phi(k)) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert phi_indices(6, 6) == list(range(6))  # one φ per scale maps scale k to φ k


@pytest.mark.parametrize("share, phi_count, expected_keys", [
    (0, 0, {f"quant_resi.{k}.{p}" for k in range(6) for p in ("weight", "bias")}),
    (0, 3, {f"quant_resi.{k}.{p}" for k in range(3) for p in ("weight", "bias")}),
    (1, 0, {"quant_resi.qresi.weight", "quant_resi.qresi.bias"}),
])
def test_phi_variant_key_names(share, phi_count, expected_keys):
    quantizer = MultiScaleQuantizer(64, 8, TINY_PATCH_NUMS, share_quant_resi=share, phi_count=phi_count)
    assert set(quantizer.state_dict()) == expected_keys | {"ema_vocab_hit_SV", "embedding.weight"}


def test_quant_resi_zero_makes_phi_the_identity():
    quantizer = MultiScaleQuantizer(64, 8, TINY_PATCH_NUMS, quant_resi=0.0)
    h = torch.randn(2, 8, 8, 8)
    assert torch.equal(quantizer.phi(3)(h), h)


def test_golden_parity_with_official_code(golden):
    model = official_tiny()
    img = golden["img"]
    with torch.no_grad():
        torch.testing.assert_close(model.img_to_features(img), golden["features"], **GOLDEN_TOLERANCE)
        tokens = model.img_to_tokens(img)
        assert len(tokens) == len(TINY_PATCH_NUMS)
        for scale_index, scale_tokens in enumerate(tokens):
            assert scale_tokens.dtype == torch.long
            assert torch.equal(scale_tokens, golden[f"tokens.{scale_index}"])
        cumulative = model.quantize.tokens_to_features(tokens, all_scales=True)
        torch.testing.assert_close(cumulative[2], golden["f_hat.scale2"], **GOLDEN_TOLERANCE)
        torch.testing.assert_close(cumulative[-1], golden["f_hat"], **GOLDEN_TOLERANCE)
        torch.testing.assert_close(model.tokens_to_img(tokens), golden["tokens_to_img"], **GOLDEN_TOLERANCE)
        torch.testing.assert_close(model.tokens_to_var_input(tokens), golden["var_input"], **GOLDEN_TOLERANCE)

        f_hat = torch.zeros_like(golden["f_hat"])
        for scale_index, scale_tokens in enumerate(tokens):
            h = model.quantize.embed_tokens(scale_tokens)  # (B, C, p, p)
            f_hat, next_input = model.quantize.next_autoregressive_input(scale_index, f_hat, h)
            if scale_index == 1:
                torch.testing.assert_close(next_input, golden["ar_next_input.scale1"], **GOLDEN_TOLERANCE)
        torch.testing.assert_close(f_hat, golden["ar_f_hat"], **GOLDEN_TOLERANCE)

    model.train()
    reconstruction, quantizer_loss, vocab_hits = model(img)
    torch.testing.assert_close(reconstruction, golden["train_reconstruction"], **GOLDEN_TOLERANCE)
    torch.testing.assert_close(quantizer_loss.reshape(1), golden["train_vq_loss"], **GOLDEN_TOLERANCE)
    expected_hits = torch.stack([golden[f"tokens.{k}"].flatten().bincount(minlength=64) for k in range(6)])
    assert torch.equal(vocab_hits, expected_hits.float())


@pytest.mark.parametrize("variant, share, phi_count", [("nonshared", 0, 0), ("nonshared3", 0, 3), ("single", 1, 0)])
def test_golden_parity_of_phi_variants(golden, variant, share, phi_count):
    quantizer = MultiScaleQuantizer(64, 8, TINY_PATCH_NUMS, share_quant_resi=share, phi_count=phi_count)
    prefix = f"{variant}.state."
    state = {k[len(prefix):]: v.float() for k, v in golden.items() if k.startswith(prefix)}
    quantizer.load_state_dict(state, strict=True)
    with torch.no_grad():
        tokens = quantizer.features_to_tokens(golden["features"])
        for scale_index, scale_tokens in enumerate(tokens):
            assert torch.equal(scale_tokens, golden[f"{variant}.tokens.{scale_index}"])
        torch.testing.assert_close(quantizer.tokens_to_var_input(tokens), golden[f"{variant}.var_input"],
                                   **GOLDEN_TOLERANCE)


@torch.no_grad()
def test_scale_contributions_sum_to_f_hat_and_match_the_encoding_pass():
    quantizer = tiny().quantize
    f = torch.randn(3, 8, 8, 8)
    tokens = quantizer.features_to_tokens(f)
    cumulative = quantizer.tokens_to_features(tokens, all_scales=True)
    contributions = [quantizer.phi(k)(F.interpolate(quantizer.embed_tokens(t), size=(8, 8), mode="bicubic")
                                      if k < len(tokens) - 1 else quantizer.embed_tokens(t))
                     for k, t in enumerate(tokens)]
    torch.testing.assert_close(torch.stack(contributions).sum(0), cumulative[-1])
    torch.testing.assert_close(cumulative[-1], quantizer.tokens_to_features(tokens))
    # the straight-through f̂ of the training pass is the decoded f̂ of the same tokens
    torch.testing.assert_close(quantizer(f).f_hat, cumulative[-1])
    var_input = quantizer.tokens_to_var_input(tokens)
    assert var_input.shape == (3, sum(p * p for p in TINY_PATCH_NUMS) - 1, 8)
    # the 2x2 inputs of scale 1 are the 1x1 scale's f̂ averaged over 2x2 areas
    torch.testing.assert_close(var_input[:, :4], F.avg_pool2d(cumulative[0], 4).flatten(2).transpose(1, 2))


@torch.no_grad()
def test_tokens_are_a_fixed_point_of_single_scale_decode_encode():
    # With one scale and φ = identity, f̂ consists of codebook vectors, so re-quantizing it gives the same tokens.
    quantizer = MultiScaleQuantizer(64, 8, (4,), quant_resi=0.0)
    tokens = [torch.randint(0, 64, (2, 16))]
    assert torch.equal(quantizer.features_to_tokens(quantizer.tokens_to_features(tokens))[0], tokens[0])


@torch.no_grad()
def test_tokens_of_a_sample_do_not_depend_on_the_rest_of_the_batch():
    model = tiny().eval()
    img = torch.rand(3, 3, 16, 16) * 2 - 1
    together = model.img_to_tokens(img)
    alone = model.img_to_tokens(img[1:2])
    for batch_tokens, single_tokens in zip(together, alone):
        assert torch.equal(batch_tokens[1:2], single_tokens)


def test_straight_through_gradient_reaches_encoder_codebook_and_phi():
    model = tiny()
    f = torch.randn(2, 8, 8, 8, requires_grad=True)
    model.quantize(f).f_hat.sum().backward()
    assert torch.equal(f.grad, torch.ones_like(f))  # straight-through: d f̂ / d f = identity

    reconstruction, quantizer_loss, _ = model(torch.rand(2, 3, 16, 16) * 2 - 1)
    quantizer_loss.backward(retain_graph=True)
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # commitment term
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    assert model.quantize.phi(0).weight.grad.abs().sum() > 0
    model.zero_grad()
    reconstruction.square().mean().backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # through the straight-through estimator
    assert model.quantize.embedding.weight.grad is None  # codes learn from the quantizer loss only


def test_loss_decreases_when_training_a_tiny_tokenizer():
    model = tiny()
    batch = torch.rand(4, 3, 16, 16) * 2 - 1
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        reconstruction, quantizer_loss, vocab_hits = model(batch)
        loss = F.mse_loss(reconstruction, batch) + quantizer_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.quantize.record_usage(vocab_hits)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    usage = model.quantize.codebook_usage(min_hits=1e-3)
    assert usage.shape == (len(TINY_PATCH_NUMS),) and usage[-1] > 0


def test_usage_statistics():
    quantizer = MultiScaleQuantizer(4, 2, (1, 2))
    hits = torch.tensor([[2.0, 0, 0, 0], [1.0, 3.0, 0, 0]])
    quantizer.record_usage(hits)
    assert torch.equal(quantizer.ema_vocab_hit_SV, hits)  # the first update copies
    quantizer.record_usage(torch.zeros(2, 4))
    torch.testing.assert_close(quantizer.ema_vocab_hit_SV, 0.9 * hits)
    # EMA now [1.8, 0, 0, 0] and [0.9, 2.7, 0, 0]
    torch.testing.assert_close(quantizer.codebook_usage(min_hits=1.0), torch.tensor([25.0, 25.0]))
    assert quantizer.dead_codes(min_hits=1.0).tolist() == [False, False, True, True]


def test_config_rebuilds_the_model_and_other_scale_counts_load():
    model = tiny()
    stored = dataclasses.asdict(model.config)
    stored["patch_nums"] = list(stored["patch_nums"])  # as after a JSON round trip
    rebuilt = VQVAE(VQVAEConfig(**stored))
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert rebuilt.config == model.config
    # usage statistics of another scale schedule do not block loading the weights
    other = tiny(patch_nums=(1, 2, 4, 8))
    other.load_state_dict(model.state_dict(), strict=True)
    assert other.quantize.ema_vocab_hit_SV.shape == (4, 64)


def test_bad_input_raises_value_errors_and_bad_options_user_errors():
    # Tensors of the wrong shape are ValueErrors (raised in forward); bad build options are UserErrors.
    model = tiny()
    with pytest.raises(ValueError, match="not divisible"):
        model.img_to_tokens(torch.zeros(1, 3, 15, 15))
    with pytest.raises(ValueError, match="16x16"):
        model.img_to_tokens(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="expected"):
        model.img_to_tokens(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="scale 1"):
        model.tokens_to_img([torch.zeros(1, p * p + (k == 1), dtype=torch.long) for k, p in enumerate(TINY_PATCH_NUMS)])
    with pytest.raises(ValueError, match="need 6"):
        model.tokens_to_img([torch.zeros(1, 1, dtype=torch.long)])
    with pytest.raises(UserError, match="norm_groups"):
        build_vqvae(ch=20, ch_mult=(1, 2))
    with pytest.raises(UserError, match="unknown tokenizer option"):
        build_vqvae(chmult=(1, 2))
    with pytest.raises(UserError, match="patch_nums"):
        build_vqvae(patch_nums=(0, 2))


@torch.no_grad()
def test_tokenizing_under_bfloat16_autocast_keeps_float32_codes():
    model = tiny().eval()
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = model.img_to_tokens(img)
        var_input = model.tokens_to_var_input(tokens)
    assert [t.shape for t in tokens] == [(2, p * p) for p in TINY_PATCH_NUMS]
    assert all(t.dtype == torch.long and t.max() < 64 for t in tokens)
    assert var_input.shape == (2, sum(p * p for p in TINY_PATCH_NUMS) - 1, 8)
