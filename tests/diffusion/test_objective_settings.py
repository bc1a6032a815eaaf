"""An objective owns its settings: each objective's settings dataclass (scalegen/diffusion/settings.py), registered
with it, makes `train dit`'s flags and a run's config keys; a toy objective registered from this file alone gets its
flag and key, trains a tiny DiT from the command line and samples through the public API."""
import json
from dataclasses import dataclass, fields

import pytest
import torch
import yaml

import scalegen
from scalegen.cli.main import build_parser, main
from scalegen.diffusion.flow import LinearFlow
from scalegen.diffusion.meanflow import MeanFlow
from scalegen.diffusion.names import OBJECTIVE_ENTRIES, ObjectiveEntry, objective_settings
from scalegen.diffusion.objectives import OBJECTIVES
from scalegen.diffusion.settings import setting
from scalegen.errors import UserError
from scalegen.models.dit import DiTConfig
from scalegen.runs.names import SHIPPED_DIT, SHIPPED_MEANFLOW_DIT
from scalegen.runs.weights import stored_config
from scalegen.train.dit_task import DiTTask
from scalegen.train.task_options import ObjectiveConfig
from tests_support import write_fashion_subset

TOY = "toy"
TINY_DIT = ["--model", "DiT-S/4", "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--image-size", "8",
            "--batch-size", "8", "--sample-steps", "2", "--log-every", "1", "--device", "cpu"]


@dataclass(frozen=True)
class ToySettings:
    velocity_weight: float = setting(1.0, "the factor of the velocity loss", minimum=0.0)


@dataclass(frozen=True)
class ToyFlow(LinearFlow):
    """Flow matching whose loss is scaled by its one setting of its own, and whose models sample with half the
    guidance a run asks for (a sampling-time rule of its own, as MeanFlow's trained-in guidance)."""

    velocity_weight: float = 1.0

    name = TOY
    summary, samplers = "a toy: flow matching with a weighted loss", {"euler": "Euler ODE steps"}

    def training_losses(self, model, x_start, model_kwargs=None, t=None, noise=None):
        terms = super().training_losses(model, x_start, model_kwargs, t, noise)
        return {**terms, "loss": self.velocity_weight * terms["loss"]}

    def sampling_cfg(self, cfg: float) -> float:
        return cfg / 2


@pytest.fixture
def toy(monkeypatch):
    """The toy objective in the registry (its torch-free entry and its class) for one test."""
    monkeypatch.setitem(OBJECTIVE_ENTRIES, TOY, ObjectiveEntry(ToyFlow.summary, ToyFlow.samplers, ToySettings))
    monkeypatch.setitem(OBJECTIVES, TOY, ToyFlow)


def train_dit_options():
    parser = build_parser()
    for name in ("train", "dit"):
        parser = parser._subparsers._group_actions[0].choices[name]
    return {action.option_strings[0]: action for action in parser._actions if action.option_strings}


def test_every_objective_s_settings_are_fields_of_its_class_and_make_one_flag_each():
    for name, entry in OBJECTIVE_ENTRIES.items():
        assert {field.name for field in fields(entry.settings)} <= {field.name for field in fields(OBJECTIVES[name])}
    options = train_dit_options()
    for setting in objective_settings().values():
        action = options[setting.flag]
        assert (action.default, action.help) == (setting.default, setting.help)
    assert options["--t-sampling"].help == "flow, meanflow: how training draws t in [0, 1]"
    assert options["--train-cfg"].help.startswith("meanflow: ") and options["--snr-gamma"].help.startswith("ddpm: ")


@pytest.mark.parametrize("folder", [SHIPPED_DIT, SHIPPED_MEANFLOW_DIT], ids=["dit", "meanflow dit"])
def test_a_shipped_run_s_objective_entry_is_what_its_settings_store_again(folder):
    stored = json.loads((folder / "config.json").read_text())["objective"]
    assert list(ObjectiveConfig(**stored).stored().items()) == list(stored.items())  # the keys, their order, values


def test_the_sampling_rule_of_trained_in_guidance_is_the_objective_s():
    assert MeanFlow(guidance=2.0).sampling_cfg(4.0) == 1.0 and MeanFlow().sampling_cfg(4.0) == 4.0
    assert LinearFlow().sampling_cfg(4.0) == 4.0
    config = DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                       num_classes=10, learn_sigma=False)
    task = DiTTask(config, sample_cfg_scale=4.0, objective=ObjectiveConfig(name="meanflow", guidance=2.0))
    assert task.sampling()["cfg"] == 1.0 and task.config()["sampling"]["cfg"] == 1.0


def test_a_setting_of_no_objective_is_a_one_line_error():
    with pytest.raises(UserError, match="'velocity_weight' is no setting of any objective"):
        ObjectiveConfig(name="flow", velocity_weight=2.0)


def test_a_toy_objective_registered_here_gets_its_flag_and_key_trains_and_samples(toy, tmp_path, capsys):
    action = train_dit_options()["--velocity-weight"]
    assert (action.default, action.help) == (1.0, "toy: the factor of the velocity loss")
    assert TOY in train_dit_options()["--objective"].choices
    with pytest.raises(SystemExit):
        main(["train", "dit", "--objective", TOY, "--velocity-weight", "2", "--print-config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["objective"], printed["velocity_weight"]) == (TOY, 2.0)
    with pytest.raises(UserError, match="--velocity-weight 2.0 is a setting of --objective toy, not flow"):
        ObjectiveConfig(name="flow", velocity_weight=2.0)

    objective = ObjectiveConfig(name=TOY, velocity_weight=2.0).objective(False, 10, 0.1)
    assert isinstance(objective, ToyFlow) and objective.velocity_weight == 2.0
    x, t, noise = torch.randn(3, 1, 4, 4), torch.rand(3), torch.randn(3, 1, 4, 4)
    network = lambda x, t, **kwargs: 0.5 * x  # noqa: E731
    toy_loss = objective.training_losses(network, x, t=t, noise=noise)["loss"]
    assert torch.equal(toy_loss, 2.0 * LinearFlow().training_losses(network, x, t=t, noise=noise)["loss"])

    data = write_fashion_subset(tmp_path)
    main(["train", "dit", "--objective", TOY, "--velocity-weight", "2", "--data", str(data), *TINY_DIT,
          "--sample-cfg", "3", "--steps", "2", "--out", str(tmp_path / "run")])
    stored = stored_config(tmp_path / "run")
    assert (stored["objective"]["name"], stored["objective"]["velocity_weight"]) == (TOY, 2.0)
    assert stored["sampling"]["cfg"] == 1.5  # the toy's own sampling rule, recommended with the model
    model = scalegen.load_dit(tmp_path / "run")
    assert isinstance(model.objective, ToyFlow)
    images = model.generate([0, 1], steps=2, seed=0)
    assert images.shape == (2, 1, 8, 8) and bool(torch.isfinite(images).all())
