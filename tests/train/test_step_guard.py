"""The one step guard (train/stepping.py `GradientStep`): every optimizer of a run, REPA-E's tokenizer's too, is
unscaled, checked, applied or skipped, and zeroed together; nothing non-finite reaches a checkpoint (the tokenizer's
weight file included); the one gradient average over ranks takes every rank through the same collectives."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from scalegen.data.batch import Batch
from scalegen.data.names import IMAGES
from scalegen.distributed import DistributedContext
from scalegen.runs.folder import TOKENIZER_FILE, last_checkpoint
from scalegen.train.kl_task import KLLosses
from scalegen.train import optimization
from scalegen.train.run_log import read_log
from scalegen.train.trainer import TrainConfig, Trainer
from test_kl_tokenizer import tiny_end_to_end_task, tiny_images
from tests_support import tiny_fashion, torchrun, without_progress_bars



def end_to_end_trainer(tmp_path: Path, precision: str, steps: int = 3) -> Trainer:
    """A trainer of a tiny REPA-E run (a KL tokenizer tuned with a DiT through REPA's loss), as `train dit
    --end-to-end` builds it."""
    task = tiny_end_to_end_task(tmp_path, 1.5, KLLosses())
    task.extra_config["tokenizer"] = {"kind": "kl"}  # what `train dit --tokenizer` records
    config = TrainConfig(out=str(tmp_path / "run"), steps=steps, batch_size=6, lr=1e-3, log_every=1,
                         checkpoint_every=1000, device="cpu", precision=precision)
    return Trainer(task, tiny_fashion(8), config, DistributedContext())


def backward(trainer: Trainer, poisoned: bool) -> torch.Tensor:
    """One loss of the run on a fixed batch, backward through the run's scaler; `poisoned`: one of the tokenizer's
    gradients is made infinite (the DiT's stay finite). Returns the loss."""
    torch.manual_seed(1)
    batch = Batch(IMAGES, label=torch.arange(6), image=tiny_images(6))
    loss, _ = trainer.task.loss(trainer.model, batch)
    trainer.scaler.scale(loss).backward()
    if poisoned:
        next(trainer.task.end_to_end.tokenizer.parameters()).grad.view(-1)[0] = math.inf
    return loss.detach()


def weights(module: nn.Module) -> list[torch.Tensor]:
    return [parameter.detach().clone() for parameter in module.parameters()]


def unchanged(module: nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(parameter, earlier) for parameter, earlier in zip(module.parameters(), before))


@pytest.mark.parametrize("precision, fused", [("fp32", False), ("fp16", False), ("fp32", True)],
                         ids=["fp32", "fp16", "fused"])
@pytest.mark.end_to_end
def test_a_non_finite_tokenizer_gradient_skips_the_whole_end_to_end_step(tmp_path, monkeypatch, precision, fused):
    if fused:  # the GPU's code path on CPU: fused AdamWs that skip the step on the device (`found_inf`)
        monkeypatch.setattr(optimization, "FUSED_DEVICES", ("cpu", "cuda"))
    trainer = end_to_end_trainer(tmp_path, precision)
    assert trainer.gradient_step.skip_on_device == fused
    tokenizer, tokenizer_optimizer = trainer.task.end_to_end.tokenizer, trainer.task.end_to_end.optimizer
    model_before, tokenizer_before, scale = weights(trainer.model), weights(tokenizer), trainer.scaler.get_scale()
    applied = trainer.gradient_step({"loss": backward(trainer, poisoned=True)}, logging=False, step=0)
    assert not bool(applied)
    assert unchanged(tokenizer, tokenizer_before) and unchanged(trainer.model, model_before)
    for state in [*tokenizer_optimizer.state.values(), *trainer.optimizer.state.values()]:  # none before a step,
        assert int(state["step"]) == 0 and not state["exp_avg"].any()  # or (fused) untouched
    # Zeroed: nothing of the skipped step adds into the next one.
    assert all(parameter.grad is None for parameter in [*tokenizer.parameters(), *trainer.model.parameters()])
    if precision == "fp16":
        assert trainer.scaler.get_scale() < scale  # the overflow lowered the scale

    applied = trainer.gradient_step({"loss": backward(trainer, poisoned=False)}, logging=False, step=1)
    assert bool(applied)  # a clean step moves the DiT and the tokenizer together
    assert not unchanged(tokenizer, tokenizer_before) and not unchanged(trainer.model, model_before)
    assert all(parameter.grad is None for parameter in tokenizer.parameters())


@pytest.mark.end_to_end
def test_an_end_to_end_run_skips_a_poisoned_step_for_the_tokenizer_too(tmp_path):
    trainer = end_to_end_trainer(tmp_path, "fp32", steps=3)
    task, tokenizer = trainer.task, trainer.task.end_to_end.tokenizer
    states, compute_loss = [], task.loss

    def loss(model, batch):  # records the tokenizer before each step
        states.append(weights(tokenizer))
        return compute_loss(model, batch)

    # Step 2's tokenizer gradient is infinite; the loss and the DiT's gradients stay finite.
    next(tokenizer.parameters()).register_hook(lambda grad: grad * math.inf if len(states) == 2 else grad)
    task.loss = loss
    trainer.run()
    before_first, before_poisoned, before_third = states
    assert not all(torch.equal(a, b) for a, b in zip(before_first, before_poisoned))  # step 1 tuned it
    assert all(torch.equal(a, b) for a, b in zip(before_poisoned, before_third))  # step 2 left it as it was
    assert [row["nonfinite_steps"] for row in read_log(tmp_path / "run")] == [0, 1, 1]
    assert all(bool(torch.isfinite(tensor).all())
               for tensor in load_file(last_checkpoint(tmp_path / "run") / TOKENIZER_FILE).values())


def test_a_non_finite_tokenizer_is_never_written(tmp_path, capsys):
    trainer = end_to_end_trainer(tmp_path, "fp32")
    trainer.folder.root.mkdir(parents=True)
    parameter = next(trainer.task.end_to_end.tokenizer.parameters())  # the DiT and its EMA stay finite
    kept = parameter.detach().clone()
    with torch.no_grad():
        parameter.view(-1)[0] = math.nan
    trainer.save()
    assert last_checkpoint(trainer.folder.root) is None
    assert "not writing checkpoint step 0: the weights are not finite" in capsys.readouterr().out
    with torch.no_grad():
        parameter.copy_(kept)
    trainer.save()
    assert (last_checkpoint(trainer.folder.root) / TOKENIZER_FILE).exists()


@pytest.mark.multiprocess
def test_two_ranks_average_gradients_when_one_rank_lacks_one(tmp_path):
    result = tmp_path / "result"
    completed = torchrun(Path(__file__).with_name("gradient_average_worker.py"), str(result), timeout=120)
    assert completed.returncode == 0, without_progress_bars(completed.stderr)
    for rank in range(2):  # every rank holds the mean; a gradient one rank lacks counts as zeros there
        averaged = json.loads((tmp_path / f"result.{rank}").read_text())
        assert averaged == {"shared": [1.5, 1.5, 1.5], "lone": [2.0, -1.0], "double": [0.25, 0.75]}
