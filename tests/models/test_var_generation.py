"""Tests of VAR generation's seams and speed-ups: FastVAR's cached token pruning (`var_pruning`), collaborative
decoding with a refiner (CoDe), the token head, and the one-line errors. The official path's parity (golden tokens of
the official `autoregressive_infer_cfg`) is tested in test_var.py and must not move.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from scalegen import fingerprint
from scalegen.cli.main import main
from scalegen.errors import UserError
from scalegen.models.var import VAR, build_var
from scalegen.models.var_edit import box_mask
from scalegen.models.var_generation import ScaleNetwork
from scalegen.models.var_pruning import PrunedGeneration, TokenPruning, pivotal_tokens
from scalegen.models.token_heads import CategoricalSampler, ScaleGuidance
from scalegen.models.var_sampling import inverse_cdf_tokens
from scalegen.runs.loading import load_var
from scalegen.runs.names import SHIPPED_VAR

from test_var import PATCH_NUMS, VOCAB, tiny_tokenizer

LABELS = [0, 3, 4, 5]  # 5 is the null class (unconditional)


def seeded_var(seed: int, tokenizer: torch.nn.Module, depth: int = 3) -> VAR:
    """A depth-3 VAR on `tokenizer` with AdaLN γ = 1, so every block matters."""
    torch.manual_seed(seed)
    return build_var(tokenizer, depth=depth, num_classes=5, adaln_gamma=1.0).eval()


@pytest.fixture(scope="module")
def pair() -> tuple[VAR, VAR]:
    """Two VARs on one tokenizer: a depth-3 drafter and a depth-2 refiner of other weights."""
    tokenizer = tiny_tokenizer()
    return seeded_var(0, tokenizer), seeded_var(1, tokenizer, depth=2)


def same_tokens(first, second) -> list[bool]:
    return [torch.equal(a, b) for a, b in zip(first.tokens, second.tokens)]


def same_logits(first, second) -> list[bool]:
    return [torch.equal(a, b) for a, b in zip(first.logits, second.logits)]


def test_pivotal_tokens_are_the_farthest_from_the_mean_token() -> None:
    x = torch.zeros(2, 5, 3)  # (B, l, C)
    x[0, 1] = torch.tensor([4.0, 0, 0])
    x[0, 3] = torch.tensor([0, -3.0, 0])
    x[1, 4] = torch.tensor([1.0, 1.0, 1.0])
    x[1, 0] = torch.tensor([-0.5, 0, 0])
    picked = pivotal_tokens(x, 2).sort(dim=1).values  # (B, 2)
    assert picked.tolist() == [[1, 3], [0, 4]]


def test_token_pruning_keeps_the_asked_fractions_in_the_pruned_blocks() -> None:
    pruning = TokenPruning((0.4, 0.5), unpruned_first_blocks=1, unpruned_last_blocks=2)
    assert pruning.kept_tokens((1, 2, 3, 4, 6, 8)) == [1, 4, 9, 16, 36 - 14, 64 - 32]
    assert list(pruning.pruned_blocks(6)) == [1, 2, 3]


def test_a_pruned_branch_computes_the_pivotal_tokens_and_restores_the_others_from_the_last_full_scale() -> None:
    state = PrunedGeneration(TokenPruning((0.5,), 0, 0), patch_nums=(1, 2, 4), depth=1)
    torch.manual_seed(0)
    recorded = torch.randn(2, 4, 3)  # (B, 2·2, C) the branch's output at the last full scale
    full_scale = state.block_tokens(1, 0)
    assert torch.equal(full_scale.compute("ffn", recorded, lambda h: h), recorded)  # computed in full, recorded
    assert state.block_tokens(0, 0) is None  # a coarser scale: nothing pruned, nothing recorded
    pruned = state.block_tokens(2, 0)
    x = torch.randn(2, 16, 3)  # (B, 4·4, C)
    seen = []
    out = pruned.compute("ffn", x, lambda h: seen.append(h) or h * 10)  # (B, 16, C)
    (computed,) = seen
    assert computed.shape == (2, 8, 3)  # half the tokens
    kept = pivotal_tokens(x, 8)  # (B, 8)
    restored = F.interpolate(recorded.transpose(1, 2).reshape(2, 3, 2, 2), size=(4, 4), mode="area")
    restored = restored.flatten(2).transpose(1, 2)  # (B, 16, C)
    for row in range(2):
        is_kept = torch.zeros(16, dtype=torch.bool)
        is_kept[kept[row]] = True
        assert torch.equal(out[row, is_kept], x[row, is_kept] * 10)
        assert torch.equal(out[row, ~is_kept], restored[row, ~is_kept])


def test_pruning_nothing_gives_the_official_tokens(pair) -> None:
    drafter, _ = pair
    plain = drafter.generate_tokens(LABELS, cfg=2.0, seed=0)
    recorded_only = drafter.generate_tokens(LABELS, cfg=2.0, seed=0, pruning=TokenPruning((0.0,)))
    assert all(same_tokens(plain, recorded_only)) and all(same_logits(plain, recorded_only))


def test_pruning_changes_only_the_pruned_scales_and_their_keys_stay_out_of_the_cache(pair) -> None:
    drafter, _ = pair
    plain = drafter.generate_tokens(LABELS, cfg=2.0, seed=0)
    pruned = drafter.generate_tokens(LABELS, cfg=2.0, seed=0, pruning=TokenPruning((0.5,)))
    assert same_logits(plain, pruned) == [True, True, True, False]
    labels = drafter.labels_tensor(LABELS)
    network = ScaleNetwork(drafter, labels, pruning=TokenPruning((0.5,)))
    inputs = [None] + [torch.randn(len(LABELS), patch * patch, drafter.config.z_channels) for patch in PATCH_NUMS[1:]]
    for scale_index, word_input in enumerate(inputs):
        assert network.output(scale_index, word_input).shape == (2 * len(LABELS), PATCH_NUMS[scale_index] ** 2, VOCAB)
    full, pruned_length = sum(patch * patch for patch in PATCH_NUMS), sum(patch * patch for patch in PATCH_NUMS) - 8
    assert [cache.length for cache in network.caches] == [full, pruned_length, full]  # the middle block is pruned


def test_a_var_refining_its_own_drafts_gives_its_own_tokens(pair) -> None:
    drafter, _ = pair
    plain = drafter.generate_tokens(LABELS, cfg=2.0, top_k=10, seed=1)
    for refined_scales in (1, 3):
        refined = drafter.generate_tokens(LABELS, cfg=2.0, top_k=10, seed=1, refiner=drafter,
                                          refined_scales=refined_scales)
        assert all(same_tokens(plain, refined)) and all(same_logits(plain, refined))


def test_a_refiner_reads_the_drafted_scales_as_its_teacher_forcing_would(pair) -> None:
    drafter, refiner = pair
    plain = drafter.generate_tokens(LABELS, cfg=0.0, seed=2)
    refined = drafter.generate_tokens(LABELS, cfg=0.0, seed=2, refiner=refiner, refined_scales=1)
    assert same_logits(plain, refined) == [True, True, True, False]
    # cfg 0: the last scale's logits are the refiner's conditional ones, given the drafted scales as context.
    teacher_forced = refiner(drafter.labels_tensor(LABELS), drafter.tokenizer.quantize.tokens_to_var_input(refined.tokens))
    last = PATCH_NUMS[-1] ** 2
    torch.testing.assert_close(refined.logits[-1], teacher_forced[:, -last:], rtol=1e-4, atol=1e-4)


def test_speedups_keep_the_edited_tokens(pair) -> None:
    drafter, refiner = pair
    source = [torch.randint(0, VOCAB, (len(LABELS), patch * patch)) for patch in PATCH_NUMS]
    keep = box_mask(8, (0, 0, 4, 8), PATCH_NUMS[-1], "outpaint")  # keep the left half
    edited = drafter.generate_tokens(LABELS, seed=0, source_tokens=source, keep_mask=keep,
                                     pruning=TokenPruning((0.5,), 0, 0), refiner=refiner, refined_scales=1)
    kept = keep.flatten().bool()
    assert torch.equal(edited.tokens[-1][:, kept], source[-1][:, kept])
    assert not torch.equal(edited.tokens[-1][:, ~kept], source[-1][:, ~kept])


def test_top_k_at_or_above_the_vocabulary_keeps_every_token(pair) -> None:
    drafter, _ = pair
    plain = drafter.generate_tokens(LABELS, seed=3)
    assert all(same_tokens(plain, drafter.generate_tokens(LABELS, seed=3, top_k=VOCAB)))
    assert all(same_tokens(plain, drafter.generate_tokens(LABELS, seed=3, top_k=900)))
    sampler = CategoricalSampler(drafter.tokenizer.quantize.embedding, top_k=3)
    guidance = ScaleGuidance(0.0, len(PATCH_NUMS), drafter.token_head)  # cfg 0: the conditional half
    tokens, embedded, _ = sampler.sample(torch.arange(VOCAB, dtype=torch.float).expand(4, 5, VOCAB), guidance, 1)
    assert bool((tokens >= VOCAB - 3).all()) and embedded.shape == (2, 5, drafter.config.z_channels)


@pytest.mark.parametrize("options, message", [
    (dict(pruning=TokenPruning((0.5,) * 4)), "prune fewer scales"),
    (dict(pruning=TokenPruning((1.0,))), "in [0, 1)"),
    (dict(pruning=TokenPruning((0.5,), 2, 1)), "leave none of the model's 3 blocks"),
    (dict(refined_scales=4), "1 to 3 of the 4 scales"),
    (dict(refined_scales=0), "1 to 3 of the 4 scales"),
    (dict(pruning=TokenPruning((0.5,)), cuda_graphs=True), "CUDA graphs"),
])
def test_bad_speedup_settings_are_one_line_errors(pair, options, message) -> None:
    drafter, refiner = pair
    if "refined_scales" in options:
        options = dict(options, refiner=refiner)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        drafter.generate_tokens(LABELS, seed=0, **options)


def test_a_refiner_of_another_tokenizer_is_refused(pair) -> None:
    drafter, _ = pair
    torch.manual_seed(1)
    tokenizer = tiny_tokenizer()  # the drafter's shapes, other weights
    assert not torch.equal(tokenizer.encoder.conv_in.weight, drafter.tokenizer.encoder.conv_in.weight)
    other = build_var(tokenizer, depth=2, num_classes=5).eval()
    with pytest.raises(UserError, match="trained on the drafter's tokenizer and classes"):
        drafter.generate_tokens(LABELS, refiner=other)
    torch.manual_seed(0)
    classes = build_var(tiny_tokenizer(), depth=2, num_classes=7).eval()  # another class count
    with pytest.raises(UserError, match="trained on the drafter's tokenizer and classes"):
        drafter.generate_tokens(LABELS, refiner=classes)


def test_a_refiner_on_a_copied_tokenizer_hashes_each_tokenizer_once_until_its_weights_change(monkeypatch) -> None:
    tokenizer = tiny_tokenizer()
    drafter = seeded_var(0, tokenizer)
    twin = seeded_var(1, copy.deepcopy(tokenizer), depth=2)  # the drafter's tokenizer weights in another object
    hashed = []  # the state dicts hashed, by their entry counts
    digest = fingerprint.weights_fingerprint
    monkeypatch.setattr(fingerprint, "weights_fingerprint",
                        lambda weights: hashed.append(len(weights)) or digest(weights))
    for seed in range(3):
        drafter.generate_tokens(LABELS, seed=seed, refiner=twin, refined_scales=1)
    assert len(hashed) == 2  # each tokenizer once, not on every call
    with torch.no_grad():
        twin.tokenizer.encoder.conv_in.weight.add_(1.0)  # written in place: its version counter moves
    with pytest.raises(UserError, match="the refiner's tokenizer has other weights"):
        drafter.generate_tokens(LABELS, seed=0, refiner=twin, refined_scales=1)
    assert len(hashed) == 3  # the changed one again


def test_inverse_cdf_draws_follow_the_probabilities_and_never_draw_a_filtered_token() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0, -torch.inf, 0.5]).expand(1, 40_000, 5)  # (B, l, V)
    tokens = inverse_cdf_tokens(logits, torch.Generator().manual_seed(0))  # (B, l)
    frequencies = torch.bincount(tokens.flatten(), minlength=5).float() / tokens.numel()
    torch.testing.assert_close(frequencies, logits[0, 0].softmax(-1), atol=0.01, rtol=0)
    assert int((tokens == 3).sum()) == 0
    first = torch.full((1, 1000, 5), -torch.inf)
    first[..., 0] = 0.0  # only the first token allowed: the lowest uniform draw must still land on it
    assert bool((inverse_cdf_tokens(first, torch.Generator().manual_seed(1)) == 0).all())


def test_inverse_cdf_draws_reach_generation_and_keep_the_seed_s_tokens(pair) -> None:
    drafter, _ = pair
    official = drafter.generate_tokens(LABELS, seed=4)
    fast = [drafter.generate_tokens(LABELS, seed=4, draws="inverse-cdf") for _ in range(2)]
    assert all(same_tokens(fast[0], fast[1]))
    assert not all(same_tokens(official, fast[0]))
    with pytest.raises(UserError, match="unknown token draws"):
        drafter.generate_tokens(LABELS, draws="gumbel")


class ScaleSpy:
    """Records, for each scale a network computes, which model computed it and how many of its blocks' token sets
    were pruned (wraps `ScaleNetwork.output` and `PrunedGeneration.block_tokens`)."""

    def __init__(self, monkeypatch) -> None:
        self.scales: list[tuple[int, int]] = []  # (id of the model, scale index)
        self.pruned_blocks = 0
        output, block_tokens = ScaleNetwork.output, PrunedGeneration.block_tokens

        def spied_output(network, scale_index, word_input):
            self.scales.append((id(network.model), scale_index))
            return output(network, scale_index, word_input)

        def spied_block_tokens(pruned, scale_index, block_index):
            tokens = block_tokens(pruned, scale_index, block_index)
            self.pruned_blocks += tokens is not None
            return tokens

        monkeypatch.setattr(ScaleNetwork, "output", spied_output)
        monkeypatch.setattr(PrunedGeneration, "block_tokens", spied_block_tokens)

    def models_by_scale(self) -> list[int]:
        """Which model (numbered in order of first appearance) computed each scale of the last generation."""
        models = list(dict.fromkeys(model for model, _ in self.scales))
        last = self.scales[max(index for index, (_, scale) in enumerate(self.scales) if scale == 0):]
        return [models.index(model) for model, _ in last]


@pytest.mark.end_to_end
def test_sample_and_edit_var_take_every_speedup(tmp_path, monkeypatch) -> None:
    speedups = ["--prune", "0.3", "--unpruned-blocks", "1,1", "--refiner", str(SHIPPED_VAR), "--refined-scales", "2",
                "--draws", "inverse-cdf", "--device", "cpu"]
    scales = len(load_var(SHIPPED_VAR).config.patch_nums)
    spy = ScaleSpy(monkeypatch)
    main(["sample", "var", "--ckpt", str(SHIPPED_VAR), "--classes", "0,7", "--per-class", "2", "--out",
          str(tmp_path / "grid.png"), *speedups])
    assert Image.open(tmp_path / "grid.png").size == (2 * 32, 2 * 32)
    assert spy.models_by_scale() == [0] * (scales - 2) + [1] * 2  # the refiner computed the two finest scales
    assert spy.pruned_blocks > 0  # and blocks computed only the kept tokens
    spy.scales.clear()
    spy.pruned_blocks = 0
    main(["sample", "var", "--ckpt", str(SHIPPED_VAR), "--classes", "0,7", "--per-class", "2", "--out",
          str(tmp_path / "official.png"), "--device", "cpu"])
    assert spy.models_by_scale() == [0] * scales and spy.pruned_blocks == 0
    assert Image.open(tmp_path / "grid.png").tobytes() != Image.open(tmp_path / "official.png").tobytes()
    Image.new("L", (32, 32), 128).save(tmp_path / "input.png")
    spy.scales.clear()
    main(["edit", "var", "--ckpt", str(SHIPPED_VAR), "--image", str(tmp_path / "input.png"), "--box", "8,8,24,24",
          "--out", str(tmp_path / "edited.png"), *speedups])
    edited = np.asarray(Image.open(tmp_path / "edited.png").convert("L"))  # (32, 32)
    assert edited.shape == (32, 32) and len(np.unique(edited[10:22, 10:22])) > 1  # regenerated inside the box
    assert spy.models_by_scale() == [0] * (scales - 2) + [1] * 2 and spy.pruned_blocks > 0
