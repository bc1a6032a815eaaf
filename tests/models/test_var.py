"""Tests of the VAR transformer: official layout, masking, KV-cached generation, label dropout, editing, and
parity with the official FoundationVision/VAR code.

Golden data `tests/golden/var_golden.safetensors` (two tiny official VARs — width 16, depth 2, 2 heads, 10 classes,
patch_nums (1,2,3,4), vocab 64, z_channels 8; one plain with attn_l2_norm, one shared-AdaLN without — with random
weights, the official quantizer's weights, logits for a fixed input, and the tokens / final f̂ of official
`autoregressive_infer_cfg` greedy, seeded top-k/top-p and more_smooth runs, plus the notebook's greedy in-painting)
was produced by:
    PYTHONPATH=/tmp/official/VAR /tmp/offvenv/bin/python /tmp/var_golden/make_golden.py \
        /work/main/tests/golden/var_golden.safetensors
(official code at FoundationVision/VAR, torch 2.14.1 CPU). `var_d16.tsv` and `var_d4_shared_aln.tsv` are copies
of the official key lists in shared/spec/keys.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scalegen.errors import UserError
from scalegen.models.var import VAR, VARConfig, build_var
from scalegen.models.var_blocks import block_causal_mask
from scalegen.models.var_edit import box_mask, resize_keep_mask
from scalegen.models.var_sampling import filter_logits
from scalegen.tokenizers.vqvae import build_vqvae
from tests_support import GOLDEN

PATCH_NUMS = (1, 2, 3, 4)
VOCAB = 64
Z_CHANNELS = 8
GOLDEN_NUM_CLASSES = 10
GOLDEN_MODELS = {"var": dict(shared_aln=False, attn_l2_norm=True), "var_shared": dict(shared_aln=True, attn_l2_norm=False)}
GOLDEN_RUNS = {
    "greedy": dict(cfg=1.5, top_k=1, top_p=0.0, more_smooth=False),
    "sampled": dict(cfg=2.0, top_k=5, top_p=0.9, more_smooth=False),
    "smooth": dict(cfg=3.0, top_k=8, top_p=0.0, more_smooth=True),
}


def tiny_tokenizer():
    """A tokenizer with the quantizer of the golden data and a minimal conv stack (8×8 images)."""
    return build_vqvae(
        vocab_size=VOCAB, z_channels=Z_CHANNELS, ch=16, patch_nums=PATCH_NUMS, share_quant_resi=4, ch_mult=(1, 2),
        num_res_blocks=1, norm_groups=8, use_attention=False, use_mid_attention=False,
    ).eval()


def tiny_var(**overrides) -> VAR:
    """Depth-2 VAR with AdaLN γ = 1 so that the blocks are far from identity."""
    torch.manual_seed(0)
    return build_var(tiny_tokenizer(), depth=2, num_classes=5, adaln_gamma=1.0, **overrides)


def read_tsv(path: Path) -> list[tuple[str, str, str]]:
    rows = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines(True) if not line.startswith("#")]
    return [(key, shape, dtype) for key, shape, dtype in rows]


def layout(module: torch.nn.Module) -> list[tuple[str, str, str]]:
    return [(k, str(tuple(v.shape)), str(v.dtype).removeprefix("torch.")) for k, v in module.state_dict().items()]


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN / "var_golden.safetensors")


def golden_var(golden: dict[str, torch.Tensor], name: str) -> VAR:
    tokenizer = tiny_tokenizer()
    quantizer_state = {k.removeprefix("quantize."): v for k, v in golden.items() if k.startswith("quantize.")}
    tokenizer.quantize.load_state_dict(quantizer_state, strict=True)
    config = VARConfig(
        depth=2, width=16, num_heads=2, num_classes=GOLDEN_NUM_CLASSES, patch_nums=PATCH_NUMS, vocab_size=VOCAB,
        z_channels=Z_CHANNELS, **GOLDEN_MODELS[name],
    )
    var = VAR(config, tokenizer=tokenizer)
    prefix = name + "."
    state = {k.removeprefix(prefix): v for k, v in golden.items() if k.startswith(prefix) and ".golden." not in k}
    var.load_state_dict(state, strict=True)
    return var.eval()


def test_d16_layout_matches_official():
    with torch.device("meta"):
        var = VAR(VARConfig.for_depth(16))
    assert layout(var) == read_tsv(GOLDEN / "var_d16.tsv")


def test_shared_adaln_layout_matches_official():
    with torch.device("meta"):
        var = VAR(VARConfig.for_depth(4, shared_aln=True))
    assert layout(var) == read_tsv(GOLDEN / "var_d4_shared_aln.tsv")


@pytest.mark.parametrize("depth, millions", [(16, 310.28), (20, 600.92), (24, 1033.40), (30, 2010.02)])
def test_parameter_count_matches_paper(depth, millions):
    # Counted as the official train.py does: all parameters, no buffers.
    with torch.device("meta"):
        var = VAR(VARConfig.for_depth(depth))
    assert round(sum(p.numel() for p in var.parameters()) / 1e6, 2) == millions


def test_state_dict_excludes_tokenizer_and_round_trips():
    var = tiny_var()
    assert not any(key.startswith(("quantize", "encoder", "decoder", "vae")) for key in var.state_dict())
    copy = tiny_var()
    copy.initialize_weights()
    copy.load_state_dict(var.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(var.state_dict().values(), copy.state_dict().values()))


def test_attention_mask_is_block_lower_triangular():
    var = tiny_var()
    scale = torch.cat([torch.full((p * p,), index) for index, p in enumerate(PATCH_NUMS)])
    mask = var.attn_bias_for_masking[0, 0]
    assert mask.shape == (30, 30) and torch.equal(var.lvl_1L[0], scale)
    allowed = scale.view(-1, 1) >= scale.view(1, -1)
    assert torch.all(mask[allowed] == 0) and torch.all(mask[~allowed] == -math.inf)
    assert torch.equal(block_causal_mask(scale), var.attn_bias_for_masking)


def test_kv_cached_generation_equals_teacher_forcing():
    var = tiny_var().eval()
    labels = torch.tensor([0, 4, 5])
    sampled = var.generate_tokens(labels, cfg=0.0, seed=0)
    teacher_input = var.tokenizer.tokens_to_var_input(sampled.tokens)
    with torch.no_grad():
        teacher_logits = var(labels, teacher_input)
    lengths = [p * p for p in PATCH_NUMS]
    for cached, forced in zip(sampled.logits, teacher_logits.split(lengths, dim=1)):
        torch.testing.assert_close(cached, forced, atol=1e-4, rtol=0)


def test_label_dropout_only_in_training():
    var = tiny_var(drop_path_rate=0.0, label_dropout=1.0)
    labels = torch.tensor([1, 2])
    null_labels = torch.full_like(labels, var.config.num_classes)
    var_input = torch.randn(2, 29, Z_CHANNELS)
    var.eval()
    with torch.no_grad():
        first, second, unconditional = var(labels, var_input), var(labels, var_input), var(null_labels, var_input)
    assert torch.equal(first, second)
    assert not torch.allclose(first, unconditional)
    var.train()
    with torch.no_grad():
        dropped = var(labels, var_input)
    torch.testing.assert_close(dropped, unconditional, atol=1e-6, rtol=0)


def test_generation_is_deterministic_and_returns_images():
    var = tiny_var().eval()
    greedy = [var.generate_tokens([0, 3], cfg=1.5, top_k=1).tokens for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*greedy))
    images = var.generate([0, 3], cfg=1.5, top_k=10, top_p=0.9, seed=7)
    again = var.generate([0, 3], cfg=1.5, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(7))
    assert images.shape == (2, 3, 8, 8) and torch.equal(images, again)
    assert images.min() >= 0 and images.max() <= 1


def test_bad_labels_are_value_errors():
    # Raised inside forward and generate: plain ValueErrors (UserError is for input at the boundaries).
    var = tiny_var().eval()
    with pytest.raises(ValueError, match="class ids"):
        var.generate([6])
    with pytest.raises(ValueError, match="class ids"):
        var(torch.tensor([-1]), torch.zeros(1, 29, Z_CHANNELS))


def test_filter_logits_keeps_top_token_and_nucleus():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[[True, True, False, False]]]
    assert torch.isfinite(filter_logits(logits, top_p=0.75)).tolist() == [[[True, True, False, False]]]
    assert torch.isfinite(filter_logits(logits, top_p=1e-6)).tolist() == [[[True, False, False, False]]]


def test_box_mask_modes_and_errors():
    inpaint = box_mask((64, 32), (8, 16, 24, 48), grid_size=4, mode="inpaint")
    expected_box = torch.zeros(4, 4)
    expected_box[1:3, 1:3] = 1
    assert torch.equal(inpaint, 1 - expected_box)
    assert torch.equal(box_mask((64, 32), (8, 16, 24, 48), grid_size=4, mode="outpaint"), expected_box)
    with pytest.raises(UserError, match="not inside"):
        box_mask(32, (0, 0, 40, 10), grid_size=4)
    with pytest.raises(UserError, match="edit mode"):
        box_mask(32, (0, 0, 10, 10), grid_size=4, mode="erase")


def test_resized_mask_always_keeps_the_coarsest_scale():
    nothing_kept = torch.zeros(4, 4)
    assert resize_keep_mask(nothing_kept, 1, batch_size=2).all()
    assert not resize_keep_mask(nothing_kept, 2, batch_size=2).any()


@pytest.mark.parametrize("mode", ["inpaint", "outpaint"])
def test_edit_keeps_source_tokens_at_every_scale(mode):
    var = tiny_var().eval()
    generator = torch.Generator().manual_seed(3)
    source = [torch.randint(0, VOCAB, (2, p * p), generator=generator) for p in PATCH_NUMS]
    keep_mask = box_mask(8, (2, 2, 6, 6), grid_size=PATCH_NUMS[-1], mode=mode)
    sampled = var.generate_tokens([1, 5], cfg=2.0, seed=0, source_tokens=source, keep_mask=keep_mask)
    for patch, tokens, source_tokens in zip(PATCH_NUMS, sampled.tokens, source):
        keep = resize_keep_mask(keep_mask, patch, batch_size=2)
        assert torch.equal(tokens[keep], source_tokens[keep])
    assert torch.equal(sampled.features, var.tokenizer.quantize.tokens_to_features(sampled.tokens))
    images = var.edit([1, 5], source, keep_mask, cfg=2.0, seed=0)
    assert images.shape == (2, 3, 8, 8)


def test_bad_edit_inputs_are_value_errors():
    var = tiny_var().eval()
    source = [torch.zeros(1, p * p, dtype=torch.long) for p in PATCH_NUMS]
    with pytest.raises(ValueError, match="both"):
        var.generate_tokens([0], source_tokens=source)
    with pytest.raises(ValueError, match="source_tokens must have shapes"):
        var.edit([0], source[:-1], torch.ones(4, 4))
    with pytest.raises(ValueError, match="keep_mask must be"):
        var.edit([0], source, torch.ones(8, 8))


@pytest.mark.parametrize("name", list(GOLDEN_MODELS))
def test_logits_match_official(golden, name):
    var = golden_var(golden, name)
    tokens = [golden[f"source_tokens.{index}"] for index in range(len(PATCH_NUMS))]
    torch.testing.assert_close(var.tokenizer.tokens_to_var_input(tokens), golden["var_input"], atol=1e-5, rtol=0)
    with torch.no_grad():
        logits = var(golden["labels"], golden["var_input"])
    torch.testing.assert_close(logits, golden[f"{name}.golden.logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("run", list(GOLDEN_RUNS))
@pytest.mark.parametrize("name", list(GOLDEN_MODELS))
def test_generation_matches_official(golden, name, run):
    var = golden_var(golden, name)
    sampled = var.generate_tokens(golden["labels"], seed=0, **GOLDEN_RUNS[run])
    for index, tokens in enumerate(sampled.tokens):
        assert torch.equal(tokens, golden[f"{name}.golden.{run}.tokens.{index}"]), f"scale {index}"
    torch.testing.assert_close(sampled.features, golden[f"{name}.golden.{run}.features"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(GOLDEN_MODELS))
def test_edit_matches_official_notebook(golden, name):
    var = golden_var(golden, name)
    source = [golden[f"source_tokens.{index}"] for index in range(len(PATCH_NUMS))]
    # the notebook's box y0=x0=0.25, y1=x1=0.75 on a 64-pixel image
    keep_mask = box_mask(64, (16, 16, 48, 48), grid_size=PATCH_NUMS[-1], mode="inpaint")
    assert torch.equal(keep_mask, golden[f"{name}.golden.edit.mask"])
    sampled = var.generate_tokens(golden["labels"], cfg=1.5, top_k=1, seed=0, source_tokens=source, keep_mask=keep_mask)
    for index, (patch, tokens) in enumerate(zip(PATCH_NUMS, sampled.tokens)):
        keep = resize_keep_mask(keep_mask, patch, batch_size=2)
        official = golden[f"{name}.golden.edit.sampled_tokens.{index}"]
        assert torch.equal(tokens[~keep], official[~keep]), f"scale {index}"
    torch.testing.assert_close(sampled.features, golden[f"{name}.golden.edit.features"], atol=1e-4, rtol=0)


def test_a_deep_copy_shares_the_tokenizer_but_not_the_weights():
    import copy

    tokenizer = build_vqvae(vocab_size=16, z_channels=4, ch=8, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2, 4),
                            norm_groups=4, use_attention=False, use_mid_attention=False, in_channels=1)
    var = build_var(tokenizer, depth=1, num_classes=3, width=16, num_heads=2)
    clone = copy.deepcopy(var)
    assert clone.tokenizer is var.tokenizer
    assert clone.class_emb.weight is not var.class_emb.weight
    torch.testing.assert_close(clone.class_emb.weight, var.class_emb.weight)


def test_moving_the_var_moves_its_tokenizer():
    var = tiny_var().double()
    assert all(parameter.dtype == torch.float64 for parameter in var.tokenizer.parameters())
    assert "tokenizer" not in " ".join(var.state_dict())
