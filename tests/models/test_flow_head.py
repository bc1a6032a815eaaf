"""VAR's flow head (`scalegen.models.flow_head`) on continuous multi-scale tokens: its sampler integrates an exact
velocity field to the Gaussian it belongs to, guidance at strength 0 is the conditional velocity exactly, a tiny model
learns two fixed latents, editing keeps the kept tokens, xAR's noisy context noises the teacher-forcing input and not
the targets, `train var --token-head flow` trains, resumes, loads, exports and generates through the public API, and
what does not combine is a one-line error."""
import math

import pytest
import torch
from torch import nn

from scalegen.cli.main import main
from scalegen.data.batch import Batch
from scalegen.data.names import IMAGES
from scalegen.data.store import CachedArrays
from scalegen.diffusion.flow import LinearFlow
from scalegen.diffusion.objective import TIME_SCALE
from scalegen.errors import UserError
from scalegen.files import json_config
from scalegen.models.flow_head import FlowHead, FlowSampler
from scalegen.models.sampling_settings import VARSampling
from scalegen.models.settings import FLOW_CONTEXT_NOISE
from scalegen.models.token_heads import ScaleGuidance
from scalegen.models.var import VAR, VARConfig
from scalegen.models.var_edit import edit_box
from scalegen.models.var_pruning import TokenPruning
from scalegen.runs.folder import RunFolder, save_checkpoint
from scalegen.runs.loading import load_run, load_var
from scalegen.tokenizers.continuous_scales import ContinuousScales
from scalegen.tokenizers.kl_vae import KLVAE, LatentNormalization
from scalegen.train import var_task
from scalegen.train.run_log import read_log
from tests_support import write_fashion_subset
from test_kl_tokenizer import TINY_KL
from test_var_training import tokenizer_folder

PATCH_NUMS = (1, 2, 4)  # TINY_KL's 4×4 latent
TINY_FLOW_VAR = dict(depth=1, width=32, num_heads=2, num_classes=10, patch_nums=PATCH_NUMS, vocab_size=0,
                     z_channels=TINY_KL.latent_channels, token_head="flow", head_width=32, head_blocks=2)


def tiny_tokenizer() -> ContinuousScales:
    torch.manual_seed(0)
    channels = TINY_KL.latent_channels
    return ContinuousScales.from_kl(KLVAE(TINY_KL), LatentNormalization(torch.zeros(channels), torch.ones(channels)),
                                    PATCH_NUMS).eval()


class GaussianVelocity(nn.Module):
    """The exact velocity of the linear interpolant from tokens x ~ N(mean, std²) per channel to noise N(0, 1):
    with a = 1 − t and s² = a²·std² + t², v(x) = E[ε − x_0 | x_t = x] = (t − a·std²)/s² · (x − a·mean) − mean."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def conditioning(self, condition: torch.Tensor) -> torch.Tensor:
        return condition  # the exact velocity ignores it

    def velocity(self, x: torch.Tensor, t: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        t = (t / TIME_SCALE).double().unsqueeze(1)  # (N, 1) or (1, 1)
        a = 1 - t
        spread = a.square() * self.std.square() + t.square()  # (N, c)
        return (t - a * self.std.square()) / spread * (x.double() - a * self.mean) - self.mean  # (N, c)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_the_sampler_integrates_an_exact_velocity_to_its_gaussian(method) -> None:
    count, steps = 40_000, 200
    mean, std = torch.tensor([1.5, -2.0, 0.0], dtype=torch.float64), torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    sampler = FlowSampler(GaussianVelocity(mean, std), LinearFlow(), 3, steps, method, torch.Generator().manual_seed(0))
    condition = torch.zeros(2, count, 1)  # (2B, l, C): both halves, B = 1
    tokens = sampler.sample(condition, ScaleGuidance(1.0, 2, FlowHead(VARConfig(**TINY_FLOW_VAR))), 1).tokens[0]
    # bounds of 6 standard errors of the sample mean and variance, for a Gaussian sample of `count`
    assert ((tokens.mean(0) - mean).abs() < 6 * std / math.sqrt(count)).all()
    assert ((tokens.var(0) - std.square()).abs() < 6 * std.square() * math.sqrt(2 / (count - 1))).all()


def test_guidance_at_strength_zero_is_the_conditional_velocity_exactly() -> None:
    torch.manual_seed(0)
    model = VAR(VARConfig(**TINY_FLOW_VAR)).eval()
    for parameter in model.flow_head.parameters():  # not adaLN-zero: velocities that depend on the condition
        nn.init.normal_(parameter, std=0.3)
    head, conditional = model.token_head, torch.randn(3, 4, 32)
    velocities = torch.randn(6, 4, 4)
    assert torch.equal(head.guide(velocities, 0.0), velocities[:3])
    draws = []
    for unconditional in (torch.randn(3, 4, 32), torch.zeros(3, 4, 32)):
        sampler = head.sampler(model, VARSampling(cfg=0.0, flow_steps=3, flow_sampler="heun"),
                               torch.Generator().manual_seed(1))
        both = torch.cat([conditional, unconditional])  # (2B, l, C)
        draws.append(sampler.sample(both, ScaleGuidance(0.0, 3, head), 2))
    assert torch.equal(draws[0].tokens, draws[1].tokens) and torch.equal(draws[0].guided, draws[1].guided)
    guided = head.sampler(model, VARSampling(cfg=2.0, flow_steps=3), torch.Generator().manual_seed(1))
    assert not torch.equal(guided.sample(torch.cat([conditional, torch.zeros(3, 4, 32)]),
                                         ScaleGuidance(2.0, 3, head), 2).tokens, draws[1].tokens)


def test_several_draws_per_token_average_its_loss_over_noises_and_times_of_one_transformer_output() -> None:
    torch.manual_seed(0)
    draws, batch, length, channels = 3, 2, sum(side * side for side in PATCH_NUMS), TINY_KL.latent_channels
    model = VAR(VARConfig(**{**TINY_FLOW_VAR, "head_draws": draws}))
    for parameter in model.flow_head.parameters():  # not adaLN-zero: velocities that depend on noise and time
        nn.init.normal_(parameter, std=0.3)
    head, hidden, cond = model.token_head, torch.randn(batch, length, 32), torch.randn(batch, 32)
    targets = torch.randn(batch, length, channels)  # (B, L, c)
    torch.manual_seed(1)
    losses = head.output(model, hidden, cond, targets)  # (B, L)
    condition = head.output(model, hidden, cond).reshape(batch * length, -1).repeat(draws, 1)  # (D·B·L, C)
    torch.manual_seed(1)  # the same noises and times, each draw of each token its own
    per_draw = LinearFlow().training_losses(lambda x, t: model.flow_head.velocity(
        x, t, model.flow_head.conditioning(condition)), targets.reshape(-1, channels).repeat(draws, 1))["loss"]
    per_draw = per_draw.view(draws, batch, length)  # (D, B, L)
    assert losses.shape == (batch, length)
    torch.testing.assert_close(losses, per_draw.mean(dim=0))
    assert (per_draw[0] != per_draw[1]).all() and (per_draw[1] != per_draw[2]).all()  # D different draws


@pytest.mark.end_to_end
def test_a_tiny_model_learns_two_fixed_latents() -> None:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    targets = torch.randn(2, 4, 4, 4)  # (2, c, 4, 4): one latent per class
    tokens = tokenizer.quantize.features_to_tokens(targets)
    model = VAR(VARConfig(**{**TINY_FLOW_VAR, "label_dropout": 0.0, "drop_path_rate": 0.0}), tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    labels, var_input, flat = torch.tensor([0, 1]), tokenizer.tokens_to_var_input(tokens), torch.cat(tokens, 1)
    for _ in range(300):
        loss = model(labels.repeat(16), var_input.repeat(16, 1, 1), flat.repeat(16, 1, 1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    sampled = model.generate_tokens([0, 1], cfg=0.0, flow_steps=20, flow_sampler="heun", seed=0).features
    error = (sampled - targets).square().mean() / targets.square().mean()
    assert error < 0.05, error  # the two latents, not their mean (which leaves half the variance: 0.5)


def test_editing_keeps_the_kept_continuous_tokens() -> None:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = VAR(VARConfig(**TINY_FLOW_VAR), tokenizer).eval()
    source = tokenizer.img_to_tokens(torch.rand(2, 1, 8, 8) * 2 - 1)
    keep = torch.zeros(4, 4)
    keep[:, :2] = 1  # keep the left half
    edited = model.generate_tokens([3, 4], source_tokens=source, keep_mask=keep, seed=0, flow_steps=2)
    kept = keep.flatten().bool()
    assert torch.equal(edited.tokens[-1][:, kept], source[-1][:, kept])
    assert not torch.equal(edited.tokens[-1][:, ~kept], source[-1][:, ~kept])
    image = torch.rand(1, 1, 8, 8)
    result, regenerated = edit_box(model, image, (0, 0, 4, 8), "inpaint", seed=0, flow_steps=2)
    assert result.shape == (1, 1, 8, 8)
    assert regenerated[0, 0, :, :4].eq(1).all() and regenerated[0, 0, :, 4:].eq(0).all()


def test_a_noisy_context_lies_between_each_token_and_its_noise_at_a_level_up_to_the_strength() -> None:
    torch.manual_seed(0)
    strength, tokens = 0.6, torch.ones(64, 4096, 8)  # (B, p², c): each image's spread is its noise level
    noisy = FlowHead.noisy_context([tokens, 2 * tokens], strength)
    for scale, clean_value in zip(noisy, (1.0, 2.0)):
        mean, spread = scale.double().mean(dim=(1, 2)), scale.double().std(dim=(1, 2))  # (B,) each: 1 − τ and τ
        assert ((mean / clean_value + spread - 1).abs() < 0.05).all()  # (1 − τ)·x + τ·ε, ε ~ N(0, 1)
        assert spread.max() < strength * 1.05 and spread.min() < 0.2 * strength and spread.max() > 0.8 * strength
    assert not torch.equal(noisy[0].std(dim=(1, 2)), noisy[1].std(dim=(1, 2)) / 2)  # a level per scale


def test_training_with_a_noisy_context_noises_the_input_and_not_the_targets(monkeypatch, tmp_path, capsys) -> None:
    tokenizer = tiny_tokenizer()
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    batch = Batch(IMAGES, torch.tensor([0, 1, 2, 3]), image=images)
    seen = []
    original = VAR.forward
    monkeypatch.setattr(VAR, "forward", lambda model, *inputs: seen.append(inputs) or original(model, *inputs))
    for context_noise in (0.0, 0.5):
        torch.manual_seed(0)
        task = var_task.VARTask(VARConfig(**TINY_FLOW_VAR), tokenizer, {}, context_noise=context_noise)
        task.loss(task.model, batch)
    (clean_labels, clean_input, clean_targets), (labels, noisy_input, targets) = seen
    assert torch.equal(targets, clean_targets) and torch.equal(targets, torch.cat(tokenizer.img_to_tokens(images), 1))
    assert not torch.equal(noisy_input, clean_input) and noisy_input.shape == clean_input.shape
    with pytest.raises(SystemExit):
        main(["train", "var", "--tokenizer", "unread", "--context-noise", "0.3", "--steps", "1", "--out",
              str(tmp_path / "run")])
    error = capsys.readouterr().err
    assert "the categorical head's tokens take no noise: drop --context-noise" in error
    assert error.count("\n") == 1 and not (tmp_path / "run").exists()


def kl_folder(folder) -> None:
    """A random tiny KL tokenizer saved as a `train kl` run."""
    torch.manual_seed(0)
    vae = KLVAE(TINY_KL)
    save_checkpoint(folder, 1, {"kind": "klvae", "model": json_config(TINY_KL)}, vae.state_dict(), vae.state_dict(),
                    {"step": 1})


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    """`train var --token-head flow` on a KL run, with a token cache, stopped at 3 steps and resumed to 6."""
    root = tmp_path_factory.mktemp("flow")
    kl_folder(root / "kl")
    write_fashion_subset(root / "data")
    arguments = ["train", "var", "--tokenizer", str(root / "kl"), "--token-head", "flow", "--depth", "1", "--width",
                 "32", "--num-heads", "2", "--head-width", "16", "--head-blocks", "2", "--head-draws", "2",
                 "--patch-nums", "1,2,4", "--data", str(root / "data"), "--token-cache", "--batch-size", "16", "--lr", "3e-3",
                 "--warmup-steps", "0", "--log-every", "1", "--device", "cpu", "--out", str(root / "var")]
    main([*arguments, "--steps", "3"])
    with pytest.MonkeyPatch.context() as patch:  # the resumed run keeps the normalisations its tokenizer copy holds
        patch.setattr(var_task, "measure_mean_normalization", refuse_to_measure)
        patch.setattr(var_task, "measure_token_scales", refuse_to_measure)
        main([*arguments, "--steps", "6"])
    return root


def refuse_to_measure(*args, **kwargs):
    raise AssertionError("a resumed run measured its latents' normalisation or its scales' spread again")


def test_train_resume_load_export_and_generate_through_the_public_api(flow_run, tmp_path, capsys) -> None:
    run = flow_run / "var"
    rows = read_log(run)
    assert [row["step"] for row in rows] == list(range(1, 7)) and {"loss_1x1", "loss_4x4"} <= set(rows[-1])
    assert CachedArrays(RunFolder(run).token_cache).row("tokens", 0, False).dtype == torch.float32
    loaded = load_run(run, "var")
    model = loaded.model
    assert model.config.token_head == "flow" and model.config.head_width == 16 and model.config.vocab_size == 0
    assert model.config.head_draws == 2
    assert isinstance(model.tokenizer, ContinuousScales) and model.tokenizer.patch_nums == PATCH_NUMS
    assert (model.tokenizer.quantize.token_scale != 1).all()  # each scale's spread, measured over the data
    assert loaded.config[var_task.CONTEXT_NOISE_KEY] == FLOW_CONTEXT_NOISE  # the flow head's, by default
    assert model.sampling["flow_steps"] == VARSampling.flow_steps and model.sampling["top_p"] == 0.0
    images = model.generate([0, 1, 2], cfg=1.5, seed=0)
    assert images.shape == (3, 1, 8, 8) and 0 <= float(images.min()) <= float(images.max()) <= 1
    frames = model.generate_frames([0], seed=0)
    assert len(frames) == 3 and torch.equal(frames[-1], model.generate([0], seed=0))
    main(["export", "--run", str(run), "--out", str(tmp_path / "export"), "--fp32"])
    exported = load_var(tmp_path / "export")
    assert torch.equal(exported.generate([0, 1, 2], cfg=1.5, seed=0), images)
    main(["sample", "var", "--ckpt", str(run), "--classes", "0,1", "--per-class", "2", "--flow-steps", "2",
          "--flow-sampler", "heun", "--device", "cpu", "--out", str(tmp_path / "grid.png")])
    assert (tmp_path / "grid.png").exists()
    assert "flow-steps 2 (flag), flow-sampler heun (flag)" in capsys.readouterr().out
    main(["edit", "var", "--ckpt", str(run), "--image", str(tmp_path / "grid.png"), "--box", "0,0,4,8", "--device",
          "cpu", "--out", str(tmp_path / "edited.png")])
    assert "flow-steps 10 (model config), flow-sampler euler (model config)" in capsys.readouterr().out


def test_what_does_not_combine_is_a_one_line_error(flow_run, tmp_path, capsys) -> None:
    model = load_var(flow_run / "var")
    refusals = [(dict(top_k=5), "top_k do not apply"), (dict(top_p=0.9), "top_p do not apply"),
                (dict(more_smooth=True), "more_smooth do not apply"), (dict(draws="inverse-cdf"), "draws do not"),
                (dict(pruning=TokenPruning((0.5,))), "FastVAR pruning and a CoDe refiner"),
                (dict(refiner=model), "FastVAR pruning and a CoDe refiner"),
                (dict(flow_steps=0), "flow_steps >= 1"), (dict(flow_sampler="rk4"), "flow_sampler in euler, heun")]
    for given, message in refusals:
        with pytest.raises(UserError, match=message) as raised:
            model.generate([0], seed=0, **given)
        assert "\n" not in str(raised.value)
    with pytest.raises(UserError, match="the flow head has no classes to smooth"):
        model.token_head.loss(model, torch.zeros(1, 21), torch.zeros(1, 21, 4), label_smoothing=0.1)
    with pytest.raises(SystemExit):
        main(["sample", "var", "--ckpt", "shipped:var", "--flow-steps", "2", "--out", str(tmp_path / "grid.png")])
    assert "this VAR has the categorical head: drop them" in capsys.readouterr().err
    tokenizer_folder(tmp_path / "vq")
    common = ["--depth", "1", "--width", "32", "--num-heads", "2", "--data", str(flow_run / "data"), "--steps", "1",
              "--batch-size", "4", "--device", "cpu"]
    cases = [(["--tokenizer", str(tmp_path / "vq"), "--token-head", "flow"], "learns continuous tokens but"),
             (["--tokenizer", str(flow_run / "kl")], "train with --token-head flow"),
             (["--tokenizer", str(flow_run / "var")], "train with --token-head flow"),
             (["--tokenizer", str(tmp_path / "vq"), "--patch-nums", "1,2"], "drop --patch-nums"),
             (["--tokenizer", str(flow_run / "kl"), "--token-head", "flow", "--patch-nums", "1,2"],
              "must grow from 1 or more and end at the latent side 4")]
    for index, (arguments, message) in enumerate(cases):
        with pytest.raises(SystemExit):
            main(["train", "var", *arguments, *common, "--out", str(tmp_path / f"run{index}")])
        error = capsys.readouterr().err.strip()
        assert message in error and "\n" not in error, error
