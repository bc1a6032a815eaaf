"""One VAR sampling-settings object (`VARSampling`) for every entry point: `VAR.generate`/`edit` (Python keyword
arguments or `settings=`), `sample var`/`edit var` (flags over the model's recommended settings) and the web page
(its widgets) build the same settings for the same inputs, and the settings given are the ones generation uses."""
from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from scalegen.cli.main import build_parser
from scalegen.cli.var import sampling_options
from scalegen.models.var_pruning import TokenPruning
from scalegen.models.sampling_settings import FROM_CONFIG, FROM_FLAG, VAR_DEFAULTS, VARSampling

from test_var import tiny_var

LABELS = [1, 3]
# A loaded model's recommended settings (its config's `sampling` section), none of them the code's defaults.
RECOMMENDED = {"cfg": 3.0, "top_k": 4, "top_p": 0.5, "draws": "inverse-cdf", "refiner": None}


@pytest.fixture(scope="module")
def var():
    model = tiny_var().eval()
    model.sampling, model.sampling_origin = dict(RECOMMENDED), FROM_CONFIG
    return model


def command_line_settings(model, *flags: str, show: bool = False) -> VARSampling:
    """The settings `sample var` builds from these flags for `model` (its handler's own function)."""
    args = build_parser().parse_args(["sample", "var", "--ckpt", "unused", "--out", "unused.png", *flags])
    return sampling_options(args, model, show)


def test_the_defaults_are_the_official_code_s_and_the_recommended_settings_go_over_them() -> None:
    assert VARSampling() == VARSampling(cfg=1.5, top_k=0, top_p=0.0, draws="multinomial", precision="fp32")
    assert VAR_DEFAULTS == {"cfg": 1.5, "top_k": 0, "top_p": 0.0, "draws": "multinomial", "refiner": None}
    # The recommended refiner is a checkpoint name, for the command line to load: the object carries models only.
    assert VARSampling.recommended({**RECOMMENDED, "refiner": "shipped:var-refiner"}) == VARSampling(
        cfg=3.0, top_k=4, top_p=0.5, draws="inverse-cdf")


def test_python_keywords_the_command_line_and_the_page_build_the_same_settings(var, capsys) -> None:
    from scalegen.web.app import Models, var_settings

    python = var.sampling_settings(cfg=2.0, top_k=3, more_smooth=True, precision="bf16", refined_scales=1,
                                   pruning=TokenPruning((0.5,), 1, 0))
    flags = ("--cfg", "2", "--top-k", "3", "--more-smooth", "--precision", "bf16", "--refined-scales", "1",
             "--prune", "0.5", "--unpruned-blocks", "1,0")
    assert command_line_settings(var, *flags, show=True) == python
    line = capsys.readouterr().out
    assert f"cfg 2.0 ({FROM_FLAG})" in line and f"top-p 0.5 ({FROM_CONFIG})" in line  # the printed line stays
    assert python.top_p == 0.5 and python.draws == "inverse-cdf"  # what no flag gives is the model's
    # No flag, no keyword: the model's recommended settings, over the defaults.
    assert command_line_settings(var) == var.sampling_settings() == VARSampling.recommended(RECOMMENDED)

    page, words = var_settings(Models(var=var), prune=True, refine=False, cfg=2.0, top_k=3, top_p=0.25)
    assert page == var.sampling_settings(cfg=2.0, top_k=3, top_p=0.25, pruning=TokenPruning()) and words == ["pruned"]
    assert page.draws == "inverse-cdf"  # the page has no widget for it: the model's


def test_settings_given_are_what_generation_uses(var, monkeypatch) -> None:
    import scalegen.models.var as var_module

    settings = var.sampling_settings(cfg=2.0, top_k=3, top_p=0.0, draws="multinomial")
    images = var.generate(LABELS, settings=settings, seed=0)
    assert torch.equal(images, var.generate(LABELS, cfg=2.0, top_k=3, top_p=0.0, draws="multinomial", seed=0))
    # A keyword goes over the settings object (None: not given); one that is no setting is named.
    greedy = dataclasses.replace(settings, top_k=1)
    assert torch.equal(var.generate(LABELS, settings=settings, top_k=1, seed=5),
                       var.generate(LABELS, settings=greedy, seed=9))  # top-1: the seed does not matter
    assert torch.equal(var.generate(LABELS, settings=settings, top_k=None, seed=0), images)
    with pytest.raises(TypeError, match="unknown VAR sampling setting.*top_q"):
        var.generate(LABELS, top_q=0.9)

    seen = []

    class GuidanceSpy(var_module.ScaleGuidance):
        def __init__(self, cfg: float, *schedule_and_head) -> None:
            seen.append(cfg)
            super().__init__(cfg, *schedule_and_head)

    monkeypatch.setattr(var_module, "ScaleGuidance", GuidanceSpy)
    source = var.tokenizer.img_to_tokens(torch.zeros(len(LABELS), 3, 8, 8))
    var.edit(LABELS, source, torch.ones(4, 4), settings=command_line_settings(var, "--cfg", "0.5"), seed=0)
    var.generate_frames(LABELS, seed=0)
    assert seen == [0.5, RECOMMENDED["cfg"]]


def test_the_settings_module_imports_no_torch() -> None:
    import subprocess

    code = "import sys, scalegen.models.sampling_settings; print('torch' in sys.modules)"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert found.strip() == "False"
