"""LightningDiT's block options (RMSNorm, SwiGLU, 2-D RoPE, QK-norm): off, the DiT is the official one bit for bit
(keys and outputs); each option changes what it should; RoPE is a relative rotation; QK-norm normalises; a DiT with
all four trains, saves and loads back exactly; the analytic MACs count them; diffusers' export refuses them."""
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F

from scalegen import load_dit
from scalegen.cli.main import build_parser
from scalegen.errors import UserError
from scalegen.eval.flops import counted_flops, dit_config_macs, dit_forward_macs
from scalegen.models.dit import DiT, DiTConfig
from scalegen.models.dit_blocks import OFFICIAL_BLOCK, AdaLNBlock, BlockOptions
from scalegen.models.layers import Attention, Mlp, RotaryEmbedding2d, SwiGLU, modulate, swiglu_hidden_size
from scalegen.runs.folder import save_checkpoint
from scalegen.train.dit_task import DiTOptions, DiTTask, dit_model_config
from scalegen.train.run_log import read_log
from scalegen.train.trainer import TrainConfig, train
from tests_support import tiny_fashion, user_error

TINY = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
ALL_OPTIONS = {"norm": "rmsnorm", "mlp": "swiglu", "rope": True, "qk_norm": True}
OFFICIAL_BLOCK_KEYS = {"adaLN_modulation.1.weight", "adaLN_modulation.1.bias", "attn.qkv.weight", "attn.qkv.bias",
                       "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
                       "mlp.fc2.bias"}
WEIGHT_STD, QKV_STD = 0.05, 0.3  # attention sharp enough for positions to matter


def seeded_dit(config: DiTConfig, shared: dict[str, torch.Tensor] | None = None) -> DiT:
    """A DiT whose zero-initialised layers are made to count (random weights), taking the tensors of `shared` that
    fit, so that two DiTs differ in what their options add or reshape only."""
    torch.manual_seed(0)
    model = DiT(config).eval()
    generator = torch.Generator().manual_seed(1)
    for name, parameter in model.named_parameters():
        if name != "pos_embed":
            parameter.data.normal_(0, QKV_STD if "qkv" in name else WEIGHT_STD, generator=generator)
            if shared is not None and name in shared and shared[name].shape == parameter.shape:
                parameter.data.copy_(shared[name])
    return model


def inputs(config: DiTConfig, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=generator)  # (B, C, H, W)
    return x, torch.tensor([1, 500, 999][:batch]), torch.tensor([0, 3, 7][:batch])


def block_keys(model: DiT) -> set[str]:
    return {name.split(".", 2)[2] for name in model.state_dict() if name.startswith("blocks.")}


def test_the_default_dit_is_the_official_one_bit_for_bit():
    default, explicit = seeded_dit(TINY), seeded_dit(replace(TINY, **asdict(OFFICIAL_BLOCK)))
    assert block_keys(default) == OFFICIAL_BLOCK_KEYS
    assert list(default.state_dict()) == list(explicit.state_dict())
    x, t, y = inputs(TINY)
    with torch.no_grad():
        assert torch.equal(default(x, t, y), explicit(x, t, y))
    # The official block, written out as DiT's models.py computes it (timm's attention through SDPA, tanh-GELU MLP).
    block, condition = default.blocks[0], torch.randn(3, TINY.hidden_size)  # (B, D)
    tokens = torch.randn(3, 16, TINY.hidden_size)  # (B, T, D)
    assert torch.equal(block(tokens, condition), official_block(block, tokens, condition))


def official_block(block: AdaLNBlock, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(condition).chunk(6, dim=1)
    normed = modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift_msa, scale_msa)  # (B, T, D)
    batch, tokens, dim = x.shape
    heads = block.attn.num_heads
    qkv = block.attn.qkv(normed).reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    attended = F.scaled_dot_product_attention(*qkv.unbind(0)).transpose(1, 2).reshape(batch, tokens, dim)
    x = x + gate_msa.unsqueeze(1) * block.attn.proj(attended)  # (B, T, D)
    normed = modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift_mlp, scale_mlp)  # (B, T, D)
    mlp = block.mlp.fc2(F.gelu(block.mlp.fc1(normed), approximate="tanh"))  # (B, T, D)
    return x + gate_mlp.unsqueeze(1) * mlp


@pytest.mark.parametrize("option, value", ALL_OPTIONS.items())
def test_each_option_changes_the_output_and_the_keys_it_should(option, value):
    default = seeded_dit(TINY)
    changed = seeded_dit(replace(TINY, **{option: value}), default.state_dict())
    x, t, y = inputs(TINY)
    with torch.no_grad():
        difference = (changed(x, t, y) - default(x, t, y)).abs().max()
    assert difference > 1e-3
    extra = {"attn.q_norm.weight", "attn.k_norm.weight"} if option == "qk_norm" else set()
    assert block_keys(changed) == OFFICIAL_BLOCK_KEYS | extra  # RMSNorm is affine-free; RoPE's tables are no state
    hidden = swiglu_hidden_size(TINY.hidden_size, TINY.mlp_ratio) if option == "mlp" else 4 * TINY.hidden_size
    assert changed.blocks[0].mlp.fc1.weight.shape == (hidden * (2 if option == "mlp" else 1), TINY.hidden_size)
    assert changed.blocks[0].mlp.fc2.weight.shape == (TINY.hidden_size, hidden)


def test_rope_is_a_norm_preserving_rotation_that_sees_only_position_offsets():
    grid, head_dim = 6, 16
    rope = RotaryEmbedding2d(head_dim, grid)
    x = torch.randn(2, 3, grid * grid, head_dim)  # (B, H, T, d)
    rotated = rope(x)  # (B, H, T, d)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    # The first half of the head turns with the row, the second with the column; the first token is not turned.
    torch.testing.assert_close(rotated[:, :, :grid, : head_dim // 2], x[:, :, :grid, : head_dim // 2])
    torch.testing.assert_close(rotated[:, :, ::grid, head_dim // 2 :], x[:, :, ::grid, head_dim // 2 :])
    torch.testing.assert_close(rotated[:, :, 0], x[:, :, 0])
    # One query and one key, placed at every position: their score depends only on the 2-D offset.
    query, key = torch.randn(2, head_dim)  # 2 × (d,)
    scores = rope(query.expand(grid * grid, -1)) @ rope(key.expand(grid * grid, -1)).T  # (T, T)
    scores = scores.reshape(grid, grid, grid, grid)  # (row_q, column_q, row_k, column_k)
    shift_row, shift_column, span = 2, 1, grid - 2
    torch.testing.assert_close(scores[:span, :span, :span, :span],
                               scores[shift_row:span + shift_row, shift_column:span + shift_column,
                                      shift_row:span + shift_row, shift_column:span + shift_column])
    assert (scores[0, 0, 0, 1] - scores[0, 0, 1, 0]).abs() > 1e-6  # row and column offsets are told apart


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 32)  # (B, T, D)
    for qk_norm in (False, True):
        attention = Attention(32, 2, qk_norm=qk_norm, rope_grid_size=4)
        with torch.no_grad():
            before = attention(x)
            attention.qkv.weight[:64] *= 7  # queries and keys, not values
            attention.qkv.bias[:64] *= 7
            after = attention(x)
        assert torch.allclose(before, after, atol=1e-5) == qk_norm


def test_swiglu_has_about_the_gelu_mlp_s_parameters_and_lightningdit_s_width():
    dim = 384
    hidden = swiglu_hidden_size(dim, 4.0)
    assert hidden == 1024  # int(2/3 · 1536)
    swiglu, gelu = SwiGLU(dim, hidden), Mlp(dim, 4 * dim)
    count = sum(parameter.numel() for parameter in swiglu.parameters())
    assert count == dim * 2 * hidden + 2 * hidden + hidden * dim + dim
    assert count == pytest.approx(sum(parameter.numel() for parameter in gelu.parameters()), rel=0.01)


def test_options_are_checked_in_one_line():
    for bad, expected in [({"norm": "batchnorm"}, "unknown norm"), ({"mlp": "relu"}, "unknown mlp"),
                          ({"block": "in_context", "rope": True}, "apply to the adaln_zero and adaln blocks"),
                          ({"block": "cross_attention", "mlp": "swiglu"}, "drop them or use --block adaln_zero"),
                          ({"hidden_size": 36, "num_heads": 6, "rope": True}, "divisible by 4")]:
        with pytest.raises(UserError, match=expected) as raised:
            DiT(replace(TINY, **bad))
        assert "\n" not in str(raised.value)
    DiT(replace(TINY, block="adaln", **ALL_OPTIONS))  # both adaLN kinds take them


def test_the_train_flags_reach_the_model_config():
    args = build_parser(["train"]).parse_args(["train", "dit", "--out", "run", "--steps", "1", "--norm", "rmsnorm",
                                               "--mlp", "swiglu", "--rope", "--qk-norm"])
    config = dit_model_config(DiTOptions(**{name: getattr(args, name) for name in ALL_OPTIONS}), 8, 1, 10)
    assert BlockOptions(config.norm, config.mlp, config.rope, config.qk_norm) == BlockOptions(**ALL_OPTIONS)
    default = dit_model_config(DiTOptions(), 8, 1, 10)
    assert BlockOptions(default.norm, default.mlp, default.rope, default.qk_norm) == OFFICIAL_BLOCK


def test_a_dit_with_all_four_options_trains_and_loads_back(tmp_path):
    torch.manual_seed(0)
    config = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                       num_classes=10, **ALL_OPTIONS)
    train(DiTTask(config, sample_steps=2), tiny_fashion(), TrainConfig(out=str(tmp_path), steps=40, batch_size=16,
                                                                     lr=2e-3, log_every=1, device="cpu"))
    losses = [row["loss"] for row in read_log(tmp_path)]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:5]) / 5
    model = load_dit(tmp_path)
    assert {name: getattr(model.config, name) for name in ALL_OPTIONS} == ALL_OPTIONS


def test_a_saved_run_with_the_options_loads_with_identical_outputs(tmp_path):
    config = replace(TINY, **ALL_OPTIONS)
    model = seeded_dit(config)
    stored = {"kind": "dit", "model": asdict(config), "objective": {"name": "ddpm"}}
    save_checkpoint(tmp_path, 1, stored, model.state_dict(), model.state_dict(), {"step": 1})
    loaded = load_dit(tmp_path, vae="none")
    x, t, y = inputs(config)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))


def test_the_analytic_macs_count_each_option():
    default = dit_config_macs(TINY)
    assert default == dit_forward_macs(TINY.depth, TINY.hidden_size, TINY.patch_size, TINY.input_size)
    tokens, dim, depth = (TINY.input_size // TINY.patch_size) ** 2, TINY.hidden_size, TINY.depth
    macs = {option: dit_config_macs(replace(TINY, **{option: value})) - default
            for option, value in ALL_OPTIONS.items()}
    assert macs["norm"] == -depth * 2 * 2 * tokens * dim  # two norms lose LayerNorm's mean and subtraction
    assert macs["qk_norm"] == depth * 3 * 2 * tokens * dim  # RMS (2) + weight (1) on queries and keys
    assert macs["rope"] == depth * 2 * 2 * tokens * dim  # a 2×2 rotation per channel pair of queries and keys
    swiglu_mlp = 3 * dim * swiglu_hidden_size(dim, TINY.mlp_ratio)
    assert macs["mlp"] == depth * tokens * (swiglu_mlp - 2 * dim * 4 * dim)
    wide = replace(TINY, hidden_size=384, num_heads=6)  # at DiT-S width 2/3 · 4 is exact: the same matmul MACs
    assert dit_config_macs(replace(wide, mlp="swiglu")) == dit_config_macs(wide)
    # The matmul part of the difference is what torch's counter measures (2 FLOPs per MAC).
    x, t, y = inputs(TINY, batch=1)
    models = {mlp: seeded_dit(replace(TINY, mlp=mlp)) for mlp in ("gelu", "swiglu")}
    measured = {mlp: counted_flops(lambda: model(x, t, y)) for mlp, model in models.items()}
    assert measured["swiglu"] - measured["gelu"] == 2 * macs["mlp"]
    with pytest.raises(UserError, match="counted_flops"):
        dit_config_macs(replace(TINY, block="in_context"))


def test_the_diffusers_export_refuses_the_options_in_one_line(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from tests_support import save_tiny_vae
    vae = save_tiny_vae(tmp_path / "vae")
    config = replace(TINY, input_size=4, **{"rope": True, "mlp": "swiglu"})
    model = seeded_dit(config)
    stored = {"kind": "dit", "model": asdict(config), "vae": str(vae), "objective": {"name": "ddpm"}}
    save_checkpoint(tmp_path / "run", 1, stored, model.state_dict(), model.state_dict(), {"step": 1})
    message = user_error(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "pipeline"), "--format",
                          "diffusers"], capsys)
    assert "mlp=swiglu, rope=True" in message and f"scalegen export --run {tmp_path / 'run'} --out FOLDER" in message
    assert not (tmp_path / "pipeline").exists()
