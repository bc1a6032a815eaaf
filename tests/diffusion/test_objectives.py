"""The objective seam: the registry, the objective in the DiT's config, MeanFlow, and guidance intervals."""
import json
import shutil
from dataclasses import asdict, replace

import pytest
import torch

from scalegen.cli.main import build_parser
from scalegen.diffusion.flow import LinearFlow
from scalegen.diffusion.meanflow import INTERVAL_SCALE, MeanFlow
from scalegen.diffusion.objective import TIME_SCALE
from scalegen.diffusion.names import OBJECTIVE_NAMES, SAMPLERS
from scalegen.diffusion.objectives import OBJECTIVES, sampling_objective
from scalegen.errors import UserError
from scalegen.models.dit import DiT, DiTConfig
from scalegen.runs.folder import save_checkpoint
from scalegen.runs.loading import load_dit
from scalegen.runs.names import SHIPPED_DIT, SHIPPED_MEANFLOW_DIT
from scalegen.train.dit_task import DiTTask, ObjectiveConfig
from scalegen.train.init_from import initialize_from
from scalegen.train.trainer import TrainConfig, train
from scalegen.train.run_log import read_log
from tests_support import TESTS, tiny_fashion

TINY = DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                 learn_sigma=False)


def perturbed(model: DiT, std: float = 0.1) -> DiT:
    """A DiT whose zero-initialised layers say something (adaLN-Zero starts as the identity)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name != "pos_embed":
                parameter.normal_(0, std)
    return model.eval()


def subcommand(parser, *names):
    for name in names:
        parser = parser._subparsers._group_actions[0].choices[name]
    return {action.dest: action for action in parser._actions}


def test_the_command_line_lists_what_the_registry_holds():
    parser = build_parser()
    train_options, sample_options = subcommand(parser, "train", "dit"), subcommand(parser, "sample", "dit")
    assert tuple(train_options["objective"].choices) == OBJECTIVE_NAMES == ("ddpm", "flow", "meanflow")
    assert tuple(sample_options["sampler"].choices) == SAMPLERS
    for name, objective in OBJECTIVES.items():
        assert name in train_options["objective"].help and objective.summary in train_options["objective"].help
        assert all(sampler in sample_options["sampler"].help for sampler in objective.samplers)


def test_a_setting_of_another_objective_is_a_one_line_error():
    with pytest.raises(UserError, match="--mean-fraction 0.5 is a setting of --objective meanflow, not flow"):
        ObjectiveConfig(name="flow", mean_fraction=0.5)
    with pytest.raises(UserError, match="--train-cfg 2.0 is a setting of --objective meanflow"):
        ObjectiveConfig(name="ddpm", guidance=2.0)
    with pytest.raises(UserError, match="unknown objective 'sit'"):
        ObjectiveConfig(name="sit")
    with pytest.raises(UserError, match="predicts no variance"):
        DiT(replace(TINY, objective="meanflow", learn_sigma=True))
    with pytest.raises(UserError, match="samples with meanflow, euler, not ddim"):
        perturbed(DiT(replace(TINY, objective="meanflow"))).generate([1], sampler="ddim")
    with pytest.raises(UserError, match="at least 2 step"):
        perturbed(DiT(replace(TINY, learn_sigma=True))).generate([1], steps=1)


@pytest.mark.parametrize("objective", ["ddpm", "flow", "meanflow"])
def test_a_dit_rebuilt_from_its_saved_config_alone_samples_as_the_loader_s(tmp_path, objective):
    config = replace(TINY, objective=objective, learn_sigma=objective == "ddpm", cfg_interval=(0.0, 0.7))
    model = perturbed(DiT(config))
    save_checkpoint(tmp_path / "run", 1, {"kind": "dit", "model": asdict(config), "vae": "none"},
                    model.state_dict(), model.state_dict(), {"step": 1})
    loaded = load_dit(tmp_path / "run")
    rebuilt = DiT(DiTConfig(**asdict(loaded.config))).eval()  # the config alone, as a user rebuilds it
    rebuilt.load_state_dict(loaded.state_dict(), strict=True)
    assert loaded.objective.name == rebuilt.objective.name == objective
    assert rebuilt.config.cfg_interval == (0.0, 0.7)
    steps = 3
    torch.testing.assert_close(rebuilt.generate([1, 2], cfg=2.0, steps=steps, seed=0),
                               loaded.generate([1, 2], cfg=2.0, steps=steps, seed=0), rtol=0, atol=0)


def test_a_config_from_before_the_objective_was_in_the_model_s_config_still_loads_its_objective(tmp_path):
    shutil.copytree(SHIPPED_DIT, tmp_path / "dit")
    stored = json.loads((tmp_path / "dit" / "config.json").read_text())
    assert stored["model"].pop("objective") == "flow" and stored["model"].pop("cfg_interval") is None
    (tmp_path / "dit" / "config.json").write_text(json.dumps(stored))  # as written before: the training entry only
    old, shipped = load_dit(tmp_path / "dit"), load_dit(SHIPPED_DIT)
    assert old.objective.name == shipped.objective.name == "flow" and old.config == shipped.config
    rebuilt = DiT(DiTConfig(**stored["model"]))  # the old config alone cannot say it: the default is the paper's
    assert rebuilt.objective.name == "ddpm"


def test_network_calls_count_guidance_only_inside_its_interval():
    flow = sampling_objective("flow")
    assert flow.call_levels("euler", 4) == [1.0, 0.75, 0.5, 0.25]
    assert flow.network_calls("euler", 4, cfg=1.0, interval=None) == 4
    assert flow.network_calls("euler", 4, cfg=2.0, interval=None) == 8
    assert flow.network_calls("euler", 4, cfg=2.0, interval=(0.0, 0.6)) == 6  # 0.5 and 0.25 guided
    assert flow.network_calls("heun", 4, cfg=1.0, interval=None) == 8
    assert sampling_objective("meanflow").network_calls("meanflow", 1, cfg=1.0, interval=None) == 1
    ddpm = sampling_objective("ddpm")
    assert ddpm.call_levels("ddpm", 250)[0] == 0.999 and len(ddpm.call_levels("ddim", 50)) == 50


def test_a_guidance_interval_guides_only_the_steps_inside_it():
    model = perturbed(DiT(replace(TINY, objective="flow")))
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    draw = lambda **options: model.generate([1, 2], steps=4, noise=noise, **options)  # noqa: E731
    unguided, guided = draw(cfg=1.0), draw(cfg=3.0)
    assert torch.equal(draw(cfg=3.0, cfg_interval=(0.0, 1.0)), guided)  # an interval holding every step
    assert torch.equal(draw(cfg=3.0, cfg_interval=(0.0, 0.1)), unguided)  # no step at t ≤ 0.1 (1, .75, .5, .25)
    partly = draw(cfg=3.0, cfg_interval=(0.6, 1.0))
    assert (partly - guided).abs().max() > 1e-3 and (partly - unguided).abs().max() > 1e-3
    model.config.cfg_interval = (0.6, 1.0)  # the model's stored default
    assert torch.equal(draw(cfg=3.0), partly)
    with pytest.raises(UserError, match="guidance interval"):
        draw(cfg=3.0, cfg_interval=(0.7, 0.2))


def test_the_ddpm_sampler_with_an_interval_holding_every_step_is_the_official_one():
    model = perturbed(DiT(replace(TINY, learn_sigma=True)))
    official = model.generate([1, 2], cfg=4.0, steps=5, seed=3)
    assert torch.equal(model.generate([1, 2], cfg=4.0, steps=5, seed=3, cfg_interval=(0.0, 1.0)), official)


def tiny_meanflow(fraction: float = 0.5, guidance: float = 1.0) -> tuple[DiT, MeanFlow]:
    model = perturbed(DiT(replace(TINY, objective="meanflow")), std=0.03)
    return model, MeanFlow(mean_fraction=fraction, guidance=guidance, num_classes=TINY.num_classes, class_dropout=0.0)


def test_meanflow_targets_follow_the_identity_with_a_derivative_along_the_flow():
    """The r < t examples' target is v − (t − r)·(v·∂_z u + ∂_t u): checked against central differences."""
    model, objective = tiny_meanflow(fraction=0.5)
    x = torch.randn(6, 1, 8, 8)
    labels = torch.tensor([1, 2, 3, 4, 5, 6])
    torch.manual_seed(0)
    terms = objective.training_losses(model, x, {"y": labels})
    torch.manual_seed(0)
    noise = torch.randn_like(x)
    t, r, _ = objective.sample_times(6, x.device)
    averaged = (r < t).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    assert averaged.any() and not averaged.all()  # the draw holds both kinds of example
    velocity = noise - x
    z = LinearFlow.interpolate(x, noise, t)
    u = lambda zz, tt: model(zz, tt * TIME_SCALE, labels, (tt - r) * INTERVAL_SCALE)  # noqa: E731
    step = 1e-4  # t·1000 moves by 0.1: the timestep sinusoids stay nearly linear
    with torch.no_grad():
        derivative = (u(z + step * velocity, t + step) - u(z - step * velocity, t - step)) / (2 * step)
        target = torch.where(averaged, velocity - (t - r).view(-1, 1, 1, 1) * derivative, velocity)
        output = u(z, t)
    squared = ((output - target) ** 2).flatten(1)
    torch.testing.assert_close(terms["mse"], squared.mean(dim=1), rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(terms["loss"], squared.sum(1) / (squared.sum(1) + 1e-3), rtol=1e-2, atol=1e-4)


def test_meanflow_with_every_r_equal_to_t_is_flow_matching():
    model, objective = tiny_meanflow(fraction=0.0)
    flow = LinearFlow("logit-normal", -0.4, 1.0)
    x, labels = torch.randn(6, 1, 8, 8), torch.arange(6)
    torch.manual_seed(0)
    mean = objective.training_losses(model, x, {"y": labels})["mse"]
    torch.manual_seed(0)
    noise = torch.randn_like(x)
    t = torch.stack([flow.sample_time(6, x.device) for _ in range(2)]).max(dim=0).values
    z = flow.interpolate(x, noise, t)
    expected = ((model(z, t * TIME_SCALE, labels, torch.zeros(6)) - (noise - x)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(mean, expected.detach())


def test_guidance_folded_into_training_targets_the_guided_velocity():
    model, objective = tiny_meanflow(fraction=0.0, guidance=3.0)
    objective = replace(objective, guidance_interval=(0.0, 1.0))
    x, labels = torch.randn(4, 1, 8, 8), torch.arange(4)
    torch.manual_seed(0)
    mse = objective.training_losses(model, x, {"y": labels})["mse"]
    torch.manual_seed(0)
    noise = torch.randn_like(x)
    t, _, _ = objective.sample_times(4, x.device)
    z = LinearFlow.interpolate(x, noise, t)
    null = torch.full_like(labels, TINY.num_classes)
    with torch.no_grad():
        unconditional = model(z, t * TIME_SCALE, null, torch.zeros(4))
        target = 3.0 * (noise - x) + (1 - 3.0) * unconditional
        expected = ((model(z, t * TIME_SCALE, labels, torch.zeros(4)) - target) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(mse, expected)


def counted_calls(model: DiT) -> list[int]:
    """A counter (one item) of the examples the network evaluates (its final layer's batch sizes, summed: a guided
    call counts its doubled batch)."""
    counter = [0]
    def count(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        counter[0] += len(output)

    model.final_layer.register_forward_hook(count)
    return counter


def test_one_and_two_step_sampling_jump_with_the_average_velocity():
    """One step is one network call, x₀ = x₁ − (t − r)·u(x₁, r, t) with (r, t) = (0, 1); two steps are two."""
    model, _ = tiny_meanflow()
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 4])
    with torch.no_grad():
        ones, whole = torch.ones(2) * TIME_SCALE, torch.ones(2) * INTERVAL_SCALE
        one_step = noise - model(noise, ones, labels, whole)
        middle = noise - 0.5 * model(noise, ones, labels, whole / 2)
        two_steps = middle - 0.5 * model(middle, ones / 2, labels, whole / 2)
    unit = lambda latents: ((latents + 1) / 2).clamp(0, 1)  # noqa: E731  (pixel space: decode is the identity)
    calls = counted_calls(model)
    one_step_images = model.generate(labels, noise=noise)  # 1 step, cfg 1: the defaults
    assert calls == [2]  # one network call per image
    torch.testing.assert_close(one_step_images, unit(one_step))
    two_step_images = model.generate(labels, steps=2, noise=noise)
    assert calls == [2 + 4]
    torch.testing.assert_close(two_step_images, unit(two_steps))


def test_a_meanflow_dit_fine_tuned_from_a_flow_dit_starts_as_its_source(tmp_path):
    flow = perturbed(DiT(replace(TINY, objective="flow")))
    save_checkpoint(tmp_path / "flow", 1, {"kind": "dit", "model": asdict(flow.config), "vae": "none"},
                    flow.state_dict(), flow.state_dict(), {"step": 1})
    torch.manual_seed(5)
    meanflow = DiT(replace(TINY, objective="meanflow"))
    origin = initialize_from(meanflow, tmp_path / "flow")
    meanflow.eval()
    assert origin["reinitialized"] == []
    noise = torch.randn(2, 1, 8, 8)
    for steps in (1, 4):  # zero-initialised interval embedding: every average velocity is the source's velocity
        torch.testing.assert_close(meanflow.generate([1, 2], steps=steps, sampler="meanflow", noise=noise),
                                   flow.generate([1, 2], cfg=1.0, steps=steps, noise=noise))


@pytest.mark.end_to_end
def test_a_short_meanflow_run_with_repa_lowers_its_error_and_samples_in_one_step(tmp_path):
    from test_recipes import tiny_encoder  # the REPA encoder the flow recipe tests train

    torch.manual_seed(0)
    config = replace(TINY, objective="meanflow")
    objective = ObjectiveConfig(name="meanflow", time_sampling="logit-normal", mean_fraction=0.25, guidance=1.5,
                                repa_depth=1)
    task = DiTTask(config, sample_steps=1, objective=objective, repa_encoder=tiny_encoder(tmp_path))
    train(task, tiny_fashion(), TrainConfig(out=str(tmp_path / "run"), steps=40, batch_size=16, lr=2e-3,
                                            log_every=1, device="cpu", precision="fp32"))
    log = read_log(tmp_path / "run")
    mse, alignment = [row["mse"] for row in log], [row["repa"] for row in log]
    assert sum(mse[-8:]) < 0.85 * sum(mse[:8]) and sum(alignment[-8:]) < sum(alignment[:8])
    model = load_dit(tmp_path / "run")
    assert model.objective.name == "meanflow"
    noise, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    with torch.no_grad():  # x₀ = x₁ − (t − r)·u(x₁, r = 0, t = 1), by hand
        jump = noise - model(noise, torch.full((3,), TIME_SCALE), labels, torch.full((3,), INTERVAL_SCALE))
    calls = counted_calls(model)
    images = model.generate(labels, noise=noise)  # the stored defaults: one step, cfg 1
    assert calls == [3]  # one network call per image
    torch.testing.assert_close(images, ((jump + 1) / 2).clamp(0, 1))


def test_sampling_cost_is_the_forward_pass_times_the_network_calls():
    from scalegen.eval.flops import dit_config_macs, dit_sampling_macs

    flow, meanflow = replace(TINY, objective="flow"), replace(TINY, objective="meanflow")
    assert dit_sampling_macs(flow, "euler", 4, 2.0, (0.0, 0.6)) == 6 * dit_config_macs(flow)
    assert dit_sampling_macs(replace(flow, cfg_interval=(0.0, 0.6)), "euler", 4, 2.0) == 6 * dit_config_macs(flow)
    assert dit_sampling_macs(meanflow) == dit_config_macs(meanflow)  # one call, guidance trained in
    embedding = 256 * TINY.hidden_size + TINY.hidden_size ** 2  # the interval's sinusoid → MLP
    assert dit_config_macs(meanflow) - dit_config_macs(flow) == embedding


@pytest.mark.parametrize("folder", [SHIPPED_DIT, SHIPPED_MEANFLOW_DIT], ids=["dit", "meanflow dit"])
def test_a_shipped_dit_rebuilt_from_its_config_alone_samples_as_the_loader_s(folder):
    loaded = load_dit(folder)
    config = json.loads((folder / "config.json").read_text())
    rebuilt = DiT(DiTConfig(**config["model"])).eval()
    rebuilt.load_state_dict(loaded.state_dict(), strict=True)
    rebuilt.attach_decoder(loaded.decoder)
    rebuilt.sampling = config["sampling"]  # its recommended sampling settings, as the loader gives them
    assert rebuilt.objective.name == loaded.objective.name
    torch.testing.assert_close(rebuilt.generate([0, 5], steps=2, seed=0), loaded.generate([0, 5], steps=2, seed=0),
                               rtol=0, atol=0)


def test_the_page_starts_a_dit_at_its_objective_s_settings():
    from scalegen.web.app import Models

    models = Models(dit=DiT(replace(TINY, objective="meanflow")))
    assert models.dit_settings() == (["meanflow", "euler"], "meanflow", 1, 1.0)  # one step, guidance trained in
    models.dit = DiT(replace(TINY, objective="flow"))
    assert models.dit_settings() == (["euler", "heun", "euler-maruyama"], "euler", 50, 4.0)
    models.dit.sampling = {"cfg": 2.5, "steps": 20, "sampler": "heun"}  # a loaded DiT's recommended settings
    assert models.dit_settings() == (["euler", "heun", "euler-maruyama"], "heun", 20, 2.5)


def test_the_readme_names_every_registered_objective_and_sampler():
    readme = (TESTS.parent / "README.md").read_text()
    for name, objective in OBJECTIVES.items():
        assert f"--objective {name}" in readme or f"`{name}`" in readme, name
        assert all(sampler in readme for sampler in objective.samplers), name
        assert f"diffusion/{objective.__module__.rsplit('.', 1)[-1]}.py" in readme, name
