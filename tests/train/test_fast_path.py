"""The fast path of the trainer: no host reads of tensors between log steps (the GPU's code path, run on CPU), a
non-finite step skipped on the device, forwards that torch.compile captures whole, regional compilation that keeps
the checkpoint keys, and FSDP training equal to DDP's that resumes either way (a DiT, and a VAR of either head)."""
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from scalegen.distributed import DistributedContext
from scalegen.errors import UserError
from scalegen.files import json_config
from scalegen.models.dit import DiT, DiTConfig
from scalegen.models.var import VAR, VARConfig
from scalegen.runs.folder import is_sharded, last_checkpoint
from scalegen.runs.weights import load_weights
from scalegen.tokenizers.vqvae import VQVAE
from scalegen.train import optimization
from scalegen.train.dit_task import DiTTask
from scalegen.train.run_log import read_log
from scalegen.train.trainer import TrainConfig, Trainer, train
from scalegen.train.var_task import VARTask
from test_tokenizer_training import TINY_TOKENIZER
from test_var_training import TINY_VAR
from tests_support import tiny_fashion, torchrun, without_progress_bars

TINY_DIT = DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__")  # each waits for the device
FSDP_TOLERANCE = 1e-5  # |loss(FSDP) - loss(DDP)| per step, and |weight difference| at the end


@pytest.fixture
def device_skip(monkeypatch):
    """The GPU's code path on CPU: a fused AdamW that skips non-finite steps on the device (CPU runs use foreach)."""
    monkeypatch.setattr(optimization, "FUSED_DEVICES", ("cpu", "cuda"))


def count_host_reads(monkeypatch) -> list[int]:
    """Count every call of the tensor methods that bring a value to the host; returns the (one-item) counter."""
    counter = [0]
    for name in HOST_READS:
        def counted(self, *args, _original=getattr(torch.Tensor, name), **kwargs):
            counter[0] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return counter


def dit_task() -> DiTTask:
    torch.manual_seed(0)
    return DiTTask(TINY_DIT, sample_steps=2)


def var_task() -> VARTask:
    torch.manual_seed(0)
    return VARTask(VARConfig(**TINY_VAR), VQVAE(TINY_TOKENIZER).eval(), {"model": json_config(TINY_TOKENIZER)})


@pytest.mark.parametrize("make_task", [dit_task, var_task], ids=["dit", "var"])
def test_no_host_reads_between_log_steps(tmp_path, monkeypatch, device_skip, make_task):
    task = make_task()
    marks: list[int] = []  # the count at each micro-step's loss: step k's reads are marks[k] - marks[k - 1]
    compute_loss = task.loss

    def loss(model, batch):
        marks.append(counter[0])
        return compute_loss(model, batch)

    task.loss = loss
    counter = count_host_reads(monkeypatch)
    train(task, tiny_fashion(), TrainConfig(out=str(tmp_path), steps=6, batch_size=16, lr=1e-3, log_every=3,
                                            checkpoint_every=1000, device="cpu", precision="fp32"))
    monkeypatch.undo()
    reads = [after - before for before, after in itertools.pairwise(marks)]  # steps 1..5
    assert reads[2] > 0  # step 3 is logged: its figures are read (the counter sees host reads)
    assert [reads[index] for index in (0, 1, 3, 4)] == [0, 0, 0, 0], reads
    assert [row["step"] for row in read_log(tmp_path)] == [3, 6]


class PoisonedStep(DiTTask):
    """A DiT task whose loss is NaN on the micro-steps in `poisoned` (1-based); records the trainer's state before
    each loss."""

    def __init__(self, poisoned: set[int]):
        torch.manual_seed(0)
        super().__init__(TINY_DIT, sample_steps=2)
        self.poisoned, self.calls, self.trainer, self.states = poisoned, 0, None, []

    def loss(self, model, batch):
        self.calls += 1
        trainer = self.trainer
        self.states.append({"model": [parameter.detach().clone() for parameter in trainer.model.parameters()],
                            "ema": [parameter.clone() for parameter in trainer.ema.parameters()],
                            "optimizer": [value.clone() for state in trainer.optimizer.state.values()
                                          for value in state.values()]})
        loss, extra = super().loss(model, batch)
        return (loss * math.nan if self.calls in self.poisoned else loss), extra


def test_a_non_finite_step_is_skipped_on_the_device(tmp_path, device_skip):
    task = PoisonedStep(poisoned={2})
    config = TrainConfig(out=str(tmp_path), steps=3, batch_size=16, lr=1e-3, log_every=1, checkpoint_every=1000,
                         device="cpu")
    task.trainer = trainer = Trainer(task, tiny_fashion(), config, DistributedContext())
    assert trainer.gradient_step.skip_on_device and not trainer.host_outcome
    trainer.run()
    _, after_first, after_skipped = task.states  # before steps 1, 2 and 3
    for part in ("model", "ema", "optimizer"):  # the optimizer's moments and step counts too
        assert len(after_first[part]) > 0 and all(torch.equal(a, b) for a, b in zip(after_first[part],
                                                                                    after_skipped[part])), part
    assert any(not torch.equal(a, b) for a, b in zip(after_skipped["model"], trainer.model.parameters()))  # step 3
    rows = read_log(tmp_path)
    assert [row["nonfinite_steps"] for row in rows] == [0, 1, 1] and math.isnan(rows[1]["loss"])


@pytest.mark.parametrize("log_every, message", [(1, r"3 steps in a row \(up to step 5\)"),
                                                (4, r"3 steps in a row \(up to step 5, noticed at step 6\)")])
def test_the_device_side_guard_stops_a_diverged_run(tmp_path, device_skip, log_every, message):
    task = PoisonedStep(poisoned=set(range(3, 100)))
    config = TrainConfig(out=str(tmp_path), steps=10, batch_size=16, lr=1e-3, log_every=log_every, checkpoint_every=2,
                         device="cpu", max_nonfinite_steps=3)
    task.trainer = Trainer(task, tiny_fashion(), config, DistributedContext())
    with pytest.raises(UserError, match=f"training diverged.*{message}.*step-0000002"):
        task.trainer.run()
    assert last_checkpoint(tmp_path).name == "step-0000002"  # steps 4, 6 and 8 were in the middle of skipped steps


def test_the_dit_and_var_forwards_compile_without_graph_breaks():
    dit = DiT(TINY_DIT).train()
    images, steps, labels = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    explained = torch._dynamo.explain(dit)(images, steps, labels)
    assert explained.graph_break_count == 0, explained.break_reasons
    tokenizer = VQVAE(TINY_TOKENIZER).eval()
    var = VAR(VARConfig(**TINY_VAR), tokenizer=tokenizer).train()
    var_input = tokenizer.tokens_to_var_input(tokenizer.img_to_tokens(torch.rand(2, 1, 8, 8) * 2 - 1))
    explained = torch._dynamo.explain(var)(labels, var_input)
    assert explained.graph_break_count == 0, explained.break_reasons
    with pytest.raises(ValueError, match="class ids"):  # the device-side label check still says what is wrong
        var(torch.tensor([-1, 2]), var_input)


def test_regional_compilation_compiles_the_blocks_and_keeps_the_checkpoint_keys(tmp_path, monkeypatch):
    compiled = []
    compile_module = nn.Module.compile

    def eager_compile(self, *args, **kwargs):  # dynamo's tracing without inductor's slow CPU code generation
        compiled.append(type(self).__name__)
        compile_module(self, backend="eager")

    monkeypatch.setattr(nn.Module, "compile", eager_compile)
    settings = dict(steps=2, batch_size=16, lr=1e-3, log_every=1, checkpoint_every=1000, device="cpu")
    train(dit_task(), tiny_fashion(), TrainConfig(out=str(tmp_path / "compiled"), compile=True, **settings))
    assert compiled == [type(block).__name__ for block in DiT(TINY_DIT).blocks]  # the blocks, not the whole model
    train(dit_task(), tiny_fashion(), TrainConfig(out=str(tmp_path / "plain"), **settings))
    stored = load_weights(tmp_path / "compiled")[1]
    assert sorted(stored) == sorted(DiT(TINY_DIT).state_dict())  # no `_orig_mod.` prefixes
    for compiled_row, plain_row in zip(read_log(tmp_path / "compiled"), read_log(tmp_path / "plain")):
        assert compiled_row["loss"] == pytest.approx(plain_row["loss"], abs=1e-6)


@pytest.mark.multiprocess
def test_fsdp_trains_like_ddp_and_resumes_either_way(tmp_path):
    result = tmp_path / "result.json"
    completed = torchrun(Path(__file__).with_name("fsdp_worker.py"), str(result), str(tmp_path), timeout=600)
    assert completed.returncode == 0, without_progress_bars(completed.stderr)[-4000:]
    runs = json.loads(result.read_text())
    assert runs["fsdp"]["in_sync"] and runs["ddp"]["in_sync"]
    for name in ("fsdp", "fsdp_resumed", "ddp_then_fsdp", "fsdp_then_ddp"):
        assert len(runs[name]["losses"]) == 4, name
        assert max(abs(a - b) for a, b in zip(runs[name]["losses"], runs["ddp"]["losses"])) < FSDP_TOLERANCE, name
    for name in ("fsdp", "fsdp_resumed", "ddp_then_fsdp", "fsdp_then_ddp"):
        weights = load_weights(tmp_path / name, prefer_ema=False)[1]
        reference = load_weights(tmp_path / "ddp", prefer_ema=False)[1]
        model = DiT(TINY_DIT)
        model.load_state_dict(weights, strict=True)  # an FSDP checkpoint is a plain model's
        assert max((weights[key] - reference[key]).abs().max().item() for key in weights) < FSDP_TOLERANCE, name
        folder = last_checkpoint(tmp_path / name)  # an FSDP run's last checkpoint is sharded, a DDP run's one-file
        assert is_sharded(folder) if name != "fsdp_then_ddp" else (folder / "ema.safetensors").exists()


@pytest.mark.multiprocess
@pytest.mark.parametrize("head", ["categorical", "flow"])
def test_a_var_of_either_head_trains_in_sync_and_alike_with_ddp_and_fsdp(tmp_path, head):
    """The flow head (its MLP and its noise drawn inside the VAR's forward) and VAR's own, under DDP and FSDP2 on two
    ranks: every rank holds the same weights, and FSDP's run is DDP's, as the DiT's above."""
    result = tmp_path / "result.json"
    completed = torchrun(Path(__file__).with_name("var_parallel_worker.py"), str(result), str(tmp_path), head,
                         timeout=300)
    assert completed.returncode == 0, without_progress_bars(completed.stderr)[-4000:]
    runs = json.loads(result.read_text())
    assert runs["ddp"]["in_sync"] and runs["fsdp"]["in_sync"]
    assert len(runs["ddp"]["losses"]) == len(runs["fsdp"]["losses"]) == 3
    assert max(abs(a - b) for a, b in zip(runs["fsdp"]["losses"], runs["ddp"]["losses"])) < FSDP_TOLERANCE
    weights, reference = (load_weights(tmp_path / name, prefer_ema=False)[1] for name in ("fsdp", "ddp"))
    assert weights.keys() == reference.keys() and (head == "flow") == any("flow_head" in key for key in weights)
    assert max((weights[key] - reference[key]).abs().max().item() for key in weights) < FSDP_TOLERANCE


@pytest.mark.end_to_end
def test_data_on_device_trains_exactly_as_the_loader(tmp_path):
    """Fashion-MNIST items are deterministic, so whole batches gathered on the device give the loader's losses."""
    losses = {}
    for on_device in (False, True):
        out = tmp_path / str(on_device)
        train(dit_task(), tiny_fashion(), TrainConfig(out=str(out), steps=4, batch_size=16, lr=2e-3, log_every=1,
                                                      device="cpu", data_on_device=on_device))
        losses[on_device] = [row["loss"] for row in read_log(out)]
    assert losses[True] == losses[False]
    with pytest.raises(UserError, match="data-on-device"):
        train(dit_task(), torch.utils.data.TensorDataset(torch.zeros(32)),
              TrainConfig(out=str(tmp_path / "bad"), steps=1, batch_size=16, device="cpu", data_on_device=True))
