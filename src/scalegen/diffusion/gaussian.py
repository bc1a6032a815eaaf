"""Gaussian diffusion as DiT uses it (ADM / improved DDPM): forward process, training losses, samplers.

Numerically equal to the official DiT ``diffusion/gaussian_diffusion.py``: float64 schedule arrays are gathered per
timestep and cast to float32, and every random draw uses the global generator in the official order, so one global
seed gives the same samples. ``MeanType.PREVIOUS_X`` and ``VarianceType.LEARNED`` keep their ADM meaning (DiT's copy
treats them as EPSILON and LEARNED_RANGE); ``create_diffusion`` never selects either.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from scalegen.diffusion.math import (
    LEARNED_VARIANCES, LossType, MeanType, VarianceType, discretized_gaussian_log_likelihood, mean_flat, normal_kl,
    schedule_on_device,
)
from scalegen.errors import UserError

# model(x_t, t, **model_kwargs) -> output, or (output, extra) where extra is passed through untouched.
Model = Callable[..., Any]
DenoisedFn = Callable[[torch.Tensor], torch.Tensor]


# The VLB term with RESCALED_MSE is scaled as if the chain had this many steps, to match the original implementation.
RESCALED_MSE_REFERENCE_STEPS = 1000.0


def _extract(array: np.ndarray, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Gather array[t] as float32 and broadcast it to `shape` (batch first)."""
    # The float32 copy on the device is made once (a copy per call would wait for the GPU); float64 stays off it.
    values = schedule_on_device(array, t.device)[t]  # (B,)
    return values.view(-1, *([1] * (len(shape) - 1))).expand(shape)  # (B, C, H, W)


def _split_variance_channels(output: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a learned-variance model's (B, 2C, H, W) output into its mean and variance halves."""
    expected = (x.shape[0], 2 * x.shape[1], *x.shape[2:])
    if tuple(output.shape) != expected:
        raise ValueError(f"a learned-variance model must output {expected}, got {tuple(output.shape)}")
    return torch.split(output, x.shape[1], dim=1)


class GaussianDiffusion:
    """Utilities for training and sampling a diffusion model over a fixed beta schedule.

    Args:
        betas: (T,) noise schedule, T >= 2.
        mean_type: what the model's mean channels predict.
        variance_type: how the reverse-step variance is obtained.
        loss_type: training objective.
    """

    def __init__(self, *, betas: np.ndarray, mean_type: MeanType, variance_type: VarianceType, loss_type: LossType):
        self.mean_type = mean_type
        self.variance_type = variance_type
        self.loss_type = loss_type

        betas = np.array(betas, dtype=np.float64)  # float64 keeps ᾱ accurate over 1000 products
        if betas.ndim != 1 or len(betas) < 2:
            raise UserError(f"a diffusion needs at least 2 steps, got betas of shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise UserError("every beta must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        # x_0 = x_t / sqrt(ᾱ) - sqrt(1/ᾱ - 1) ε
        self.sqrt_reciprocal_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_reciprocal_alphas_cumprod_minus_one = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # The posterior q(x_{t-1} | x_t, x_0).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t=0; its log takes the t=1 value there instead of -inf.
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

        # FIXED_LARGE also starts from the t=1 posterior variance, which gives a better decoder likelihood than β_0.
        large_variance = np.append(self.posterior_variance[1], betas[1:])
        self._fixed_variances = {
            VarianceType.FIXED_LARGE: (large_variance, np.log(large_variance)),
            VarianceType.FIXED_SMALL: (self.posterior_variance, self.posterior_log_variance_clipped),
        }

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I).

        Args:
            x_start: clean data x_0, (B, C, H, W); t: (B,) step indices (0 is one step of noise);
            noise: the ε to use, drawn with torch.randn_like when None.

        Returns:
            x_t, (B, C, H, W).
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )  # (B, C, H, W)

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of the posterior q(x_{t-1} | x_t, x_0).

        Args:
            x_start: x_0, (B, C, H, W); x_t: x_t, same shape; t: (B,) step indices.

        Returns:
            (mean, variance, log_variance), each (B, C, H, W).
        """
        mean = (
            _extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + _extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )  # (B, C, H, W)
        variance = _extract(self.posterior_variance, t, x_t.shape)  # (B, C, H, W)
        log_variance = _extract(self.posterior_log_variance_clipped, t, x_t.shape)  # (B, C, H, W)
        return mean, variance, log_variance

    def _call_model(self, model: Model, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None) -> tuple:
        """Run the model at timestep indices t; returns (output, extra). Respaced diffusions remap t here."""
        output = model(x, t, **(model_kwargs or {}))
        return output if isinstance(output, tuple) else (output, None)

    def _predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (
            _extract(self.sqrt_reciprocal_alphas_cumprod, t, x_t.shape) * x_t
            - _extract(self.sqrt_reciprocal_alphas_cumprod_minus_one, t, x_t.shape) * eps
        )  # (B, C, H, W)

    def _predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        return (
            _extract(self.sqrt_reciprocal_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart
        ) / _extract(self.sqrt_reciprocal_alphas_cumprod_minus_one, t, x_t.shape)  # (B, C, H, W)

    def _predict_xstart_from_previous(self, x_t: torch.Tensor, t: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        # Invert the posterior mean: mean = coef1 x_0 + coef2 x_t.
        return (
            _extract(1.0 / self.posterior_mean_coef1, t, x_t.shape) * previous
            - _extract(self.posterior_mean_coef2 / self.posterior_mean_coef1, t, x_t.shape) * x_t
        )  # (B, C, H, W)

    def _mean_variance_from_output(
        self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool,
        denoised_fn: DenoisedFn | None,
    ) -> dict[str, torch.Tensor]:
        """Turn a raw model output into p(x_{t-1} | x_t): mean, variance, log_variance, pred_xstart."""
        if self.variance_type in LEARNED_VARIANCES:
            output, variance_values = _split_variance_channels(output, x)  # (B, C, H, W) each
            if self.variance_type == VarianceType.LEARNED:
                log_variance = variance_values  # (B, C, H, W)
            else:
                min_log = _extract(self.posterior_log_variance_clipped, t, x.shape)  # (B, C, H, W)
                max_log = _extract(np.log(self.betas), t, x.shape)  # (B, C, H, W)
                fraction = (variance_values + 1) / 2  # v in [-1, 1] -> [0, 1]
                log_variance = fraction * max_log + (1 - fraction) * min_log  # (B, C, H, W)
            variance = torch.exp(log_variance)  # (B, C, H, W)
        else:
            variance_array, log_variance_array = self._fixed_variances[self.variance_type]
            variance = _extract(variance_array, t, x.shape)  # (B, C, H, W)
            log_variance = _extract(log_variance_array, t, x.shape)  # (B, C, H, W)

        def process_xstart(prediction: torch.Tensor) -> torch.Tensor:
            if denoised_fn is not None:
                prediction = denoised_fn(prediction)
            return prediction.clamp(-1, 1) if clip_denoised else prediction

        if self.mean_type == MeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_previous(x, t, output))  # (B, C, H, W)
            mean = output  # (B, C, H, W)
        else:
            if self.mean_type == MeanType.START_X:
                pred_xstart = process_xstart(output)  # (B, C, H, W)
            else:
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x, t, output))  # (B, C, H, W)
            mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)  # (B, C, H, W)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_mean_variance(
        self, model: Model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
        denoised_fn: DenoisedFn | None = None, model_kwargs: dict | None = None,
    ) -> dict[str, Any]:
        """Apply the model to get p(x_{t-1} | x_t) and its prediction of x_0.

        Args:
            model: called as model(x, t, **model_kwargs); returns (B, C or 2C, H, W), or (that, extra).
            x: x_t, (B, C, H, W).
            t: (B,) integer timestep indices of this diffusion.
            clip_denoised: clamp the x_0 prediction to [-1, 1] (DiT passes False for latents).
            denoised_fn: applied to the x_0 prediction before clipping.
            model_kwargs: extra keyword arguments for the model, e.g. dict(y=labels).

        Returns:
            dict with "mean", "variance", "log_variance", "pred_xstart" (each (B, C, H, W)) and "extra".
        """
        output, extra = self._call_model(model, x, t, model_kwargs)
        out = self._mean_variance_from_output(output, x, t, clip_denoised, denoised_fn)
        out["extra"] = extra
        return out

    def p_sample(
        self, model: Model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
        denoised_fn: DenoisedFn | None = None, model_kwargs: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """One ancestral step: sample x_{t-1} ~ p(x_{t-1} | x_t); no noise is added at t=0.

        Args:
            model, x, t, clip_denoised, denoised_fn, model_kwargs: as for p_mean_variance.

        Returns:
            dict with "sample" (x_{t-1}) and "pred_xstart", each (B, C, H, W).
        """
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = torch.randn_like(x)  # drawn at t=0 too, to keep the global RNG stream identical to the official code
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise  # (B, C, H, W)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self, model: Model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
        denoised_fn: DenoisedFn | None = None, model_kwargs: dict | None = None, eta: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """One DDIM step (Song et al., eq. 12); eta=0 is deterministic, eta=1 matches ancestral variance.

        Args:
            model, x, t, clip_denoised, denoised_fn, model_kwargs: as for p_mean_variance; eta: per-step noise scale.

        Returns:
            dict with "sample" (x_{t-1}) and "pred_xstart", each (B, C, H, W).
        """
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        # Re-derive ε from the (possibly clipped) x_0 prediction, whatever the model predicts.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])  # (B, C, H, W)
        alpha_bar = _extract(self.alphas_cumprod, t, x.shape)  # (B, C, H, W)
        alpha_bar_prev = _extract(self.alphas_cumprod_prev, t, x.shape)  # (B, C, H, W)
        sigma = (
            eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )  # (B, C, H, W)
        noise = torch.randn_like(x)  # drawn even when eta=0: keeps the global RNG stream identical to the official code
        mean = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
        sample = mean + nonzero_mask * sigma * noise  # (B, C, H, W)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _sample_loop_progressive(
        self, step: Callable[..., dict[str, torch.Tensor]], model: Model, shape: tuple[int, ...],
        noise: torch.Tensor | None, device: torch.device | str | None, progress: bool, **step_kwargs: Any,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Run `step` from t = T-1 down to 0, starting at `noise` (or fresh Gaussian noise), yielding each result."""
        if device is None:
            device = _default_device(model, noise)
        sample = noise if noise is not None else torch.randn(*shape, device=device)  # (B, C, H, W)
        timesteps = list(range(self.num_timesteps))[::-1]
        for timestep in tqdm(timesteps) if progress else timesteps:
            t = torch.full((shape[0],), timestep, dtype=torch.long, device=device)  # (B,)
            with torch.no_grad():
                out = step(model, sample, t, **step_kwargs)
            yield out
            sample = out["sample"]

    def p_sample_loop_progressive(
        self, model: Model, shape: tuple[int, ...], noise: torch.Tensor | None = None, clip_denoised: bool = True,
        denoised_fn: DenoisedFn | None = None, model_kwargs: dict | None = None,
        device: torch.device | str | None = None, progress: bool = False,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Like p_sample_loop, but yield each step's p_sample dict."""
        yield from self._sample_loop_progressive(
            self.p_sample, model, shape, noise, device, progress, clip_denoised=clip_denoised,
            denoised_fn=denoised_fn, model_kwargs=model_kwargs,
        )

    def p_sample_loop(
        self, model: Model, shape: tuple[int, ...], noise: torch.Tensor | None = None, clip_denoised: bool = True,
        denoised_fn: DenoisedFn | None = None, model_kwargs: dict | None = None,
        device: torch.device | str | None = None, progress: bool = False,
    ) -> torch.Tensor:
        """Generate samples with the ancestral sampler over every step of this diffusion.

        Args:
            model, clip_denoised, denoised_fn, model_kwargs: as for p_mean_variance.
            shape: (B, C, H, W) of the samples.
            noise: starting x_T; drawn with torch.randn when None.
            device: where to sample; defaults to noise's device, else the model's, else the CPU.
            progress: show a tqdm progress bar.

        Returns:
            Samples, (B, C, H, W), without gradient.
        """
        steps = self.p_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress
        )
        return deque(steps, maxlen=1).pop()["sample"]  # only the last step is kept alive

    def ddim_sample_loop_progressive(
        self, model: Model, shape: tuple[int, ...], noise: torch.Tensor | None = None, clip_denoised: bool = True,
        denoised_fn: DenoisedFn | None = None, model_kwargs: dict | None = None,
        device: torch.device | str | None = None, progress: bool = False, eta: float = 0.0,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Like ddim_sample_loop, but yield each step's ddim_sample dict."""
        yield from self._sample_loop_progressive(
            self.ddim_sample, model, shape, noise, device, progress,
            clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs, eta=eta,
        )

    def ddim_sample_loop(
        self, model: Model, shape: tuple[int, ...], noise: torch.Tensor | None = None, clip_denoised: bool = True,
        denoised_fn: DenoisedFn | None = None, model_kwargs: dict | None = None,
        device: torch.device | str | None = None, progress: bool = False, eta: float = 0.0,
    ) -> torch.Tensor:
        """Generate samples with DDIM over every step of this diffusion (use respacing "ddimN" for few steps).

        Args:
            model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress: as for p_sample_loop.
            eta: DDIM noise scale; 0 gives a deterministic map from noise to sample.

        Returns:
            Samples, (B, C, H, W), without gradient.
        """
        steps = self.ddim_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress, eta
        )
        return deque(steps, maxlen=1).pop()["sample"]

    def _vb_terms_bits(
        self, output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """The VLB term for each example, in bits per dimension: the decoder NLL at t=0, else the posterior KL."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)  # (B, C, H, W)
        out = self._mean_variance_from_output(output, x_t, t, clip_denoised=False, denoised_fn=None)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / np.log(2.0)  # (B,)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )  # (B, C, H, W)
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)  # (B,)
        return torch.where(t == 0, decoder_nll, kl)  # (B,)

    def training_losses(
        self, model: Model, x_start: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-example training losses at the given timesteps.

        Args:
            model, model_kwargs: as for p_mean_variance.
            x_start: clean data x_0, (B, C, H, W); t: (B,) step indices.
            noise: the ε used to make x_t; drawn with torch.randn_like when None.

        Returns:
            dict of (B,) tensors: "loss" always; "mse" for the MSE losses; "vb" when the variance is learned by MSE.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)  # (B, C, H, W)
        output, _ = self._call_model(model, x_t, t, model_kwargs)

        if self.loss_type.is_vb():
            loss = self._vb_terms_bits(output, x_start, x_t, t)  # (B,)
            if self.loss_type == LossType.RESCALED_KL:
                loss = loss * self.num_timesteps
            return {"loss": loss}

        terms = {}
        if self.variance_type in LEARNED_VARIANCES:
            output, variance_values = _split_variance_channels(output, x_t)  # (B, C, H, W) each
            # The VLB trains only the variance: the mean channels enter it detached.
            frozen = torch.cat([output.detach(), variance_values], dim=1)  # (B, 2C, H, W)
            terms["vb"] = self._vb_terms_bits(frozen, x_start, x_t, t)  # (B,)
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / RESCALED_MSE_REFERENCE_STEPS)

        if self.mean_type == MeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start, x_t, t)[0]  # (B, C, H, W)
        elif self.mean_type == MeanType.START_X:
            target = x_start
        else:
            target = noise
        if output.shape != target.shape:
            raise ValueError(f"model output {tuple(output.shape)} does not match the target {tuple(target.shape)}")
        terms["mse"] = mean_flat((target - output) ** 2)  # (B,)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms


def _default_device(model: Model, noise: torch.Tensor | None) -> torch.device:
    """The device to sample on when none is given: noise's, else the model's first parameter's, else the CPU."""
    if noise is not None:
        return noise.device
    parameters = getattr(model, "parameters", None)
    first = next(parameters(), None) if callable(parameters) else None
    return first.device if first is not None else torch.device("cpu")
