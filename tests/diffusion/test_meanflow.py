"""MeanFlow's training: gradient checkpointing through its JVP, the share of r < t at every micro-batch size, the
interval reaching every block kind, the target's stop-gradient, and trained-in guidance only where it applies."""
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from scalegen.diffusion.flow import LinearFlow
from scalegen.diffusion.meanflow import INTERVAL_SCALE, MeanFlow
from scalegen.diffusion.objective import TIME_SCALE
from scalegen.models.dit import DiT
from scalegen.models.dit_blocks import BLOCK_KINDS
from scalegen.train.dit_task import DiTTask, ObjectiveConfig
from scalegen.train.run_log import read_log
from scalegen.train.trainer import TrainConfig, train
from test_objectives import TINY, perturbed
from tests_support import tiny_fashion

MEANFLOW_DIT = replace(TINY, objective="meanflow")
SHARE_EXAMPLES = 4800  # per micro-batch size
SHARE_TOLERANCE = 0.02  # |share of r < t − mean_fraction|: 3.2 standard deviations at SHARE_EXAMPLES examples


class Recorder(nn.Module):
    """Wraps a network and keeps the (t, interval, labels) of each forward that autograd records (the one the loss
    trains; the JVP and the guidance's call run without autograd)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, interval: torch.Tensor,
                drop_labels: bool = True) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.calls.append((t.detach().clone(), interval.detach().clone(), y.clone()))
        return self.network(x, t, y, interval=interval, drop_labels=drop_labels)


class ScaledInput(nn.Module):
    """The cheapest network MeanFlow can train: its input times one weight, plus its times."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, interval: torch.Tensor,
                drop_labels: bool = True) -> torch.Tensor:
        return self.weight * x + (t / TIME_SCALE + interval).view(-1, 1, 1, 1)  # (B, C, H, W)


def float64_meanflow(**settings) -> tuple[DiT, MeanFlow]:
    model = perturbed(DiT(MEANFLOW_DIT), std=0.05).double().train()
    return model, MeanFlow(num_classes=TINY.num_classes, **settings)


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}


def test_gradient_checkpointing_gives_a_meanflow_step_the_gradients_it_has_without():
    model, objective = float64_meanflow(mean_fraction=1.0, guidance=2.0)  # every example through the JVP, guided
    x, labels = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([1, 2, 3, 4])
    found = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        torch.manual_seed(0)
        objective.training_losses(model, x, {"y": labels})["loss"].mean().backward()
        found.append(gradients(model))
    plain, checkpointed = found
    assert plain.keys() == checkpointed.keys() and "interval_embedder.mlp.0.weight" in plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-12, atol=1e-15, msg=name)


def test_a_meanflow_run_trains_with_gradient_checkpointing(tmp_path):
    torch.manual_seed(0)
    task = DiTTask(MEANFLOW_DIT, sample_steps=1, objective=ObjectiveConfig(name="meanflow", mean_fraction=0.5))
    train(task, tiny_fashion(), TrainConfig(out=str(tmp_path / "run"), steps=2, batch_size=4, log_every=1,
                                            device="cpu", precision="fp32", gradient_checkpointing=True))
    assert [row["step"] for row in read_log(tmp_path / "run")] == [1, 2]


@pytest.mark.parametrize("batch", [1, 2, 3, 6, 32])
def test_the_share_of_examples_with_r_below_t_is_the_fraction_at_every_micro_batch(batch):
    """Seen through what the network trains on: each example has r < t with probability mean_fraction."""
    objective = MeanFlow(mean_fraction=0.25, num_classes=TINY.num_classes)
    network = Recorder(ScaledInput())
    x, labels = torch.zeros(batch, 1, 2, 2), torch.zeros(batch, dtype=torch.long)
    torch.manual_seed(0)
    for _ in range(SHARE_EXAMPLES // batch):
        objective.training_losses(network, x, {"y": labels})
    assert len(network.calls) == SHARE_EXAMPLES // batch  # one trained forward per step, of the whole batch
    averaged = torch.cat([interval > 0 for _, interval, _ in network.calls])  # (N,)
    assert abs(averaged.double().mean().item() - 0.25) < SHARE_TOLERANCE


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_no_example_or_every_example_with_r_below_t_trains(fraction):
    objective = MeanFlow(mean_fraction=fraction, num_classes=TINY.num_classes)
    network = Recorder(ScaledInput())
    torch.manual_seed(0)
    loss = objective.training_losses(network, torch.randn(3, 1, 2, 2), {"y": torch.zeros(3, dtype=torch.long)})
    loss["loss"].mean().backward()
    (t, interval, _), = network.calls
    assert torch.equal(interval > 0, torch.full((3,), fraction == 1.0)) and network.network.weight.grad is not None


@pytest.mark.parametrize("block", BLOCK_KINDS)
def test_the_interval_reaches_the_blocks_of_every_kind(block):
    """Changing r (t fixed) changes what the transformer blocks compute, not only the final layer's modulation."""
    model = perturbed(DiT(replace(MEANFLOW_DIT, block=block)))
    kept = []
    model.blocks[-1].register_forward_hook(lambda module, inputs, output: kept.append(output))
    x, t, labels = torch.randn(2, 1, 8, 8), torch.full((2,), 0.8 * TIME_SCALE), torch.tensor([1, 2])
    with torch.no_grad():
        outputs = [model(x, t, labels, interval=torch.full((2,), gap * INTERVAL_SCALE)) for gap in (0.0, 0.6)]
    (instantaneous, averaged), (short, long) = kept, outputs
    assert (averaged - instantaneous).abs().max() > 1e-3 * instantaneous.abs().max()
    assert (long - short).abs().max() > 1e-3 * short.abs().max()


def test_no_gradient_flows_through_the_target():
    """The weights' gradients are those of the same loss with its target (and its adaptive weight) constants."""
    model, objective = float64_meanflow(mean_fraction=1.0, class_dropout=0.0)
    x, labels = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.tensor([1, 2, 3])
    torch.manual_seed(0)
    objective.training_losses(model, x, {"y": labels})["loss"].mean().backward()
    trained = gradients(model)
    model.zero_grad()
    torch.manual_seed(0)
    noise = torch.randn_like(x)
    t, r, _ = objective.sample_times(3, x.device)
    assert torch.all(r < t)
    velocity, z = noise - x, LinearFlow.interpolate(x, noise, t)
    average = lambda zz, tt: model(zz, tt * TIME_SCALE, labels, interval=(tt - r) * INTERVAL_SCALE,  # noqa: E731
                                   drop_labels=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        _, derivative = jvp(average, (z, t), (velocity, torch.ones_like(t)))
        target = velocity - (t - r).view(-1, 1, 1, 1) * derivative  # a constant
    squared_norm = ((average(z, t) - target) ** 2).flatten(1).sum(dim=1)  # (B,)
    (squared_norm / (squared_norm.detach() + objective.weighting_constant)).mean().backward()
    expected = gradients(model)
    assert trained.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(trained[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)


def test_trained_in_guidance_applies_only_to_kept_labels_inside_its_interval():
    """A dropped label's target and one outside the guidance interval are the plain velocity v; a kept label's
    inside it is ω·v + (1 − ω)·u(z_t, t, t | ∅)."""
    model = perturbed(DiT(MEANFLOW_DIT)).double()
    objective = MeanFlow(mean_fraction=0.0, guidance=3.0, guidance_interval=(0.3, 0.7), class_dropout=0.5,
                         num_classes=TINY.num_classes)
    network = Recorder(model)
    x, labels = torch.randn(32, 1, 8, 8, dtype=torch.float64), torch.arange(32) % TINY.num_classes
    torch.manual_seed(0)
    mse = objective.training_losses(network, x, {"y": labels})["mse"]
    torch.manual_seed(0)
    noise = torch.randn_like(x)
    (times, interval, seen), = network.calls
    t = times / TIME_SCALE  # (B,)
    dropped, inside = seen == TINY.num_classes, (t >= 0.3) & (t <= 0.7)  # (B,) each
    assert torch.equal(seen[~dropped], labels[~dropped]) and torch.equal(interval, torch.zeros(32))
    for kind in (dropped & inside, dropped & ~inside, ~dropped & inside, ~dropped & ~inside):
        assert kind.any()  # the draw holds every case
    z, velocity = LinearFlow.interpolate(x, noise, t), noise - x
    null = torch.full_like(labels, TINY.num_classes)
    with torch.no_grad():
        unconditional = model(z, times, null, interval=interval, drop_labels=False)
        guided = torch.where((~dropped & inside).view(-1, 1, 1, 1), 3.0 * velocity - 2.0 * unconditional, velocity)
        expected = ((model(z, times, seen, interval=interval, drop_labels=False) - guided) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(mse, expected, rtol=1e-12, atol=1e-15)


def test_meanflow_drops_labels_with_the_label_embedder_s_one_drop(monkeypatch):
    """One label dropout (`diffusion.objective.drop_labels`) serves the DiT's label embedder and MeanFlow, which drops
    before its passes (and tells the network not to drop again)."""
    from scalegen.diffusion import meanflow
    from scalegen.models import layers

    calls = []
    for module in (meanflow, layers):
        one_drop = module.drop_labels
        monkeypatch.setattr(module, "drop_labels", lambda *arguments, drop=one_drop, caller=module:
                            calls.append(caller) or drop(*arguments))
    labels = torch.arange(TINY.num_classes).repeat(4)  # (40,)
    torch.manual_seed(3)
    embedder = layers.LabelEmbedder(TINY.num_classes, 4, dropout_prob=0.5).train()
    embedded = embedder(labels)  # (40, 4)
    assert 0 < int((embedded == embedder.embedding_table.weight[TINY.num_classes]).all(dim=1).sum()) < len(labels)
    recorder = Recorder(ScaledInput())
    MeanFlow(num_classes=TINY.num_classes, class_dropout=0.5).training_losses(
        recorder, torch.zeros(len(labels), 1, 2, 2), dict(y=labels))
    seen = recorder.calls[0][2]  # (40,): the labels of the trained forward
    assert calls == [layers, meanflow]
    assert 0 < int((seen == TINY.num_classes).sum()) < len(labels)
