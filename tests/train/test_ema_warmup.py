"""The EMA warm-up: the decay of update n is min(decay, (1 + n) / (10 + n)), so a run from scratch samples weights
that moved (`--no-ema-warmup`: the official DiT's constant decay); a grid drawn from an EMA that still holds most of
its starting weights says so; the start line states the lr, its schedule and the EMA."""
import pytest
import torch
from torch import nn

from scalegen.cli.main import build_parser
from scalegen.cli.options import train_config_from_args
from scalegen.distributed import DistributedContext
from scalegen.train.dit_task import DiTTask
from scalegen.train.optimization import ema_decay_at, ema_start_share, update_ema
from scalegen.train.trainer import TrainConfig, Trainer
from test_fast_path import TINY_DIT
from tests_support import tiny_fashion

DECAY = 0.9999
# fp32 EMA against the same recursion in float64 from the same fp32 weights: each update rounds once to fp32 (a
# relative 6e-8 of weights below 1 in size), so three updates stay within 1e-6.
FP32_UPDATES = 1e-6


def expected_decays(steps: int, warmup: bool) -> list[float]:
    return [min(DECAY, (1 + step) / (10 + step)) if warmup else DECAY for step in range(steps)]


def test_update_ema_follows_the_warmup_formula_in_float64():
    torch.manual_seed(0)
    model, ema = nn.Linear(3, 2).double(), nn.Linear(3, 2).double()
    start = [parameter.detach().clone() for parameter in ema.parameters()]
    expected = [parameter.clone() for parameter in start]
    for step, decay in enumerate(expected_decays(5, warmup=True)):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_()
        update_ema(ema, model, DECAY, step=step)
        expected = [decay * average + (1 - decay) * weight.detach()
                    for average, weight in zip(expected, model.parameters())]
        assert ema_decay_at(DECAY, step) == decay
    for average, wanted in zip(ema.parameters(), expected):  # float64: the two orders of rounding differ by ~1e-16
        torch.testing.assert_close(average, wanted, atol=1e-12, rtol=0)
    share = 1.0
    for decay in expected_decays(5, warmup=True):
        share *= decay
    assert ema_start_share(DECAY, 5, warmup=True) == pytest.approx(share, rel=1e-12)
    assert ema_start_share(DECAY, 5, warmup=False) == pytest.approx(DECAY ** 5, rel=1e-12)


class RecordedWeights(DiTTask):
    """A tiny DiT task that records the model's weights before each step's loss (the weights after the last step)."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__(TINY_DIT, sample_steps=2)
        self.trainer, self.weights = None, []

    def loss(self, model, batch):
        self.weights.append([parameter.detach().double() for parameter in self.trainer.model.parameters()])
        return super().loss(model, batch)


@pytest.mark.parametrize("warmup", [True, False])
def test_the_ema_of_a_run_is_the_warmed_up_average_of_its_steps(tmp_path, capsys, warmup):
    task = RecordedWeights()
    config = TrainConfig(out=str(tmp_path), steps=3, batch_size=16, lr=2e-3, log_every=1, checkpoint_every=1000,
                         device="cpu", precision="fp32", ema_decay=DECAY, ema_warmup=warmup)
    task.trainer = trainer = Trainer(task, tiny_fashion(), config, DistributedContext())
    trainer.run()
    after_steps = [*task.weights[1:], [parameter.detach().double() for parameter in trainer.model.parameters()]]
    expected = task.weights[0]  # the EMA starts as the model
    for decay, weights in zip(expected_decays(3, warmup), after_steps):
        expected = [decay * average + (1 - decay) * weight for average, weight in zip(expected, weights)]
    for average, wanted in zip(trainer.ema.parameters(), expected):
        torch.testing.assert_close(average.double(), wanted, atol=FP32_UPDATES, rtol=0)
    output = capsys.readouterr().out
    assert "lr 0.002 (warm-up 0 steps, then constant), EMA 0.9999" in output
    assert ("warmed up as (1 + n) / (10 + n)" in output) == warmup
    # Without the warm-up three steps leave the EMA at 99.97 % of the initial weights: the grid says so.
    hint = ("samples: the EMA still holds 100% of the initial weights at step 3; sample the raw weights with "
            "--weights raw")
    assert (hint in output) != warmup


def test_the_warmup_is_on_by_default_and_no_ema_warmup_switches_it_off():
    words = ["train", "dit", "--out", "unused", "--steps", "1"]
    assert train_config_from_args(build_parser(["train"]).parse_args(words)).ema_warmup
    assert not train_config_from_args(build_parser(["train"]).parse_args([*words, "--no-ema-warmup"])).ema_warmup
