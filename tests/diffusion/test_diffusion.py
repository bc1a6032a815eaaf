"""Gaussian diffusion and respacing: golden numbers from the official DiT code, plus invariants.

The golden numbers were produced by running the OFFICIAL facebookresearch/DiT ``diffusion`` package on the same tiny
model and inputs as below (the script lives outside the repository, at /tmp/diffgold/golden_diffusion.py):

    cd /tmp/diffgold && PYTHONPATH=/tmp/official/DiT /tmp/offvenv/bin/python golden_diffusion.py

Each tensor is summarised as [first 4 values of the flattened tensor, mean, std, mean of absolute values].
"""

import numpy as np
import pytest
import torch
from torch import nn

from scalegen.diffusion.math import LossType, MeanType, VarianceType
from scalegen.diffusion.math import discretized_gaussian_log_likelihood, mean_flat
from scalegen.errors import UserError
from scalegen.diffusion.respace import SpacedDiffusion, create_diffusion, space_timesteps

TOLERANCE = dict(rel=1e-5, abs=1e-5)
SHAPE = (2, 4, 4, 4)

GOLDEN_SCHEDULES = {
    "linear": {
        "betas": [9.999999999998899e-05, 0.00011991991991988638, 0.010059959959960008, 0.020000000000000018],
        "alphas_cumprod": [0.9999, 0.07858724288177824, 4.035829765375676e-05],
    },
    "squaredcos_cap_v2": {
        "betas": [4.128422482196914e-05, 4.614175273665033e-05, 0.003155691441585007, 0.999],
        "alphas_cumprod": [0.999958715775178, 0.4938435904406382, 2.4287669070348567e-09],
    },
}
# name -> (create_diffusion kwargs, whether the model outputs the learned variance, golden losses at t = [0, 17 or 517])
GOLDEN_LOSSES = {
    "default": (
        dict(timestep_respacing=""), True,
        {"vb": [2.34497166, 0.00024814], "mse": [1.07603836, 0.03058371], "loss": [3.42101002, 0.03083185]},
    ),
    "rescaled_mse_250": (
        dict(timestep_respacing="250", rescale_learned_sigmas=True), True,
        {"vb": [0.57547832, 0.02349253], "mse": [1.07603836, 1.11576462], "loss": [1.65151668, 1.13925719]},
    ),
    "kl": (dict(timestep_respacing="", use_kl=True), True, {"loss": [2344.97167969, 0.2481426]}),
    "fixed_large_xstart": (
        dict(timestep_respacing="", learn_sigma=False, predict_xstart=True), False,
        {"mse": [0.00023422, 1.23939931], "loss": [0.00023422, 1.23939931]},
    ),
    "respaced_250": (
        dict(timestep_respacing="250"), True,
        {"vb": [2.30191326, 0.09397012], "mse": [1.07603836, 1.11576462], "loss": [3.37795162, 1.20973468]},
    ),
}  # fmt: skip
# p_mean_variance at t = [3, 999]; the first 4 values belong to the t=3 example.
LEARNED_MEAN_NOCLIP = [-0.49174303, -0.00684112, -0.60988259, 0.43067724, -0.02553323, 0.8161737, 0.66183734]
PRED_XSTART_NOCLIP = [-0.48420793, -0.00699967, -0.60037756, 0.42371491, -0.5128564, 2.60882216, 1.77634562]
LEARNED_VARIANCE = [0.00013401, 0.0001346, 0.00013035, 0.00013305, 0.01006725, 0.00997177, 0.01006725]
LEARNED_LOG_VARIANCE = [-8.91757393, -8.91322136, -8.94529152, -8.92481804, -6.41307833, 2.51092963, 6.41307833]
GOLDEN_P_MEAN_VARIANCE = {
    # name -> (create_diffusion kwargs, learned variance, clip_denoised, golden summaries)
    "learned_clip": (dict(timestep_respacing=""), True, True, {
        "mean": [-0.49174303, -0.00684112, -0.60988259, 0.43067724, -0.02543208, 0.81609088, 0.66175254],
        "variance": LEARNED_VARIANCE,
        "log_variance": LEARNED_LOG_VARIANCE,
        "pred_xstart": [-0.48420793, -0.00699967, -0.60037756, 0.42371491, -0.13994945, 0.81163561, 0.75596842],
    }),
    "learned_noclip": (dict(timestep_respacing=""), True, False, {
        "mean": LEARNED_MEAN_NOCLIP,
        "variance": LEARNED_VARIANCE,
        "log_variance": LEARNED_LOG_VARIANCE,
        "pred_xstart": PRED_XSTART_NOCLIP,
    }),
    "fixed_small": (dict(timestep_respacing="", learn_sigma=False, sigma_small=True), False, False, {
        "mean": LEARNED_MEAN_NOCLIP,
        "variance": [0.00011064, 0.00011064, 0.00011064, 0.00011064, 0.01005531, 0.00998375, 0.01005531],
        "log_variance": [-9.1092329, -9.1092329, -9.1092329, -9.1092329, -6.51062834, 2.60881523, 6.51062834],
        "pred_xstart": PRED_XSTART_NOCLIP,
    }),
}  # fmt: skip
GOLDEN_P_SAMPLE_LOOP_10 = [-0.1386459, -0.41252992, 0.35606292, -0.41686919, -0.03207913, 0.4380438, 0.34267805]
GOLDEN_DDIM10_NOCLIP = [-0.12407269, -0.87691641, -0.33903667, -0.35728821, -0.0299169, 0.42523686, 0.33566693]
GOLDEN_DDIM10_CLIP = [-0.12408635, -0.88833499, -0.34758574, -0.35728261, -0.02902275, 0.42509191, 0.33576101]
GOLDEN_DDIM10_ETA1 = [-0.08078739, -0.37433264, 0.36463311, -0.26692551, -0.02992583, 0.38441876, 0.30186546]
# torch.randn(()) right after the eta=1 DDIM loop: checks the loops draw from the global RNG exactly as official.
GOLDEN_NEXT_RANDOM = -1.64595771


class TinyModel(nn.Module):
    """A deterministic stand-in for DiT: (x, t, y) -> (B, 2C, H, W), ε channels then variance channels in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        with torch.no_grad():  # fixed weights, independent of the RNG
            count = self.conv.weight.numel()
            self.conv.weight.copy_(0.05 * torch.sin(torch.arange(count, dtype=torch.float32)).view_as(self.conv.weight))
            self.conv.bias.copy_(0.1 * torch.cos(torch.arange(8, dtype=torch.float32)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        scale = torch.cos(t.float() * 0.003).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        features = torch.tanh(self.conv(x) * scale + 0.01 * y.float().view(-1, 1, 1, 1))  # (B, 8, H, W)
        # Mean channels near x itself (a fair ε guess at large t) so untrained sampling stays bounded.
        return torch.cat([x + 0.1 * features[:, :4], features[:, 4:]], dim=1)  # (B, 8, H, W)


def summary(tensor: torch.Tensor) -> list[float]:
    flat = tensor.detach().double().flatten()
    return flat[:4].tolist() + [flat.mean().item(), flat.std().item(), flat.abs().mean().item()]


@pytest.fixture
def model() -> TinyModel:
    return TinyModel()


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(123)
    x_start = (torch.rand(SHAPE, generator=generator) * 2.4 - 1.2).clamp(-1, 1)  # (B, C, H, W), some at ±1
    noise = torch.randn(SHAPE, generator=generator)  # (B, C, H, W)
    return x_start, noise, torch.tensor([3, 7])


def mean_channels(model: TinyModel):
    return lambda x, t, y: model(x, t, y)[:, :4]


@pytest.mark.parametrize("schedule", list(GOLDEN_SCHEDULES))
def test_schedules_match_official(schedule):
    diffusion = create_diffusion("", noise_schedule=schedule)
    golden = GOLDEN_SCHEDULES[schedule]
    assert diffusion.betas.dtype == np.float64
    assert diffusion.betas[[0, 1, 500, 999]].tolist() == pytest.approx(golden["betas"], rel=1e-12)
    assert diffusion.alphas_cumprod[[0, 499, 999]].tolist() == pytest.approx(golden["alphas_cumprod"], rel=1e-12)


@pytest.mark.parametrize("name", list(GOLDEN_LOSSES))
def test_training_losses_match_official(name, model, data):
    kwargs, learned, golden = GOLDEN_LOSSES[name]
    x_start, noise, labels = data
    diffusion = create_diffusion(**kwargs)
    t = torch.tensor([0, 500]) % diffusion.num_timesteps + torch.tensor([0, 17])  # (B,) t=0 and one later step
    net = model if learned else mean_channels(model)
    losses = diffusion.training_losses(net, x_start, t, model_kwargs=dict(y=labels), noise=noise)
    assert set(losses) == set(golden)
    for key, values in golden.items():
        assert losses[key].tolist() == pytest.approx(values, **TOLERANCE), key


@pytest.mark.parametrize("name", list(GOLDEN_P_MEAN_VARIANCE))
def test_p_mean_variance_matches_official(name, model, data):
    kwargs, learned, clip, golden = GOLDEN_P_MEAN_VARIANCE[name]
    x_start, noise, labels = data
    t = torch.tensor([3, 999])
    x_t = create_diffusion("").q_sample(x_start, t, noise=noise)  # (B, C, H, W)
    net = model if learned else mean_channels(model)
    out = create_diffusion(**kwargs).p_mean_variance(net, x_t, t, clip_denoised=clip, model_kwargs=dict(y=labels))
    for key, values in golden.items():
        assert out[key].shape == SHAPE
        assert summary(out[key]) == pytest.approx(values, **TOLERANCE), key


def test_p_sample_loop_matches_official_from_global_seed(model, data):
    labels = data[2]
    torch.manual_seed(0)
    sample = create_diffusion("10").p_sample_loop(model, SHAPE, clip_denoised=True, model_kwargs=dict(y=labels))
    assert summary(sample) == pytest.approx(GOLDEN_P_SAMPLE_LOOP_10, **TOLERANCE)


@pytest.mark.parametrize("clip, golden", [(False, GOLDEN_DDIM10_NOCLIP), (True, GOLDEN_DDIM10_CLIP)])
def test_ddim_sample_loop_matches_official(clip, golden, model, data):
    _, noise, labels = data
    diffusion = create_diffusion("ddim10")
    sample = diffusion.ddim_sample_loop(model, SHAPE, noise=noise, clip_denoised=clip, model_kwargs=dict(y=labels))
    assert summary(sample) == pytest.approx(golden, **TOLERANCE)


def test_stochastic_ddim_matches_official_rng_stream(model, data):
    labels = data[2]
    torch.manual_seed(0)
    sample = create_diffusion("ddim10").ddim_sample_loop(model, SHAPE, model_kwargs=dict(y=labels), eta=1.0)
    assert summary(sample) == pytest.approx(GOLDEN_DDIM10_ETA1, **TOLERANCE)
    assert torch.randn(()).item() == pytest.approx(GOLDEN_NEXT_RANDOM, **TOLERANCE)


def test_ddim_eta0_is_deterministic_given_noise(model, data):
    _, noise, labels = data
    diffusion = create_diffusion("ddim10")
    samples = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        samples.append(diffusion.ddim_sample_loop(model, SHAPE, noise=noise, model_kwargs=dict(y=labels), eta=0.0))
    assert torch.equal(samples[0], samples[1])


@pytest.mark.parametrize("respacing", ["250", "ddim50", "10,15,20", "7"])
def test_respacing_keeps_alphas_cumprod_at_kept_steps(respacing):
    full = create_diffusion("")
    spaced = create_diffusion(respacing)
    assert spaced.timestep_map == sorted(space_timesteps(1000, respacing))
    np.testing.assert_allclose(spaced.alphas_cumprod, full.alphas_cumprod[spaced.timestep_map], rtol=1e-12)


def test_space_timesteps_semantics():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert {0, 999} <= space_timesteps(1000, "250") and len(space_timesteps(1000, "250")) == 250
    sections = sorted(space_timesteps(300, "10,15,20"))
    assert len(sections) == 45 and sections[:2] == [0, 11] and sections[9:11] == [99, 100] and sections[-1] == 299
    assert space_timesteps(1000, [1000]) == set(range(1000))


@pytest.mark.parametrize("respacing", ["fast", "ddimx", "ddim400", "10,abc", "2000", "0"])
def test_bad_respacing_raises_user_error(respacing):
    with pytest.raises(UserError):
        create_diffusion(respacing)


def test_spaced_model_sees_original_timesteps(data):
    x_start, noise, _ = data
    seen = []

    def recording_model(x, t):
        seen.append(t.tolist())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])  # (B, 2C, H, W)

    diffusion = create_diffusion("ddim10")
    diffusion.training_losses(recording_model, x_start, torch.tensor([0, 9]), noise=noise)
    diffusion.ddim_sample_loop(recording_model, SHAPE, noise=noise)
    assert seen[0] == [0, 900]
    assert [steps[0] for steps in seen[1:]] == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]


def test_vb_is_decoder_nll_at_t0_and_kl_later(model, data):
    x_start, noise, labels = data
    diffusion = create_diffusion("")
    t = torch.tensor([0, 0])
    vb = diffusion.training_losses(model, x_start, t, model_kwargs=dict(y=labels), noise=noise)["vb"]  # (B,)
    x_t = diffusion.q_sample(x_start, t, noise=noise)  # (B, C, H, W)
    out = diffusion.p_mean_variance(model, x_t, t, clip_denoised=False, model_kwargs=dict(y=labels))
    log_likelihood = discretized_gaussian_log_likelihood(
        x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
    )  # (B, C, H, W)
    torch.testing.assert_close(vb, -mean_flat(log_likelihood) / np.log(2.0))
    # At t > 0 the same example gets the (much smaller) posterior KL instead.
    later = diffusion.training_losses(model, x_start, torch.tensor([1, 1]), model_kwargs=dict(y=labels), noise=noise)
    assert (later["vb"] < vb).all()


def test_vb_trains_only_the_variance_channels(model, data):
    x_start, noise, labels = data
    diffusion = create_diffusion("")
    output = None

    def capturing_model(x, t, y):
        nonlocal output
        output = model(x, t, y).requires_grad_()  # (B, 2C, H, W)
        return output

    vb = diffusion.training_losses(capturing_model, x_start, torch.tensor([0, 500]), dict(y=labels), noise)["vb"]
    (gradient,) = torch.autograd.grad(vb.sum(), output)  # (B, 2C, H, W)
    assert gradient[:, :4].abs().max() == 0 and gradient[:, 4:].abs().max() > 0


def test_create_diffusion_option_mapping():
    assert isinstance(create_diffusion(""), SpacedDiffusion)
    default = create_diffusion("")
    assert (default.mean_type, default.variance_type, default.loss_type) == (
        MeanType.EPSILON, VarianceType.LEARNED_RANGE, LossType.MSE,
    )  # fmt: skip
    fixed = create_diffusion("", learn_sigma=False, sigma_small=True, predict_xstart=True, use_kl=True)
    assert (fixed.mean_type, fixed.variance_type, fixed.loss_type) == (
        MeanType.START_X, VarianceType.FIXED_SMALL, LossType.RESCALED_KL,
    )  # fmt: skip
    assert create_diffusion(None, diffusion_steps=100).num_timesteps == 100
