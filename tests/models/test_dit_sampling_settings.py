"""One DiT sampling-settings object (`DiTSampling`) for every entry point: `DiT.generate`/`generate_frames` (Python
keyword arguments or `settings=`), `sample dit` (flags over the model's recommended settings), the web page (its
widgets, starting on the objective's fast sampler) and the diffusers export build the same settings for the same
inputs, and the settings given are the ones generation uses."""
from __future__ import annotations

import pytest
import torch

from scalegen.cli.main import build_parser
from scalegen.cli.sampling import dit_settings
from scalegen.models.sampling_settings import FROM_CONFIG, FROM_DEFAULT, FROM_FLAG, DiTSampling
from scalegen.runs.diffusers_export import pipeline_arguments

from test_dit import tiny_dit

LABELS = [1, 3]
# A loaded model's recommended settings (its config's `sampling` section), neither the ddpm objective's defaults.
RECOMMENDED = {"cfg": 3.0, "steps": 4}


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    model = tiny_dit(in_channels=1, learn_sigma=False).eval()
    model.sampling, model.sampling_origin = dict(RECOMMENDED), FROM_CONFIG
    return model


def command_line_settings(*flags: str) -> DiTSampling:
    """The settings `sample dit`'s flags give (its handler's own function)."""
    args = build_parser().parse_args(["sample", "dit", "--ckpt", "unused", "--out", "unused.png", *flags])
    return dit_settings(args)


def test_a_setting_left_none_is_the_model_s_recommended_one_else_its_objective_s(dit) -> None:
    assert DiTSampling.recommended({**RECOMMENDED, "sampler": "ddim"}) == DiTSampling(cfg=3.0, steps=4, sampler="ddim")
    # ddpm: the official sampler when the model recommends none; the interval: the config's (none: every step).
    assert dit.sampling_settings() == DiTSampling(cfg=3.0, steps=4, sampler="ddpm")
    assert dit.sampling_settings(DiTSampling(steps=2), cfg=1.5, sampler=None) == DiTSampling(cfg=1.5, steps=2,
                                                                                               sampler="ddpm")
    with pytest.raises(TypeError, match="unknown DiT sampling setting.*top_k"):
        dit.sampling_settings(top_k=3)
    assert pipeline_arguments(dit) == "guidance_scale=3.0, num_inference_steps=4"  # the export's model card


def test_keywords_and_settings_sample_the_same_images(dit) -> None:
    keywords = dit.generate(LABELS, cfg=2.0, steps=3, sampler="ddim", seed=0)  # (2, 1, 8, 8)
    settings = DiTSampling(cfg=2.0, steps=3, sampler="ddim")
    assert torch.equal(dit.generate(LABELS, settings=settings, seed=0), keywords)
    assert torch.equal(dit.generate(LABELS, settings=dit.sampling_settings(settings), seed=0), keywords)
    assert torch.equal(dit.generate_frames(LABELS, settings=settings, seed=0, frames=2)[-1], keywords)
    # The settings object is what generation uses: the recommended ones sample other images.
    assert not torch.equal(dit.generate(LABELS, seed=0), keywords)


def test_the_command_line_builds_the_python_settings_and_says_where_each_came_from(dit) -> None:
    given = command_line_settings("--cfg", "2", "--sampler", "ddim", "--cfg-interval", "0,0.5", "--precision", "bf16")
    python = dit.sampling_settings(cfg=2.0, sampler="ddim", cfg_interval=(0.0, 0.5), precision="bf16")
    assert dit.sampling_settings(given) == python
    assert python.steps == 4 and python.guide_all_channels is False  # what no flag gives is the model's
    assert dit.chosen_sampling(given) == {"cfg": (2.0, FROM_FLAG), "steps": (4, FROM_CONFIG),
                                          "sampler": ("ddim", FROM_FLAG), "cfg_interval": ((0.0, 0.5), FROM_FLAG)}
    assert dit.chosen_sampling()["cfg_interval"] == (None, FROM_DEFAULT)
    assert dit.sampling_settings(command_line_settings()) == dit.sampling_settings()  # no flag, no keyword


def test_the_page_starts_on_the_recommended_settings_else_the_objective_s_fast_sampler(dit) -> None:
    from scalegen.web.app import Models

    objective = dit.objective
    # The model recommends no sampler: `generate` takes the objective's first (ddpm), the page its fast one (ddim).
    assert Models(dit=dit).dit_settings() == (list(objective.samplers), objective.fast_sampler, 4, 3.0)
    assert objective.fast_sampler != dit.sampling_settings().sampler
    assert Models().dit_settings() == (list(objective.samplers), objective.fast_sampler, objective.default_steps,
                                       objective.default_cfg)
