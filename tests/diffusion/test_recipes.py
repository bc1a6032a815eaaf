"""Modern recipes: flow matching (its loss, its samplers), min-SNR, DPM-Solver++ and REPA."""
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from scalegen import load_dit
from scalegen.data.batch import Batch
from scalegen.data.names import IMAGES
from scalegen.diffusion.dpm_solver import dpm_solver_sample_loop_progressive
from scalegen.diffusion.flow import LinearFlow
from scalegen.diffusion.objective import TIME_SCALE
from scalegen.diffusion.respace import create_diffusion
from scalegen.errors import UserError
from scalegen.eval.fmnist import ClassifierConfig, FashionClassifier, SHIPPED_WEIGHTS
from scalegen.files import write_json_atomic
from scalegen.models.dit import DiT, DiTConfig
from scalegen.train.dit_task import DiTTask, ObjectiveConfig
from scalegen.train.repa import PatchEncoder, alignment_loss, load_patch_encoder
from scalegen.train.run_log import read_log
from scalegen.train.trainer import TrainConfig, train
from tests_support import perturbed, tiny_fashion

DATA_MEAN, DATA_STD = 0.7, 0.3  # a Gaussian "data set" N(μ, s²) whose optimal fields are known in closed form


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[ε − x | x_t] for data N(μ, s²) on x_t = (1 − t)x + tε: the oracle velocity field (t given ×TIME_SCALE)."""
    t = (t / TIME_SCALE).view(-1, 1, 1, 1)
    variance = (1 - t) ** 2 * DATA_STD**2 + t**2
    start = DATA_MEAN + (1 - t) * DATA_STD**2 / variance * (x - (1 - t) * DATA_MEAN)  # E[x | x_t]
    noise = t / variance * (x - (1 - t) * DATA_MEAN)  # E[ε | x_t]
    return noise - start


def gaussian_epsilon(diffusion):
    """The optimal ε-prediction for data N(μ, s²) under a discrete diffusion (step indices t)."""
    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha_bar = torch.as_tensor(diffusion.alphas_cumprod, dtype=torch.float32)[t].view(-1, 1, 1, 1)
        variance = alpha_bar * DATA_STD**2 + 1 - alpha_bar
        return (1 - alpha_bar).sqrt() * (x - alpha_bar.sqrt() * DATA_MEAN) / variance
    return model


def test_flow_loss_at_the_endpoints_is_the_velocity_error():
    flow, x, noise = LinearFlow(), torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    assert torch.equal(flow.interpolate(x, noise, torch.zeros(4)), x)
    assert torch.equal(flow.interpolate(x, noise, torch.ones(4)), noise)
    seen = []

    def perfect(x_t, t):
        seen.append(t)
        return noise - x

    for endpoint in (0.0, 1.0):
        terms = flow.training_losses(perfect, x, t=torch.full((4,), endpoint), noise=noise)
        assert terms["loss"].abs().max() == 0
        off = flow.training_losses(lambda x_t, t: torch.zeros_like(x_t), x, t=torch.full((4,), endpoint), noise=noise)
        torch.testing.assert_close(off["loss"], ((noise - x) ** 2).mean(dim=(1, 2, 3)))
    assert seen[1].max() == TIME_SCALE  # the network sees t scaled to DDPM's step range


def test_logit_normal_times_concentrate_in_the_middle():
    torch.manual_seed(0)
    uniform = LinearFlow("uniform").sample_time(20000, torch.device("cpu"))
    logit = LinearFlow("logit-normal").sample_time(20000, torch.device("cpu"))
    assert 0 < logit.min() and logit.max() < 1
    middle = lambda t: ((t > 0.25) & (t < 0.75)).float().mean()
    assert middle(uniform) == pytest.approx(0.5, abs=0.02)
    assert middle(logit) > 0.65  # Φ(logit 0.75) − Φ(logit 0.25) ≈ 0.73 for N(0, 1)


@pytest.mark.parametrize("sampler, steps, tolerance", [("euler", 200, 0.02), ("heun", 20, 0.01),
                                                       ("euler-maruyama", 400, 0.05)])
def test_oracle_velocity_integrated_returns_the_data_distribution(sampler, steps, tolerance):
    torch.manual_seed(0)
    noise = torch.randn(4000, 1, 4, 4)
    *_, last = LinearFlow().sample_loop_progressive(gaussian_velocity, noise, steps, sampler)
    assert last["sample"].mean().item() == pytest.approx(DATA_MEAN, abs=tolerance)
    assert last["sample"].std().item() == pytest.approx(DATA_STD, abs=tolerance)


def test_heun_converges_faster_than_euler_on_the_same_noise():
    noise = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    run = lambda sampler, steps: list(LinearFlow().sample_loop_progressive(gaussian_velocity, noise, steps, sampler))[-1]["sample"]
    reference = run("heun", 400)
    assert (run("heun", 10) - reference).abs().max() < 0.2 * (run("euler", 10) - reference).abs().max()


def test_dpm_solver_first_order_is_ddim_and_second_order_converges_faster():
    base = create_diffusion("", learn_sigma=False)
    model = gaussian_epsilon(base)
    noise = torch.randn(32, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    # The probability-flow ODE of Gaussian data keeps z = (x_t − α_t μ) / √(α_t² s² + σ_t²): its exact end point.
    alpha_bar = float(base.alphas_cumprod[-1])
    exact = DATA_MEAN + DATA_STD * (noise - alpha_bar**0.5 * DATA_MEAN) / (alpha_bar * DATA_STD**2 + 1 - alpha_bar) ** 0.5

    def solve(steps: int, order: int) -> torch.Tensor:
        diffusion = create_diffusion(str(steps), learn_sigma=False)
        return list(dpm_solver_sample_loop_progressive(diffusion, model, noise, False, order=order))[-1]["sample"]

    ddim = create_diffusion("10", learn_sigma=False).ddim_sample_loop(model, noise.shape, noise=noise, clip_denoised=False)
    torch.testing.assert_close(solve(10, order=1), ddim, atol=1e-5, rtol=1e-5)
    error = lambda sample: (sample - exact).abs().max().item()
    assert error(solve(10, order=2)) < 0.7 * error(ddim)  # measured: 0.20 against 0.32
    # Both approach the ODE's end point (up to the last step to ᾱ = 1, which lands on x̂₀): 0.004 against 0.015.
    assert error(solve(250, order=2)) < 0.5 * error(solve(250, order=1)) and error(solve(250, order=2)) < 5e-3


def reference_sample(model: DiT, sampler: str, steps: int, labels: torch.Tensor, noise: torch.Tensor,
                     cfg: float) -> torch.Tensor:
    """What `model.generate` must give for a DDPM-trained pixel-space model: the sampler's own loop on its respaced
    diffusion, written out as the official sample.py does (doubled batch with the null class when guiding, x̂₀
    clipped to [-1, 1] since pixels live there), the final sample mapped from [-1, 1] to [0, 1]."""
    kwargs = {"y": labels}
    forward = model.forward
    if cfg > 1.0:
        noise = torch.cat([noise, noise])  # (2B, C, H, W)
        kwargs = {"y": torch.cat([labels, torch.full_like(labels, model.config.num_classes)])}  # (2B,)
        forward = lambda x, t, y: model.forward_with_cfg(x, t, y, cfg_scale=cfg)  # noqa: E731
    learn_sigma = model.config.learn_sigma
    with torch.no_grad():
        if sampler == "ddim":
            sample = create_diffusion(f"ddim{steps}", learn_sigma=learn_sigma).ddim_sample_loop(
                forward, noise.shape, noise=noise, clip_denoised=True, model_kwargs=kwargs)
        else:
            diffusion = create_diffusion(str(steps), learn_sigma=learn_sigma)
            *_, last = dpm_solver_sample_loop_progressive(diffusion, forward, noise, clip_denoised=True,
                                                          model_kwargs=kwargs)
            sample = last["sample"]
    return ((sample[: len(labels)] + 1) / 2).clamp(0, 1)  # (B, C, H, W)


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_each_ddpm_sampler_of_generate_is_its_own_loop(cfg):
    torch.manual_seed(0)
    model = perturbed(DiT(DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                                    num_classes=10)).eval())
    labels, steps = torch.tensor([1, 2, 7]), 5
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    drawn = {sampler: model.generate(labels, cfg=cfg, steps=steps, sampler=sampler, seed=0, noise=noise)
             for sampler in ("ddpm", "ddim", "dpm-solver++")}
    for sampler in ("ddim", "dpm-solver++"):
        torch.testing.assert_close(drawn[sampler], reference_sample(model, sampler, steps, labels, noise, cfg),
                                   atol=1e-6, rtol=0, msg=lambda message: f"{sampler}: {message}")
    # Three different samplers from the same noise: no name is routed to another's loop.
    for first, second in (("ddpm", "ddim"), ("ddpm", "dpm-solver++"), ("ddim", "dpm-solver++")):
        assert (drawn[first] - drawn[second]).abs().max() > 1e-3, f"{first} and {second} drew the same images"


def test_min_snr_weights_are_one_where_snr_is_below_gamma():
    config = DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    task = DiTTask(config, objective=ObjectiveConfig(loss_weighting="min-snr", snr_gamma=5.0))
    alpha_bar = torch.tensor(task.training_objective.diffusion.alphas_cumprod, dtype=torch.float32)  # the weights are float32 too
    weights = task.training_objective.min_snr_weights(torch.arange(1000))
    snr = alpha_bar / (1 - alpha_bar)
    assert weights[snr < 5].eq(1).all() and (weights[snr > 5] < 1).all() and (weights[snr > 5] > 0).all()
    assert weights[0].item() == pytest.approx(5 / snr[0].item(), rel=1e-5)


class Recorder(nn.Module):
    """A network that keeps what each call saw and answered: the noised input x_t, the step t and the output."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network, self.config = network, network.config
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        output = self.network(x, t, **kwargs)  # (B, C_out, H, W)
        self.calls.append((x.detach(), t.detach(), output.detach()))
        return output


def seeded_loss(task: DiTTask, network: nn.Module, batch: Batch) -> torch.Tensor:
    """The task's training loss of `batch` on `network`, with the time and noise draws of seed 0."""
    torch.manual_seed(0)
    return task.loss(network, batch)[0].detach()


def snr_tasks(learn_sigma: bool) -> tuple[nn.Module, dict[str, DiTTask], Batch]:
    """A DiT with random weights, a ddpm task per loss weighting (min-SNR γ 5, min-SNR with a γ above every step's
    SNR, none) and a batch."""
    config = DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10,
                       class_dropout_prob=0.0, learn_sigma=learn_sigma)
    torch.manual_seed(0)
    tasks = {"none": DiTTask(config, objective=ObjectiveConfig(name="ddpm", loss_weighting="none")),
             "min-snr": DiTTask(config, objective=ObjectiveConfig(name="ddpm", loss_weighting="min-snr",
                                                                  snr_gamma=5.0)),
             "huge gamma": DiTTask(config, objective=ObjectiveConfig(name="ddpm", loss_weighting="min-snr",
                                                                     snr_gamma=1e9))}
    network = perturbed(tasks["none"].model)
    batch = Batch(IMAGES, label=torch.arange(64) % 10, image=torch.rand(64, 1, 8, 8) * 2 - 1)
    return network, tasks, batch


def test_min_snr_weights_each_example_s_epsilon_loss_in_the_loss_itself():
    network, tasks, batch = snr_tasks(learn_sigma=False)  # no variance: the loss is the weighted ε MSE alone
    recorder = Recorder(network)
    loss = seeded_loss(tasks["min-snr"], recorder, batch)
    (x_t, t, epsilon), = recorder.calls
    t = t.round().long()  # the network sees the step index (as a float or an integer)
    # The draws, recovered from what the network saw: x_t = √ᾱ x₀ + √(1 − ᾱ) ε.
    alpha_bar = torch.tensor(create_diffusion("", learn_sigma=False).alphas_cumprod)[t].view(-1, 1, 1, 1)  # float64
    noise = (x_t.double() - alpha_bar.sqrt() * batch.image.double()) / (1 - alpha_bar).sqrt()  # (B, C, H, W)
    mse = ((noise - epsilon.double()) ** 2).mean(dim=(1, 2, 3))  # (B,)
    snr = (alpha_bar / (1 - alpha_bar)).flatten()  # (B,)
    weights = snr.clamp(max=5.0) / snr  # (B,) min(SNR, γ) / SNR
    assert (weights < 0.9).sum() >= 5 and (weights == 1).sum() >= 5  # the draws hold steps on both sides of γ
    torch.testing.assert_close(loss.double(), (weights * mse).mean(), rtol=1e-4, atol=0)
    unweighted = seeded_loss(tasks["none"], network, batch)
    torch.testing.assert_close(unweighted.double(), mse.mean(), rtol=1e-4, atol=0)
    assert unweighted - loss > 0.05 * unweighted  # the weights lower every low-noise step's share
    torch.testing.assert_close(seeded_loss(tasks["huge gamma"], network, batch), unweighted, rtol=1e-6, atol=0)


def test_min_snr_leaves_the_learned_variance_s_bound_unweighted():
    network, tasks, batch = snr_tasks(learn_sigma=True)
    recorder = Recorder(network)
    loss = seeded_loss(tasks["min-snr"], recorder, batch)
    unweighted = seeded_loss(tasks["none"], recorder, batch)
    (x_t, t, output), again = recorder.calls
    assert torch.equal(again[0], x_t) and torch.equal(again[1], t)  # the same seed made the same draws
    t = t.round().long()  # the network sees the step index (as a float or an integer)
    alpha_bar = torch.tensor(create_diffusion("", learn_sigma=True).alphas_cumprod)[t].view(-1, 1, 1, 1)  # float64
    noise = (x_t.double() - alpha_bar.sqrt() * batch.image.double()) / (1 - alpha_bar).sqrt()  # (B, C, H, W)
    mse = ((noise - output[:, :1].double()) ** 2).mean(dim=(1, 2, 3))  # (B,): ε is the first half of the channels
    snr = (alpha_bar / (1 - alpha_bar)).flatten()  # (B,)
    weights = snr.clamp(max=5.0) / snr  # (B,)
    # loss = mean(w·mse + vb), unweighted = mean(mse + vb): the bound vb cancels in the difference.
    torch.testing.assert_close((unweighted - loss).double(), ((1 - weights) * mse).mean(), rtol=1e-3, atol=1e-7)
    assert unweighted - loss > 0.05 * unweighted
    torch.testing.assert_close(seeded_loss(tasks["huge gamma"], network, batch), unweighted, rtol=1e-6, atol=0)


def test_objective_mistakes_are_one_line_errors():
    config = DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    with pytest.raises(UserError, match="no-learn-sigma"):
        DiTTask(config, objective=ObjectiveConfig(name="flow"))
    with pytest.raises(UserError, match="t-sampling"):
        ObjectiveConfig(name="ddpm", time_sampling="logit-normal")
    with pytest.raises(UserError, match="min-snr"):
        ObjectiveConfig(name="flow", loss_weighting="min-snr")
    with pytest.raises(UserError, match="shipped classifier"):
        load_patch_encoder(SHIPPED_WEIGHTS)


def tiny_flow_task(encoder: PatchEncoder | None = None) -> DiTTask:
    torch.manual_seed(0)
    config = DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                       learn_sigma=False)
    objective = ObjectiveConfig(name="flow", time_sampling="logit-normal", repa_depth=1 if encoder is not None else 0)
    return DiTTask(config, sample_steps=2, objective=objective, repa_encoder=encoder)


def test_a_short_flow_run_lowers_its_loss_and_samples_with_every_flow_sampler(tmp_path):
    train(tiny_flow_task(), tiny_fashion(), TrainConfig(out=str(tmp_path), steps=60, batch_size=16, lr=2e-3,
                                                       log_every=1, device="cpu"))
    losses = [row["loss"] for row in read_log(tmp_path)]
    assert sum(losses[-10:]) / 10 < 0.75 * sum(losses[:5]) / 5  # the velocity's own variance bounds it from below
    model = load_dit(tmp_path)
    assert model.objective.name == "flow"
    for sampler in ("euler", "heun", "euler-maruyama"):
        images = model.generate([1, 2], cfg=2.0, steps=3, sampler=sampler, seed=0)
        assert images.shape == (2, 1, 8, 8) and 0 <= images.min() and images.max() <= 1
    with pytest.raises(UserError, match="flow objective samples with"):
        model.generate([1], steps=3, sampler="ddim")


def tiny_encoder(tmp_path) -> PatchEncoder:
    torch.manual_seed(3)
    classifier = FashionClassifier(ClassifierConfig(width=8, feature_dim=16))
    path = tmp_path / "encoder.safetensors"
    save_file({**classifier.state_dict(), "reference.mu": torch.zeros(16), "reference.sigma": torch.eye(16)}, path)
    write_json_atomic(path.with_suffix(".json"), {"config": {"width": 8, "feature_dim": 16, "num_classes": 10}})
    return load_patch_encoder(path)


def test_repa_loss_is_zero_for_identical_features_and_trains_only_model_and_projector(tmp_path):
    features = torch.randn(3, 5, 7)
    torch.testing.assert_close(alignment_loss(features, 2.5 * features), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(alignment_loss(features, -features), 2 * torch.ones(3))
    encoder = tiny_encoder(tmp_path)
    task = tiny_flow_task(encoder)
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    loss, extra = task.loss(task.model, Batch(IMAGES, label=torch.tensor([0, 1, 2, 3]), image=images))
    loss.backward()
    assert 0 <= extra["repa"] <= 2
    assert all(parameter.grad is None for parameter in encoder.parameters())
    assert all(parameter.grad is not None for parameter in task.projector.parameters())
    grouped = {id(parameter) for group in task.parameter_groups(0.0) for parameter in group["params"]}
    trainable = [parameter for parameter in task.model.parameters() if parameter.requires_grad]
    assert grouped == {id(parameter) for parameter in [*trainable, *task.projector.parameters()]}


def block_gradients(task: DiTTask, images: torch.Tensor, labels: torch.Tensor) -> list[list[torch.Tensor]]:
    """The gradient of each block's parameters (zeros where none reached it) of one loss with the draws of seed 0."""
    task.model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss, _ = task.loss(task.model, Batch(IMAGES, label=labels, image=images))
    loss.backward()
    return [[torch.zeros_like(parameter) if parameter.grad is None else parameter.grad.clone()
             for parameter in block.parameters()] for block in task.model.blocks]


@pytest.mark.parametrize("repa_depth", [1, 2, 3])
def test_repa_aligns_exactly_the_block_repa_depth_names(tmp_path, repa_depth):
    depth = 4
    config = DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=depth, num_heads=2,
                       num_classes=10, learn_sigma=False)
    aligned = DiTTask(config, sample_steps=2, repa_encoder=tiny_encoder(tmp_path), objective=ObjectiveConfig(
        name="flow", time_sampling="logit-normal", repa_depth=repa_depth, repa_weight=0.5))
    perturbed(aligned.model)
    plain = DiTTask(config, sample_steps=2, objective=ObjectiveConfig(name="flow", time_sampling="logit-normal"))
    plain.model.load_state_dict(aligned.model.state_dict())
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3])
    # The same draws, the same weights: the difference of the two gradients is the alignment loss's alone.
    alignment = [[with_repa - without for with_repa, without in zip(*pair)]
                 for pair in zip(block_gradients(aligned, images, labels), block_gradients(plain, images, labels))]
    reached = [max(gradient.abs().max().item() for gradient in block) for block in alignment]
    # Blocks 1..K feed block K's tokens, so the alignment reaches each of them; the blocks after K are untouched.
    assert all(size > 1e-4 for size in reached[:repa_depth]), f"alignment gradient per block: {reached}"
    assert all(size == 0 for size in reached[repa_depth:]), f"alignment gradient per block: {reached}"


def test_a_repa_run_keeps_its_projector_in_the_run_and_resumes_it(tmp_path):
    settings = dict(out=str(tmp_path / "run"), batch_size=16, lr=2e-3, log_every=1, checkpoint_every=2, device="cpu")
    encoder = tiny_encoder(tmp_path)
    train(tiny_flow_task(encoder), tiny_fashion(), TrainConfig(steps=2, **settings))
    straight_task = tiny_flow_task(encoder)
    train(straight_task, tiny_fashion(), TrainConfig(steps=4, **settings))
    rows = read_log(tmp_path / "run")
    assert [row["step"] for row in rows] == [1, 2, 3, 4] and all(math.isfinite(row["repa"]) for row in rows)
    again = tiny_flow_task(encoder)
    train(again, tiny_fashion(), TrainConfig(steps=4, **{**settings, "out": str(tmp_path / "other")}))
    for mine, theirs in zip(straight_task.projector.parameters(), again.projector.parameters()):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=0)  # resumed = uninterrupted, projector included
    model = load_dit(tmp_path / "run")  # the projector is not part of the model
    assert not any(name.startswith("projector") for name in model.state_dict())
