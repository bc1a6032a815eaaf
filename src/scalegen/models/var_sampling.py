"""VAR generation: the KV-cached, scale-by-scale loop with classifier-free guidance (`VAR.generate_tokens`), the
optional CUDA-graph capture of each scale's network step (`ScaleGraphs`), and the token sampling: top-k / top-p
filtering, multinomial draws and the Gumbel-softmax smoothing used for visualisation. Each piece reproduces the
official VAR code draw for draw, so a seeded `torch.Generator` gives the same tokens as the official
`autoregressive_infer_cfg`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import NamedTuple

import torch
from torch import nn

from scalegen.errors import UserError
from scalegen.models.var_blocks import KVCache
from scalegen.models.var_edit import check_edit_inputs, resize_keep_mask

# more_smooth sampling (visualisation only): Gumbel temperature falls from 0.27 to 0.27·0.05, never below 0.005.
GUMBEL_START_TEMPERATURE = 0.27
GUMBEL_TEMPERATURE_DECAY = 0.95
GUMBEL_MIN_TEMPERATURE = 0.005


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Mask logits outside the top-k and outside the top-p nucleus with -inf (the input is not modified).

    Args:
        logits: (..., V) unnormalised scores.
        top_k: keep the k largest (ties with the k-th are kept too); 0 keeps all.
        top_p: drop the least likely tokens whose cumulative probability is at most 1 - top_p, always keeping
            the most likely one; 0 keeps all.

    Returns:
        (..., V) logits with the removed entries set to -inf.
    """
    if top_k > 0:
        kth_largest = logits.topk(top_k, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < kth_largest, -torch.inf)  # (..., V)
    if top_p > 0:
        ascending, order = logits.sort(dim=-1, descending=False)  # (..., V)
        drop_sorted = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)  # (..., V)
        drop_sorted[..., -1] = False  # the most likely token always survives
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, -torch.inf)  # (..., V)
    return logits


def sample_tokens(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per position from softmax(logits).

    Args:
        logits: (B, l, V) logits, already filtered.
        generator: random generator, or None for the global one.

    Returns:
        (B, l) LongTensor of token ids.
    """
    batch, length, vocab = logits.shape
    probabilities = logits.softmax(dim=-1).view(-1, vocab)  # (B*l, V)
    # replacement=True as in the official sampler: it selects the same algorithm, hence the same draws.
    drawn = torch.multinomial(probabilities, num_samples=1, replacement=True, generator=generator)  # (B*l, 1)
    return drawn.view(batch, length)


def gumbel_softmax(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Soft Gumbel-softmax sample along the last dimension.

    Args:
        logits: (..., V) logits.
        temperature: softmax temperature τ.
        generator: random generator, or None for the global one.

    Returns:
        (..., V) probabilities.
    """
    gumbels = -torch.empty_like(logits).exponential_(generator=generator).log()  # (..., V)
    return ((logits + gumbels) / temperature).softmax(dim=-1)


def smooth_embedding(filtered_logits: torch.Tensor, progress: float, codebook: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """The `more_smooth` input of one scale: a Gumbel-softmax mixture of codebook vectors instead of one code.

    Args:
        filtered_logits: (B, l, V) guided, top-k/top-p filtered logits of the scale.
        progress: scale index / (number of scales - 1), in [0, 1]; sharpens the mixture at finer scales.
        codebook: (V, Cvae) codebook vectors.
        generator: random generator, or None for the global one.

    Returns:
        (B, l, Cvae) mixed embeddings.
    """
    temperature = max(GUMBEL_START_TEMPERATURE * (1 - GUMBEL_TEMPERATURE_DECAY * progress), GUMBEL_MIN_TEMPERATURE)
    mixture = gumbel_softmax(filtered_logits * (1 + progress), temperature, generator)  # (B, l, V)
    return mixture @ codebook  # (B, l, Cvae)


def scale_logits(
    model: nn.Module, x: torch.Tensor, block_cond: torch.Tensor, cond: torch.Tensor, caches: Sequence[KVCache]
) -> torch.Tensor:
    """The network part of one scale's generation step: the blocks over the scale's positions, each extending its
    KV cache, then the head.

    Args:
        x: (2B, p², C) inputs of the scale, for both guidance halves.
        block_cond: what the blocks' AdaLN reads (`VAR.block_condition`).
        cond: (2B, C) class embeddings.
        caches: one KV cache per block.

    Returns:
        (2B, p², V) float32 logits.
    """
    for block, cache in zip(model.blocks, caches):
        x = block(x, block_cond, cache=cache)  # (2B, p², C)
    return model.head_logits(x, cond)  # (2B, p², V)


def graph_key(model: nn.Module, cond: torch.Tensor) -> tuple:
    """What a set of captured graphs is only valid for: batch, autocast state, mode, and the weights' addresses (a
    moved or replaced parameter has a new address; weights changed in place are read by the graphs as they are)."""
    device_type = cond.device.type
    autocast_state = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    addresses = tuple(tensor.data_ptr() for tensor in (*model.parameters(), *model.buffers()))
    return cond.shape, cond.dtype, cond.device, autocast_state, model.training, addresses


def uncached_autocast(device: torch.device) -> AbstractContextManager:
    """The surrounding autocast again, with its weight-cast cache off: cached casts made during a capture would be
    freed back into the graphs' memory pool when the context exits, and reused under them."""
    if not torch.is_autocast_enabled(device.type):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type), cache_enabled=False)


class ScaleGraphs:
    """Every scale's network step (`scale_logits`) captured once as a CUDA graph, for one batch size and autocast
    state, and replayed by generation: one launch per scale instead of one per kernel, with no Python in between.

    Inputs are copied into static buffers. The KV caches are static too: replaying the scales in order refills them
    in place, so each generation overwrites the last. Captured by `scale_by_scale_generation(cuda_graphs=True)` on
    its first call, kept on the model (`model.scale_graphs`) and recaptured when `graph_key` changes.
    """

    def __init__(self, model: nn.Module, cond: torch.Tensor, block_cond: torch.Tensor, width: int) -> None:
        device = cond.device
        self.key = graph_key(model, cond)
        self.cond = cond.clone()  # (2B, C)
        self.block_cond = block_cond.clone()
        self.inputs = [cond.new_zeros(cond.shape[0], patch * patch, width) for patch in model.patch_nums]
        self.caches = [KVCache(model.sequence_length) for _ in model.blocks]
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.outputs: list[torch.Tensor] = []  # per scale (2B, p², V), written by each replay
        with uncached_autocast(device):
            # Warm-up on a side stream (as torch's capture guide asks); it also allocates the caches outside the pool.
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for x in self.inputs:
                    scale_logits(model, x, self.block_cond, self.cond, self.caches)
            torch.cuda.current_stream(device).wait_stream(side)
            for cache in self.caches:
                cache.length = 0
            pool = torch.cuda.graph_pool_handle()  # shared: the scales replay in the order they were captured
            for x in self.inputs:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs.append(scale_logits(model, x, self.block_cond, self.cond, self.caches))
                self.graphs.append(graph)

    def start(self, cond: torch.Tensor, block_cond: torch.Tensor) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """Load a generation's class condition; returns its step: (scale index, (2B, p², C) input) -> (2B, p², V)
        logits (a static buffer, overwritten by the next generation)."""
        self.cond.copy_(cond)
        self.block_cond.copy_(block_cond)

        def step(scale_index: int, x: torch.Tensor) -> torch.Tensor:
            self.inputs[scale_index].copy_(x)
            self.graphs[scale_index].replay()
            return self.outputs[scale_index]

        return step


def network_step(
    model: nn.Module, cond: torch.Tensor, block_cond: torch.Tensor, width: int, cuda_graphs: bool
) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """One generation's network step per scale: (scale index, (2B, p², C) input) -> (2B, p², V) logits, eager with
    fresh KV caches, or replayed from the model's CUDA graphs (captured here when missing or stale)."""
    if not cuda_graphs:
        caches = [KVCache(model.sequence_length) for _ in model.blocks]  # each allocated once, at the first scale
        return lambda scale_index, x: scale_logits(model, x, block_cond, cond, caches)
    if cond.device.type != "cuda":
        raise UserError(f"CUDA graphs (--cuda-graphs) need the model on a CUDA device, and it is on {cond.device.type}: "
                        "leave them off there")
    if model.scale_graphs is None or model.scale_graphs.key != graph_key(model, cond):
        model.scale_graphs = None  # free the old graphs' memory before capturing new ones
        model.scale_graphs = ScaleGraphs(model, cond, block_cond, width)
    return model.scale_graphs.start(cond, block_cond)


class SampledTokens(NamedTuple):
    """Result of `VAR.generate_tokens`."""

    tokens: list[torch.Tensor]  # per scale (B, p*p) token ids, row-major
    logits: list[torch.Tensor]  # per scale (B, p*p, V) guided logits, before top-k / top-p
    features: torch.Tensor  # (B, z_channels, p_last, p_last) accumulated tokenizer features f̂


@torch.no_grad()
def scale_by_scale_generation(
    model: nn.Module,
    labels: torch.Tensor | Sequence[int],
    cfg: float = 1.5,
    top_k: int = 0,
    top_p: float = 0.0,
    seed: int | None = None,
    more_smooth: bool = False,
    generator: torch.Generator | None = None,
    source_tokens: Sequence[torch.Tensor] | None = None,
    keep_mask: torch.Tensor | None = None,
    cuda_graphs: bool = False,
) -> SampledTokens:
    """Sample tokens scale by scale with a KV cache and classifier-free guidance (bound as `VAR.generate_tokens`).

    Args:
        labels: (B,) class ids (num_classes = unconditional).
        cfg: guidance strength; at scale index k of K it ramps linearly as t = cfg·k/(K-1) and the logits
            are (1 + t)·conditional - t·unconditional.
        top_k: keep the k most likely tokens (0 = all).
        top_p: nucleus sampling threshold (0 = off).
        seed: seed of a fresh generator on the model's device (ignored when `generator` is given).
        more_smooth: feed a Gumbel-softmax mixture of codebook vectors instead of the sampled tokens
            (visualisation only, not for FID).
        generator: random generator to draw from (overrides `seed`).
        source_tokens: for zero-shot editing, the source image's tokens per scale, each (B, p*p).
        keep_mask: for editing, (H, W) or (B, H, W) finest-grid mask, 1 = keep the source token.
        cuda_graphs: replay each scale's network step from CUDA graphs (`ScaleGraphs`, captured on the first call
            for this batch size and precision): the same tokens, fewer launches. CUDA only.

    Returns:
        SampledTokens(tokens, logits, features); when editing, the tokens at kept positions are the source's.
    """
    quantizer = model.tokenizer.quantize
    labels = model.labels_tensor(labels)
    batch = labels.shape[0]
    editing = check_edit_inputs(source_tokens, keep_mask, model.patch_nums, batch)
    if editing:
        keep_mask = keep_mask.to(labels.device)
        source_tokens = [tokens.to(labels.device) for tokens in source_tokens]
    if generator is None and seed is not None:
        generator = torch.Generator(device=labels.device).manual_seed(seed)

    # The batch is doubled: the first half is conditioned on the labels, the second on the null class.
    cond = model.class_emb(torch.cat((labels, torch.full_like(labels, model.config.num_classes))))  # (2B, C)
    block_cond = model.block_condition(cond)
    level_and_position = model.lvl_embed(model.lvl_1L) + model.pos_1LC  # (1, L, C)
    x = cond.unsqueeze(1) + model.pos_start + level_and_position[:, : model.first_length]  # (2B, p_0², C)
    network = network_step(model, cond, block_cond, x.shape[-1], cuda_graphs)
    finest = model.patch_nums[-1]
    features = cond.new_zeros(batch, model.config.z_channels, finest, finest)  # (B, Cvae, p_K, p_K)
    all_tokens: list[torch.Tensor] = []
    all_logits: list[torch.Tensor] = []
    position = 0
    for scale_index, patch in enumerate(model.patch_nums):
        progress = scale_index / max(model.num_scales - 1, 1)
        both_logits = network(scale_index, x)  # (2B, p², V)
        guidance = cfg * progress
        logits = (1 + guidance) * both_logits[:batch] - guidance * both_logits[batch:]  # (B, p², V)
        filtered = filter_logits(logits, top_k, top_p)  # (B, p², V)
        tokens = sample_tokens(filtered, generator)  # (B, p²)
        if more_smooth:
            embedded = smooth_embedding(filtered, progress, quantizer.embedding.weight, generator)  # (B, p², Cvae)
        else:
            embedded = quantizer.embedding(tokens)  # (B, p², Cvae)
        if editing:
            keep = resize_keep_mask(keep_mask, patch, batch)  # (B, p²)
            tokens = torch.where(keep, source_tokens[scale_index], tokens)  # (B, p²)
            source_embedded = quantizer.embedding(source_tokens[scale_index])  # (B, p², Cvae)
            embedded = torch.where(keep.unsqueeze(-1), source_embedded, embedded)  # (B, p², Cvae)
        all_tokens.append(tokens)
        all_logits.append(logits)
        scale_features = embedded.transpose(1, 2).reshape(batch, -1, patch, patch)  # (B, Cvae, p, p)
        features, next_input = quantizer.next_autoregressive_input(scale_index, features, scale_features)
        position += patch * patch
        if scale_index + 1 < model.num_scales:
            next_length = model.patch_nums[scale_index + 1] ** 2
            next_input = next_input.flatten(2).transpose(1, 2)  # (B, p_next², Cvae)
            x = model.word_embed(next_input) + level_and_position[:, position : position + next_length]
            x = x.repeat(2, 1, 1)  # (2B, p_next², C), same input for both guidance halves
    return SampledTokens(all_tokens, all_logits, features)
