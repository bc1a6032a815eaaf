"""VAR generation, scale by scale (`ScaleByScaleGeneration`, run by `VAR.generate_tokens`), from parts that each own
one choice:

- `ScaleNetwork`: one VAR's side of a generation — its class condition for both guidance halves, its static KV
  caches, its network step per scale (eager, or replayed from CUDA graphs: `ScaleGraphs`) and which tokens each
  block computes (every one, or FastVAR's pruned set: `var_pruning`);
- `ScaleGuidance` (`token_heads`): classifier-free guidance, ramping linearly with the scale index as in the official
  code, the halves combined by the model's token head;
- the token head's sampler (`token_heads.TokenSampler`): a scale's head output -> tokens and their tokenizer features;
- `Editing`: zero-shot editing, the source's tokens kept where the mask says;
- collaborative decoding (CoDe, Chen et al. 2025): a drafter VAR generates the coarse scales, a refiner VAR (any VAR
  on the same tokenizer, usually a smaller one) reads the drafted scales into its own KV caches and generates the
  finest ones.

With one network, no pruning and VAR's head, the draws are the official `autoregressive_infer_cfg`'s, draw for draw.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import NamedTuple

import torch
from torch import nn

from scalegen.errors import UserError
from scalegen.fingerprint import module_fingerprint
from scalegen.models.var_blocks import KVCache
from scalegen.models.var_edit import resize_keep_mask
from scalegen.models.var_pruning import PrunedGeneration, TokenPruning
from scalegen.models.sampling_settings import VARSampling
from scalegen.models.token_heads import ScaleGuidance, TokenSampler


def scale_hidden(
    model: nn.Module, x: torch.Tensor, block_cond: torch.Tensor, caches: Sequence[KVCache],
    pruned: PrunedGeneration | None = None, scale_index: int = 0,
) -> torch.Tensor:
    """The blocks over one scale's positions, each extending its KV cache.

    Args:
        x: (2B, p², C) inputs of the scale, for both guidance halves.
        block_cond: what the blocks' AdaLN reads (`VAR.block_condition`).
        caches: one KV cache per block.
        pruned: the generation's token pruning, or None to compute every token.
        scale_index: the scale, for the pruning.

    Returns:
        (2B, p², C) hidden states.
    """
    for block_index, (block, cache) in enumerate(zip(model.blocks, caches)):
        tokens = None if pruned is None else pruned.block_tokens(scale_index, block_index)
        x = block(x, block_cond, cache=cache, tokens=tokens)  # (2B, p², C)
    return x


def scale_output(
    model: nn.Module, x: torch.Tensor, block_cond: torch.Tensor, cond: torch.Tensor, caches: Sequence[KVCache],
    pruned: PrunedGeneration | None = None, scale_index: int = 0,
) -> torch.Tensor:
    """The network part of one scale's generation step: `scale_hidden`, then the token head's output (2B, p², ...)
    in float32, logits (2B, p², V) for VAR's head (`cond`: the (2B, C) class embeddings the head reads)."""
    hidden = scale_hidden(model, x, block_cond, caches, pruned, scale_index)  # (2B, p², C)
    return model.token_head.output(model, hidden, cond)  # (2B, p², ...)


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
    """Every scale's network step (`scale_output`) captured once as a CUDA graph, for one batch size and autocast
    state, and replayed by generation: one launch per scale instead of one per kernel, with no Python in between.

    Inputs are copied into static buffers. The KV caches are static too: replaying the scales in order refills them
    in place, so each generation overwrites the last. Captured by a `ScaleNetwork` with `cuda_graphs=True` on its
    first use, kept on the model (`model.scale_graphs`) and recaptured when `graph_key` changes.
    """

    def __init__(self, model: nn.Module, cond: torch.Tensor, block_cond: torch.Tensor, width: int) -> None:
        device = cond.device
        self.key = graph_key(model, cond)
        self.cond = cond.clone()  # (2B, C)
        self.block_cond = block_cond.clone()
        self.inputs = [cond.new_zeros(cond.shape[0], patch * patch, width) for patch in model.patch_nums]
        self.caches = [KVCache(model.sequence_length) for _ in model.blocks]
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.outputs: list[torch.Tensor] = []  # per scale (2B, p², ...), written by each replay
        with uncached_autocast(device):
            # Warm-up on a side stream (as torch's capture guide asks); it also allocates the caches outside the pool.
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for x in self.inputs:
                    scale_output(model, x, self.block_cond, self.cond, self.caches)
            torch.cuda.current_stream(device).wait_stream(side)
            for cache in self.caches:
                cache.length = 0
            pool = torch.cuda.graph_pool_handle()  # shared: the scales replay in the order they were captured
            for x in self.inputs:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs.append(scale_output(model, x, self.block_cond, self.cond, self.caches))
                self.graphs.append(graph)

    def start(self, cond: torch.Tensor, block_cond: torch.Tensor) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """Load a generation's class condition; returns its step: (scale index, (2B, p², C) input) -> (2B, p², ...)
        head output (a static buffer, overwritten by the next generation)."""
        self.cond.copy_(cond)
        self.block_cond.copy_(block_cond)

        def step(scale_index: int, x: torch.Tensor) -> torch.Tensor:
            self.inputs[scale_index].copy_(x)
            self.graphs[scale_index].replay()
            return self.outputs[scale_index]

        return step


class ScaleNetwork:
    """One VAR's side of a generation: its class condition for both guidance halves (the first B rows conditioned on
    the labels, the last B on the null class), its KV caches, and its step per scale."""

    def __init__(self, model: nn.Module, labels: torch.Tensor, cuda_graphs: bool = False,
                 pruning: TokenPruning | None = None) -> None:
        """
        Args:
            model: the VAR.
            labels: (B,) class ids on the model's device.
            cuda_graphs: replay the steps from the model's CUDA graphs (captured here when missing or stale).
            pruning: FastVAR's token pruning at the finest scales, or None to compute every token.
        """
        self.model = model
        self.batch = labels.shape[0]
        self.cond = model.class_emb(torch.cat((labels, torch.full_like(labels, model.config.num_classes))))  # (2B, C)
        self.block_cond = model.block_condition(self.cond)
        self.level_and_position = model.lvl_embed(model.lvl_1L) + model.pos_1LC  # (1, L, C)
        lengths = [patch * patch for patch in model.patch_nums]
        self.starts = [sum(lengths[:index]) for index in range(len(lengths) + 1)]
        self.pruned = None if pruning is None else PrunedGeneration(pruning, model.patch_nums, len(model.blocks))
        self.caches = [KVCache(model.sequence_length) for _ in model.blocks]  # each allocated at its first scale
        self.graph_step = self.captured_step() if cuda_graphs else None

    def captured_step(self) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """The model's CUDA graphs, started for this generation (captured when missing or stale)."""
        model = self.model
        if self.cond.device.type != "cuda":
            raise UserError(f"CUDA graphs (--cuda-graphs) need the model on a CUDA device, and it is on "
                            f"{self.cond.device.type}: leave them off there")
        if self.pruned is not None:
            raise UserError("CUDA graphs (--cuda-graphs) replay the full scales: leave them off with token pruning")
        if model.scale_graphs is None or model.scale_graphs.key != graph_key(model, self.cond):
            model.scale_graphs = None  # free the old graphs' memory before capturing new ones
            model.scale_graphs = ScaleGraphs(model, self.cond, self.block_cond, self.cond.shape[-1])
        return model.scale_graphs.start(self.cond, self.block_cond)

    def inputs(self, scale_index: int, word_input: torch.Tensor | None) -> torch.Tensor:
        """The transformer's input at a scale: the start token at the first, else the embedded tokenizer features.

        Args:
            scale_index: the scale.
            word_input: (B, p², Cvae) the coarser scales' features area-downsampled to this scale (None at the first).

        Returns:
            (2B, p², C), the same positions for both guidance halves.
        """
        model = self.model
        start, end = self.starts[scale_index], self.starts[scale_index + 1]
        if scale_index == 0:
            return self.cond.unsqueeze(1) + model.pos_start + self.level_and_position[:, start:end]  # (2B, p_0², C)
        x = model.word_embed(word_input) + self.level_and_position[:, start:end]  # (B, p², C)
        return x.repeat(2, 1, 1)  # (2B, p², C)

    def output(self, scale_index: int, word_input: torch.Tensor | None) -> torch.Tensor:
        """One scale's network step: (2B, p², ...) float32 head output of both halves (logits (2B, p², V) for VAR's
        head; a static buffer under CUDA graphs)."""
        x = self.inputs(scale_index, word_input)  # (2B, p², C)
        if self.graph_step is not None:
            return self.graph_step(scale_index, x)
        return scale_output(self.model, x, self.block_cond, self.cond, self.caches, self.pruned, scale_index)

    def prefill(self, word_inputs: Sequence[torch.Tensor | None]) -> None:
        """Read the scales another network generated into this one's KV caches (no head).

        Args:
            word_inputs: the inputs of the scales so far, as for `inputs` (None for the first).
        """
        if self.graph_step is not None:
            raise UserError("CUDA graphs (--cuda-graphs) replay one model's full generation: leave them off with a "
                            "refiner")
        for scale_index, word_input in enumerate(word_inputs):
            scale_hidden(self.model, self.inputs(scale_index, word_input), self.block_cond, self.caches, self.pruned,
                         scale_index)


class Editing:
    """Zero-shot editing: at every scale the source image's tokens replace the drawn ones where the keep mask (resized
    to the scale) says so."""

    def __init__(self, source_tokens: Sequence[torch.Tensor], keep_mask: torch.Tensor, device: torch.device) -> None:
        """
        Args:
            source_tokens: the source's tokens per scale, each (B, p*p).
            keep_mask: (H, W) or (B, H, W) finest-grid mask, 1 = keep the source token.
            device: the generation's device.
        """
        self.source_tokens = [tokens.to(device) for tokens in source_tokens]
        self.keep_mask = keep_mask.to(device)

    def apply(self, scale_index: int, patch: int, tokens: torch.Tensor, embedded: torch.Tensor,
              sampler: TokenSampler) -> tuple[torch.Tensor, torch.Tensor]:
        """The scale's tokens (B, p², ...) and features (B, p², Cvae) with the kept positions the source's."""
        keep = resize_keep_mask(self.keep_mask, patch, tokens.shape[0])  # (B, p²)
        source = self.source_tokens[scale_index]  # (B, p², ...)
        tokens = torch.where(keep.view(*keep.shape, *[1] * (tokens.ndim - 2)), source, tokens)  # (B, p², ...)
        embedded = torch.where(keep.unsqueeze(-1), sampler.embed(source), embedded)  # (B, p², Cvae)
        return tokens, embedded


class SampledTokens(NamedTuple):
    """Result of `VAR.generate_tokens`."""

    tokens: list[torch.Tensor]  # per scale (B, p*p, ...) tokens, row-major: ids (B, p*p) for VAR's head
    logits: list[torch.Tensor]  # per scale (B, p*p, ...) guided head output: logits before top-k / top-p for VAR's
    features: torch.Tensor  # (B, z_channels, p_last, p_last) accumulated tokenizer features f̂


class ScaleByScaleGeneration:
    """One generation: scale after scale, the network step, the token head's guidance and sampling, editing, and the
    tokenizer's accumulated features that make the next scale's input."""

    def __init__(self, quantizer: nn.Module, networks: Sequence[tuple[int, ScaleNetwork]], sampler: TokenSampler,
                 guidance: ScaleGuidance, editing: Editing | None = None) -> None:
        """
        Args:
            quantizer: the tokenizer's multi-scale quantizer (its scales are the generation's).
            networks: (first scale, network) pairs in order of their first scales, the first at scale 0; each network
                generates from its first scale up to the next one's, reading the scales before into its KV caches.
            sampler: the token head's sampling step.
            guidance: the classifier-free guidance (its schedule; the head combines the halves).
            editing: zero-shot editing, or None.
        """
        if not networks or networks[0][0] != 0:
            raise ValueError("the first network must start at scale 0")
        self.quantizer = quantizer
        self.networks = list(networks)
        self.sampler = sampler
        self.guidance = guidance
        self.editing = editing

    def network_at(self, scale_index: int, word_inputs: list[torch.Tensor | None]) -> ScaleNetwork:
        """The network generating this scale; one that starts here first reads the scales so far."""
        current = self.networks[0][1]
        for first_scale, network in self.networks:
            if first_scale == scale_index and scale_index > 0:
                network.prefill(word_inputs[:scale_index])
            if first_scale <= scale_index:
                current = network
        return current

    def run(self) -> SampledTokens:
        """Generate every scale; returns the tokens, the guided head outputs and the accumulated features."""
        patch_nums = self.quantizer.patch_nums
        batch = self.networks[0][1].batch
        finest = patch_nums[-1]
        features = self.networks[0][1].cond.new_zeros(batch, self.quantizer.channels, finest, finest)  # (B, Cvae, p_K, p_K)
        word_inputs: list[torch.Tensor | None] = [None]  # per scale (B, p², Cvae); the first scale has the start token
        all_tokens: list[torch.Tensor] = []
        all_guided: list[torch.Tensor] = []
        for scale_index, patch in enumerate(patch_nums):
            network = self.network_at(scale_index, word_inputs)
            both = network.output(scale_index, word_inputs[scale_index])  # (2B, p², ...)
            # (B, p², ...) tokens, (B, p², Cvae) their features, (B, p², ...) the guided output they were drawn from
            tokens, embedded, guided = self.sampler.sample(both, self.guidance, scale_index)
            if self.editing is not None:
                tokens, embedded = self.editing.apply(scale_index, patch, tokens, embedded, self.sampler)
            all_tokens.append(tokens)
            all_guided.append(guided)
            scale_features = embedded.transpose(1, 2).reshape(batch, -1, patch, patch)  # (B, Cvae, p, p)
            features, next_input = self.quantizer.next_autoregressive_input(scale_index, features, scale_features)
            if scale_index + 1 < len(patch_nums):
                word_inputs.append(next_input.flatten(2).transpose(1, 2))  # (B, p_next², Cvae)
        return SampledTokens(all_tokens, all_guided, features)


def scale_networks(model: nn.Module, labels: torch.Tensor, settings: VARSampling) -> list[tuple[int, ScaleNetwork]]:
    """The networks of a generation, as `ScaleByScaleGeneration` takes them: the model's from the first scale, and
    with a refiner (CoDe) the refiner's from its first refined scale.

    Args:
        model: the VAR (the drafter, with a refiner).
        labels: (B,) class ids on the model's device.
        settings: the generation's settings (CUDA graphs, pruning, refiner, refined scales).
    """
    pruning, refiner = settings.pruning, settings.refiner
    networks = [(0, ScaleNetwork(model, labels, settings.cuda_graphs, pruning))]
    if refiner is not None:
        check_refiner(model, refiner, settings.refined_scales)
        if settings.cuda_graphs:
            raise UserError("CUDA graphs (--cuda-graphs) replay one model's full generation: leave them off with a "
                            "refiner")
        # A refiner too shallow for the unpruned first and last blocks computes every token.
        refiner_pruning = pruning if pruning is not None and pruning.pruned_blocks(refiner.config.depth) else None
        networks.append((model.num_scales - settings.refined_scales,
                         ScaleNetwork(refiner, labels, pruning=refiner_pruning)))
    return networks


def check_refiner(drafter: nn.Module, refiner: nn.Module, refined_scales: int) -> None:
    """A one-line UserError unless `refiner` can generate the last `refined_scales` scales of `drafter`'s images."""
    drafted = (drafter.config.patch_nums, drafter.config.vocab_size, drafter.config.z_channels, drafter.config.num_classes)
    refined = (refiner.config.patch_nums, refiner.config.vocab_size, refiner.config.z_channels, refiner.config.num_classes)
    if drafted != refined:
        raise UserError(f"the refiner has (patch_nums, vocab_size, z_channels, num_classes) = {refined} but the drafter "
                        f"{drafted}: give a refiner trained on the drafter's tokenizer and classes")
    if refiner.config.token_head != drafter.config.token_head:
        raise UserError(f"the refiner has the {refiner.config.token_head!r} token head but the drafter the "
                        f"{drafter.config.token_head!r} one: give a refiner with the drafter's token head")
    # Compared by fingerprints each tokenizer remembers: repeated generations hash each once.
    if refiner.tokenizer is not drafter.tokenizer and (module_fingerprint(refiner.tokenizer)
                                                       != module_fingerprint(drafter.tokenizer)):
        raise UserError("the refiner's tokenizer has other weights than the drafter's (its tokens mean other images): "
                        "give a refiner trained on the drafter's tokenizer and classes")
    if not 1 <= refined_scales < len(drafter.config.patch_nums):
        raise UserError(f"the refiner can generate 1 to {len(drafter.config.patch_nums) - 1} of the "
                        f"{len(drafter.config.patch_nums)} scales, not {refined_scales}")
