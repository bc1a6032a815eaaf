"""One loading call (`scalegen.runs.loading.load_run`): a run's kind, config, model, tokenizer and sampling settings
at once, the kind read from its config or given for an official file; and the one rule of a DiT's sampling settings
(`DiT.chosen_sampling`: given, else recommended, else the objective's default) that `generate`, `sample dit` and the
diffusers model card share."""
from argparse import Namespace

import pytest
import torch

from scalegen.cli.sampling import dit_settings
from scalegen.errors import UserError
from scalegen.models.dit import DiT, DiTConfig
from scalegen.models.sampling_settings import (
    FROM_CONFIG, FROM_DEFAULT, FROM_FLAG, FROM_PAPER, OFFICIAL_DIT_SAMPLING, DiTSampling,
)
from scalegen.models.var import VAR
from scalegen.runs.diffusers_export import pipeline_arguments
from scalegen.runs.loading import load_dit, load_run, load_var
from scalegen.runs.weights import stored_config


@pytest.mark.parametrize("name, kind, model_class", [("shipped:dit", "dit", DiT), ("shipped:var", "var", VAR)])
def test_load_run_returns_the_kind_config_model_tokenizer_and_sampling_of_a_run(name, kind, model_class):
    run = load_run(name)
    assert run.kind == kind and isinstance(run.model, model_class) and not run.model.training
    assert run.config == stored_config(name)
    assert run.tokenizer is (run.model.decoder if kind == "dit" else run.model.tokenizer)
    assert run.tokenizer is not None
    assert run.sampling == run.config["sampling"] and run.sampling_origin == FROM_CONFIG
    assert run.sampling == run.model.sampling


def test_the_named_loaders_are_the_one_call_for_their_kind():
    dit, var = load_dit("shipped:dit"), load_var("shipped:var")
    for model, run in ((dit, load_run("shipped:dit", "dit")), (var, load_run("shipped:var", "var"))):
        weights, loaded = model.state_dict(), run.model.state_dict()
        assert weights.keys() == loaded.keys() and all(torch.equal(weights[key], loaded[key]) for key in weights)


def test_an_official_file_is_loaded_by_the_kind_given_and_refused_without_one(tmp_path):
    path = tmp_path / "DiT-tiny.pt"
    torch.save(DiT(DiTConfig(input_size=8, patch_size=4, hidden_size=384, depth=1, num_heads=6)).state_dict(), path)
    with pytest.raises(UserError, match="stores no config that names its kind") as refused:
        load_run(path)
    assert "\n" not in str(refused.value)
    run = load_run(path, "dit", vae="none")
    assert run.config is None and run.tokenizer is None
    assert run.sampling == OFFICIAL_DIT_SAMPLING and run.sampling_origin == FROM_PAPER


def test_a_run_of_another_kind_is_refused_in_one_line():
    with pytest.raises(UserError, match="holds a VAR model, not a DiT") as refused:
        load_run("shipped:var", "dit")
    assert "\n" not in str(refused.value)


def test_the_dit_sampling_rule_is_one_for_generate_the_command_line_and_the_model_card():
    model = load_dit("shipped:dit")
    objective = model.objective
    model.sampling, model.sampling_origin = {"steps": 7}, FROM_CONFIG
    chosen = model.chosen_sampling()
    assert {name: chosen[name] for name in ("cfg", "steps", "sampler")} == {
        "cfg": (objective.default_cfg, FROM_DEFAULT), "steps": (7, FROM_CONFIG),
        "sampler": (objective.default_sampler, FROM_DEFAULT)}
    assert model.chosen_sampling(DiTSampling(cfg=2.0))["cfg"] == (2.0, FROM_FLAG)
    flags = Namespace(cfg_scale=None, steps=None, sampler=None, cfg_interval=None, guide_all_channels=False,
                      precision="fp32")
    assert model.chosen_sampling(dit_settings(flags)) == chosen
    _, plan, settings = model.sampling_setup([0], model.sampling_settings())
    assert (plan.steps, plan.sampler, settings.cfg) == (7, objective.default_sampler, objective.default_cfg)
    assert pipeline_arguments(model).endswith("num_inference_steps=7")
