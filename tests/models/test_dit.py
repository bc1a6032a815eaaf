"""DiT model: official layout and outputs, presets, CFG, conditioning-block ablation."""
import pytest
import torch
from safetensors.torch import load_file

import scalegen
from scalegen.models.dit import preset_config
from scalegen.models.settings import PRESETS
from scalegen.errors import UserError
from tests_support import GOLDEN

# Official parameter counts at 256px (latent 32), computed from the presets as the official models.py builds them.
OFFICIAL_XL2_PARAMETERS = 675_129_632


def tiny_dit(**overrides) -> scalegen.DiT:
    """The configuration of tests/golden/dit_tiny_official.safetensors (hidden 32, depth 2, 2 heads, patch 2)."""
    options = dict(input_size=8, num_classes=10, hidden_size=32, depth=2, num_heads=2)
    options.update(overrides)
    return scalegen.build_dit("DiT-S/2", **options)


def parameter_count(preset: str, input_size: int = 32) -> int:
    with torch.device("meta"):
        model = scalegen.build_dit(preset, input_size=input_size)
    return sum(parameter.numel() for parameter in model.parameters())


def test_xl2_state_dict_matches_the_official_key_list():
    rows = [line.rstrip("\n").split("\t") for line in open(GOLDEN / "dit_xl2_256.tsv") if not line.startswith("#")]
    expected = {name: shape for name, shape, _ in rows}
    with torch.device("meta"):
        model = scalegen.build_dit("DiT-XL/2", input_size=32, num_classes=1000)
    actual = {name: str(tuple(tensor.shape)) for name, tensor in model.state_dict().items()}
    assert actual == expected
    assert sum(parameter.numel() for parameter in model.parameters()) == OFFICIAL_XL2_PARAMETERS
    assert not model.pos_embed.requires_grad


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_has_the_expected_shapes(preset):
    config = preset_config(preset, input_size=32)
    with torch.device("meta"):
        model = scalegen.build_dit(preset, input_size=32)
    tokens = (32 // config.patch_size) ** 2
    assert model.pos_embed.shape == (1, tokens, config.hidden_size)
    assert len(model.blocks) == config.depth
    assert model.final_layer.linear.out_features == config.patch_size**2 * 8
    # 12 D² per block from attention + MLP dominate: the count grows with depth·D² as the paper's sizes do.
    assert parameter_count(preset) > 12 * config.depth * config.hidden_size**2


def test_forward_and_cfg_equal_the_official_model():
    golden = load_file(GOLDEN / "dit_tiny_golden.safetensors")
    model = tiny_dit()
    model.load_state_dict(load_file(GOLDEN / "dit_tiny_official.safetensors"), strict=True)
    model.eval()
    with torch.no_grad():
        output = model(golden["x"], golden["t"], golden["y"])
        guided = model.forward_with_cfg(golden["x"], golden["t"], golden["y"], 4.0)
    torch.testing.assert_close(output, golden["out"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided, golden["cfg_out"], atol=1e-5, rtol=1e-5)


def test_zero_output_at_initialisation():
    model = tiny_dit().eval()
    output = model(torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 1, 2]))
    assert output.shape == (3, 8, 8, 8)
    assert torch.count_nonzero(output) == 0


def randomised(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


def test_cfg_scale_one_equals_the_conditional_output():
    model = randomised(tiny_dit())
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 700])
    y = torch.tensor([3, 5])
    doubled = torch.cat([x, x])
    labels = torch.cat([y, torch.full_like(y, 10)])
    for all_channels in (False, True):
        guided = model.forward_with_cfg(doubled, torch.cat([t, t]), labels, 1.0, guide_all_channels=all_channels)
        torch.testing.assert_close(guided[:2], model(x, t, y), atol=1e-5, rtol=1e-5)


def test_official_guidance_touches_only_three_channels():
    model = randomised(tiny_dit())
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 10])
    y = torch.tensor([3, 10])
    official = model.forward_with_cfg(x, t, y, 5.0)
    every = model.forward_with_cfg(x, t, y, 5.0, guide_all_channels=True)
    torch.testing.assert_close(official[:, :3], every[:, :3])
    assert not torch.allclose(official[:, 3], every[:, 3])
    torch.testing.assert_close(official[:, 4:], every[:, 4:])


def test_label_dropout_only_in_training():
    model = randomised(tiny_dit(class_dropout_prob=0.5))
    x, t, y = torch.randn(64, 4, 8, 8), torch.full((64,), 100), torch.zeros(64, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), model(x, t, y))
        model.train()
        torch.manual_seed(0)
        trained = model(x, t, y)
        model.eval()
        evaluated = model(x, t, y)
    differs = (trained - evaluated).flatten(1).abs().amax(1) > 1e-6
    assert 10 < differs.sum() < 54  # about half the labels dropped to the null class


@pytest.mark.parametrize("block", ["adaln", "in_context", "cross_attention"])
def test_ablation_blocks_run_and_learn(block):
    torch.manual_seed(0)
    model = tiny_dit(block=block)
    x, t, y = torch.randn(4, 4, 8, 8), torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 3])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = (model(x, t, y) - 1.0).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9


def test_gradient_checkpointing_gives_the_same_gradients():
    model = randomised(tiny_dit()).train()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 6]), torch.tensor([1, 2])
    gradients = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        torch.manual_seed(0)
        model(x, t, y).square().mean().backward()
        gradients.append(model.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(gradients[0], gradients[1])


def test_unknown_preset_is_a_one_line_error():
    with pytest.raises(UserError, match="unknown DiT preset 'DiT-M/2'"):
        scalegen.build_dit("DiT-M/2")


def test_grayscale_guidance_never_touches_the_variance_channel():
    model = randomised(tiny_dit(in_channels=1))
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 10]), torch.tensor([3, 10])
    guided = model.forward_with_cfg(x, t, y, 5.0)
    plain = model(torch.cat([x[:1], x[:1]]), t, y)
    torch.testing.assert_close(guided[:, 1], plain[:, 1])  # v passes through unguided
    assert not torch.allclose(guided[:, 0], plain[:, 0])
