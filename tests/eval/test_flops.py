"""DiT Gflops against the paper's 13 figures; VAR cost with and without the KV cache; the measured counter; a loaded
VAR's sampling MACs against the counter's measure of its generation, both heads, and `scalegen flops --var`."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from scalegen.cli.main import main
from scalegen.errors import UserError
from scalegen.diffusion.flow import LinearFlow
from scalegen.eval.flops import (DIT_PAPER_GFLOPS, GIGA, GUIDANCE_HALVES, LAYER_NORM_OPS_PER_ELEMENT,
                                 VAR_PATCH_NUMS, counted_flops, dit_gflops, dit_image_macs, flops_table,
                                 flow_head_image_macs, var_image_macs, var_sampling_macs, var_sampling_report)
from scalegen.models.flow_head import FlowHead, FlowMLP, FlowSampler
from scalegen.models.sampling_settings import VARSampling
from scalegen.models.token_heads import ScaleGuidance
from scalegen.models.var import VAR, VARConfig
from scalegen.runs.loading import load_var
from tests_support import user_error
from test_flow_head import TINY_FLOW_VAR, flow_run, tiny_tokenizer  # noqa: F401  (flow_run: a fixture, a tiny run)
from test_var_training import TINY_VAR, tokenizer_folder

PAPER_TOLERANCE = 0.005  # relative


@pytest.mark.parametrize("preset,image_size", sorted(DIT_PAPER_GFLOPS))
def test_dit_gflops_match_paper(preset, image_size):
    assert dit_gflops(preset, image_size) == pytest.approx(DIT_PAPER_GFLOPS[(preset, image_size)], rel=PAPER_TOLERANCE)


def test_all_thirteen_paper_figures_are_checked():
    assert len(DIT_PAPER_GFLOPS) == 13


def test_preset_names():
    assert dit_gflops("XL/2") == dit_gflops("DiT-XL/2")
    with pytest.raises(UserError, match="DiT-XL/2"):
        dit_gflops("DiT-XXL/2")


def test_dit_image_cost_counts_steps_and_guidance():
    assert dit_image_macs("DiT-XL/2", steps=250, cfg=True) == pytest.approx(500 * dit_gflops("DiT-XL/2") * 1e9)


def test_var_cache_saves_compute():
    patch_nums = VAR_PATCH_NUMS[256]
    cached, uncached = var_image_macs(16, patch_nums, kv_cache=True), var_image_macs(16, patch_nums, kv_cache=False)
    assert cached < uncached
    # With the cache every token passes through each linear layer exactly once: 12·L·C² per block dominates.
    tokens, width = sum(p * p for p in patch_nums), 64 * 16
    assert cached / 2 > 16 * 12 * tokens * width ** 2
    assert var_image_macs(16, patch_nums, cfg=False) * 2 == cached


def test_table_lists_presets_and_var():
    table = flops_table(256)
    assert "DiT-XL/2" in table and "118.64" in table and "VAR-d30, no cache" in table


def test_counted_flops_are_two_per_multiply_accumulate():
    layer = torch.nn.Linear(4, 3, bias=False)
    inputs = torch.randn(2, 4)
    assert counted_flops(lambda: layer(inputs)) == 2 * 2 * 4 * 3


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_the_flow_heads_sampling_macs_are_what_the_counter_measures(sampler):
    channels, width, condition_width, blocks, steps = 4, 16, 32, 2, 3
    mlp = FlowMLP(channels, width, condition_width, blocks)
    flow_sampler = FlowSampler(mlp, LinearFlow(), channels, steps, sampler, torch.Generator().manual_seed(0))
    config = VARConfig(depth=1, width=condition_width, num_heads=2, patch_nums=(1, 2), vocab_size=0,
                       z_channels=channels, token_head="flow")
    condition = torch.randn(2, 4, condition_width)  # (2B, l, C): both halves of one image's 2×2 scale
    counted = counted_flops(lambda: flow_sampler.sample(condition, ScaleGuidance(1.5, 2, FlowHead(config)), 1))
    macs = flow_head_image_macs((2,), channels, width, condition_width, blocks, steps, sampler)
    evaluations = 2 * 4 * steps * (2 if sampler == "heun" else 1)  # both halves' tokens at every evaluation
    norms = LAYER_NORM_OPS_PER_ELEMENT * width * (blocks + 1) * evaluations  # counted here, not by torch's counter
    assert counted == 2 * (macs - norms)


def var_norm_ops(model, settings) -> int:
    """The norms' operations in `var_sampling_macs` of a generation (both guidance halves), which torch's counter does
    not count: two LayerNorms a block and the AdaLN before the head at every position, and the flow head's norms
    (each block's and the final one) at every velocity evaluation."""
    config, positions = model.config, model.sequence_length
    norms = GUIDANCE_HALVES * LAYER_NORM_OPS_PER_ELEMENT * config.width * positions * (2 * config.depth + 1)
    if config.token_head == "flow":
        evaluations = settings.flow_steps * (2 if settings.flow_sampler == "heun" else 1)
        norms += (GUIDANCE_HALVES * LAYER_NORM_OPS_PER_ELEMENT * config.head_width * (config.head_blocks + 1)
                  * positions * evaluations)
    return norms


@pytest.mark.parametrize("head, overrides, given", [
    ("categorical", {}, {}),
    ("categorical", {"shared_aln": True}, {"cfg": 0.0}),  # cfg 0: the null-class half still runs
    ("categorical", {}, {"more_smooth": True, "top_k": 4}),
    ("flow", {}, {}),
    ("flow", {}, {"cfg": 0.0, "flow_steps": 3, "flow_sampler": "heun"}),
], ids=["categorical", "shared-adaln-cfg-0", "more-smooth", "flow", "flow-heun-cfg-0"])
def test_a_vars_sampling_macs_are_what_the_counter_measures_of_its_generation(head, overrides, given, tmp_path):
    """Exact: the counter's FLOPs of `generate` less those of the decoder are twice the analytic MACs less the norms
    (VQ φ convs, word embeddings on the image's rows, both halves of the transformer and the head)."""
    if head == "flow":
        tokenizer, config = tiny_tokenizer(), {**TINY_FLOW_VAR, "head_width": 16}
    else:
        tokenizer, config = tokenizer_folder(tmp_path), TINY_VAR
    torch.manual_seed(0)
    model = VAR(VARConfig(**{**config, **overrides}), tokenizer).eval()
    settings = model.sampling_settings(**given)
    with sdpa_kernel(SDPBackend.MATH):  # its matmuls are counted (CPU's fused attention kernel is not)
        counted = counted_flops(lambda: model.generate([3], settings=settings, seed=0))
    features = model.generate_tokens([3], settings=settings, seed=0).features
    decoder = counted_flops(lambda: model.tokenizer.features_to_img(features))
    macs = var_sampling_macs(model, settings)
    assert counted - decoder == 2 * (macs - var_norm_ops(model, settings))
    assert macs > 0 and decoder > 0


def test_flops_var_prints_a_flow_runs_cost_at_its_settings_or_the_flags(flow_run, capsys):
    run = str(flow_run / "var")
    model = load_var(run)
    main(["flops", "--var", run])
    recommended = capsys.readouterr().out
    macs = var_sampling_macs(model)
    assert f"per image: {macs / GIGA:.6g} GMACs, {2 * macs / GIGA:.6g} GFLOPs" in recommended
    assert "flow-steps 10 (model config)" in recommended and "decoder excluded" in recommended
    main(["flops", "--var", run, "--cfg", "0", "--flow-steps", "3", "--flow-sampler", "heun"])
    flagged = capsys.readouterr().out
    macs = var_sampling_macs(model, model.sampling_settings(cfg=0.0, flow_steps=3, flow_sampler="heun"))
    assert f"per image: {macs / GIGA:.6g} GMACs, {2 * macs / GIGA:.6g} GFLOPs" in flagged
    assert "cfg 0.0 (flag), flow-steps 3 (flag), flow-sampler heun (flag)" in flagged
    assert "give it with --var" in user_error(["flops", "--flow-steps", "3"], capsys)


def test_a_flow_setting_for_a_categorical_var_and_a_refiner_are_one_line_errors(tmp_path):
    model = VAR(VARConfig(**TINY_VAR), tokenizer_folder(tmp_path)).eval()
    with pytest.raises(UserError, match="categorical head: drop them"):
        var_sampling_report(model, "tiny", flow_steps=3)
    assert "flow-steps" not in var_sampling_report(model, "tiny", cfg=2.0)
    with pytest.raises(UserError, match="measure FastVAR pruning or a CoDe refiner with counted_flops"):
        var_sampling_macs(model, VARSampling(refiner=model))
