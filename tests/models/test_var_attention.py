"""Tests of VAR's fast attention paths: teacher forcing through FlexAttention with a cached block-sparse mask
equals the dense-mask SDPA path, and generation with the static (preallocated) KV cache gives exactly the tokens
and images of a cache that grows by concatenation.
"""
from __future__ import annotations

import pytest
import torch

from scalegen.errors import UserError
from scalegen.models import var_generation
from scalegen.models.var import VAR, build_var
from scalegen.models.var_blocks import KVCache, block_causal_mask, flex_unavailable_reason
from test_var import GOLDEN_MODELS, PATCH_NUMS, Z_CHANNELS, golden, golden_var, tiny_tokenizer  # noqa: F401

flex_attention_module = pytest.importorskip("torch.nn.attention.flex_attention")
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

FP32_TOLERANCE = 1e-5
SEQUENCE_LENGTH = sum(patch * patch for patch in PATCH_NUMS)
MODEL_FLAVOURS = {  # the two golden models' attention and AdaLN layouts
    "cosine": dict(shared_aln=False, attn_l2_norm=True),
    "shared": dict(shared_aln=True, attn_l2_norm=False),
}
GENERATION_RUNS = {
    "greedy": dict(cfg=1.5, top_k=1, top_p=0.0, more_smooth=False),
    "sampled": dict(cfg=2.0, top_k=5, top_p=0.9, more_smooth=False),
    "no_guidance": dict(cfg=0.0, top_k=0, top_p=0.0, more_smooth=False),
    "smooth": dict(cfg=3.0, top_k=8, top_p=0.0, more_smooth=True),
}


class GrowingKVCache:
    """The previous KV cache, kept here only as the reference: it grows by concatenation at every scale."""

    def __init__(self, max_length: int) -> None:
        self.keys: torch.Tensor | None = None  # (B, H, L_seen, head_dim)
        self.values: torch.Tensor | None = None  # (B, H, L_seen, head_dim)

    def extend(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat((self.keys, keys), dim=2)  # (B, H, L_seen + l, head_dim)
            self.values = torch.cat((self.values, values), dim=2)  # (B, H, L_seen + l, head_dim)
        return self.keys, self.values

    def slots(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.new = (keys.new_empty(keys.shape), values.new_empty(values.shape))  # written by the attention
        return self.new

    def fill(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.extend(*self.new)


def small_var(flavour: str, **overrides) -> VAR:
    """Depth 2, width 64, AdaLN γ = 1 (blocks far from identity), a full-size head (logits of order 1, so the
    absolute tolerance is tight), drop-path and label dropout off."""
    torch.manual_seed(0)
    var = build_var(
        tiny_tokenizer(), depth=2, width=64, num_heads=2, num_classes=5, adaln_gamma=1.0, drop_path_rate=0.0,
        label_dropout=0.0, **MODEL_FLAVOURS[flavour], **overrides,
    )
    with torch.no_grad():
        var.head.weight.normal_(std=var.config.width**-0.5)
    return var


def teacher_inputs(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 4, 5])[:batch]
    return labels, torch.randn(batch, SEQUENCE_LENGTH - 1, Z_CHANNELS, generator=generator)


@pytest.mark.parametrize("flavour", list(MODEL_FLAVOURS))
def test_flex_teacher_forcing_equals_sdpa(flavour):
    var = small_var(flavour).eval()
    labels, var_input = teacher_inputs()
    with torch.no_grad():
        dense = var(labels, var_input)  # (B, L, V)
        var.attention = "flex"
        flex = var(labels, var_input)  # (B, L, V)
    torch.testing.assert_close(flex, dense, atol=FP32_TOLERANCE, rtol=0)


@pytest.mark.parametrize("name", list(GOLDEN_MODELS))
def test_flex_logits_match_official(golden, name):  # noqa: F811 (the fixture imported from test_var)
    var = golden_var(golden, name)
    var.attention = "flex"
    with torch.no_grad():
        logits = var(golden["labels"], golden["var_input"])
    torch.testing.assert_close(logits, golden[f"{name}.golden.logits"], atol=FP32_TOLERANCE, rtol=0)


def test_block_mask_allows_what_the_dense_mask_allows_and_is_built_once():
    var = small_var("cosine", attention="flex").eval()
    labels, var_input = teacher_inputs()
    with torch.no_grad():
        var(labels, var_input)
        block_mask = var._block_masks[var_input.device]
        var(labels, var_input)
    assert list(var._block_masks) == [var_input.device] and var._block_masks[var_input.device] is block_mask
    allowed = flex_attention_module.create_mask(block_mask.mask_mod, 1, 1, SEQUENCE_LENGTH, SEQUENCE_LENGTH)
    assert torch.equal(allowed[0, 0], block_causal_mask(var.lvl_1L[0])[0, 0] == 0)


def flex_and_sdpa_gradients(device: torch.device) -> tuple[list[torch.Tensor], ...]:
    """Logits and parameter gradients of one training step (cross-entropy) with "sdpa" and with "flex"."""
    results = []
    for attention in ("sdpa", "flex"):
        var = small_var("cosine", attention=attention).to(device).train()
        labels, var_input = (tensor.to(device) for tensor in teacher_inputs())
        logits = var(labels, var_input)  # (B, L, V)
        targets = torch.arange(logits[..., 0].numel(), device=device).view(logits.shape[:2]) % logits.shape[-1]
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        results.append([logits.detach()] + [parameter.grad for parameter in var.parameters()])
    return tuple(results)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has a backward pass on CUDA only")
def test_flex_gradients_equal_sdpa_on_gpu():
    sdpa, flex = flex_and_sdpa_gradients(torch.device("cuda"))
    for expected, actual in zip(sdpa, flex):
        torch.testing.assert_close(actual, expected, atol=FP32_TOLERANCE, rtol=0)


def test_flex_training_on_cpu_falls_back_to_sdpa_and_says_why():
    with pytest.warns(UserWarning, match="falls back to SDPA: FlexAttention has no backward pass on cpu"):
        sdpa, flex = flex_and_sdpa_gradients(torch.device("cpu"))
    assert all(torch.equal(actual, expected) for expected, actual in zip(sdpa, flex))
    assert flex_unavailable_reason(torch.zeros(1, requires_grad=True)) is not None
    assert flex_unavailable_reason(torch.zeros(1)) is None


def test_unknown_attention_is_a_value_error():
    with pytest.raises(ValueError, match="attention must be one of"):
        small_var("cosine", attention="flash")


def test_static_kv_cache_is_allocated_once_and_filled_in_place():
    cache = KVCache(max_length=7)
    first_keys, first_values = torch.randn(2, 3, 3, 4), torch.randn(2, 3, 3, 4)  # (B, H, l, head_dim)
    keys, values = cache.extend(first_keys, first_values)
    buffer_address = cache.keys.data_ptr()
    assert cache.keys.shape == (2, 3, 7, 4) and keys.shape == (2, 3, 3, 4) and torch.equal(keys, first_keys)
    second_keys, second_values = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    keys, values = cache.extend(second_keys, second_values)
    assert cache.keys.data_ptr() == buffer_address and keys.data_ptr() == buffer_address
    assert torch.equal(keys, torch.cat((first_keys, second_keys), dim=2))
    assert torch.equal(values, torch.cat((first_values, second_values), dim=2))
    with pytest.raises(ValueError, match="cannot take 8"):
        cache.extend(second_keys[:, :, :1], second_values[:, :, :1])


@pytest.mark.parametrize("run", list(GENERATION_RUNS))
@pytest.mark.parametrize("flavour", list(MODEL_FLAVOURS))
def test_static_cache_generation_equals_growing_cache(monkeypatch, flavour, run):
    var = small_var(flavour).eval()
    labels = [0, 4, 5]
    static_tokens = var.generate_tokens(labels, seed=0, **GENERATION_RUNS[run])
    static_images = var.generate(labels, seed=0, **GENERATION_RUNS[run])
    with monkeypatch.context() as patch:
        patch.setattr(var_generation, "KVCache", GrowingKVCache)
        growing_tokens = var.generate_tokens(labels, seed=0, **GENERATION_RUNS[run])
        growing_images = var.generate(labels, seed=0, **GENERATION_RUNS[run])
    assert all(torch.equal(static, growing) for static, growing in zip(static_tokens.tokens, growing_tokens.tokens))
    assert all(torch.equal(static, growing) for static, growing in zip(static_tokens.logits, growing_tokens.logits))
    assert torch.equal(static_tokens.features, growing_tokens.features)
    assert torch.equal(static_images, growing_images)


def test_cuda_graphs_on_cpu_is_a_one_line_error():
    var = small_var("cosine").eval()
    with pytest.raises(UserError, match="need the model on a CUDA device, and it is on cpu"):
        var.generate([0, 1], seed=0, cuda_graphs=True)
    assert var.scale_graphs is None


def test_graph_key_follows_batch_autocast_mode_and_weight_addresses():
    var = small_var("shared").eval()
    cond = var.class_emb(torch.tensor([0, 1, 5, 5]))  # (2B, C)
    key = var_generation.graph_key(var, cond)
    with torch.no_grad():
        var.head.weight.mul_(2)  # in place: the graphs read the new values, so they stay valid
    assert var_generation.graph_key(var, cond) == key
    assert var_generation.graph_key(var, cond[:2]) != key
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert var_generation.graph_key(var, cond) != key
    assert var_generation.graph_key(var.train(), cond) != key
    var.eval().head.weight.data = var.head.weight.data.clone()  # a new address: the graphs would read stale memory
    assert var_generation.graph_key(var, cond) != key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("flavour", list(MODEL_FLAVOURS))
def test_cuda_graph_generation_equals_eager(flavour, precision):
    var = small_var(flavour).cuda().eval()
    for labels in ([0, 4, 5], [3, 3, 1], [2]):  # the second reuses the graphs, the third captures anew
        for run in ("greedy", "sampled"):
            settings = dict(seed=0, **GENERATION_RUNS[run])
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                eager = var.generate_tokens(labels, **settings)
                graphed = var.generate_tokens(labels, cuda_graphs=True, **settings)
            assert all(torch.equal(first, second) for first, second in zip(eager.tokens, graphed.tokens))
            assert all(torch.allclose(first, second, atol=FP32_TOLERANCE)
                       for first, second in zip(eager.logits, graphed.logits))
        assert var.scale_graphs.cond.shape[0] == 2 * len(labels)
    keep = torch.zeros(PATCH_NUMS[-1], PATCH_NUMS[-1], device="cuda")  # (p, p)
    keep[:, : PATCH_NUMS[-1] // 2] = 1
    source = [tokens[:1] for tokens in eager.tokens]
    edited = [var.edit([1], source, keep, seed=0, cuda_graphs=graphs, precision=precision) for graphs in (False, True)]
    assert torch.equal(*edited)
