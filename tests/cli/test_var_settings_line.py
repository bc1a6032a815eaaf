"""The settings line `sample var` / `edit var` print: a categorical VAR's names its guidance, top-k, top-p, draws and
refiner, byte for byte as before the flow head; a flow VAR's its guidance and ODE (flow steps, flow sampler) alone,
each with where it came from, and a flag only the categorical head takes is a one-line error for it."""
from __future__ import annotations

import pytest

from scalegen.cli.main import build_parser
from scalegen.cli.var import sampling_options
from scalegen.errors import UserError
from scalegen.models.sampling_settings import FROM_CONFIG, VAR_DEFAULTS, VARSampling
from scalegen.models.var import VAR, VARConfig

from test_flow_head import TINY_FLOW_VAR
from test_var import tiny_var

# Recommended settings (a config's `sampling` section), none of them the code's defaults.
CATEGORICAL_RECOMMENDED = {"cfg": 3.0, "top_k": 4, "top_p": 0.5, "draws": "inverse-cdf", "refiner": None}
FLOW_RECOMMENDED = {**VAR_DEFAULTS, "cfg": 2.5, "flow_steps": 3, "flow_sampler": "heun"}  # as `train var` writes it


def command_line(model: VAR, *flags: str) -> VARSampling:
    """The settings `sample var` builds from these flags for `model`, its settings line printed."""
    args = build_parser().parse_args(["sample", "var", "--ckpt", "unused", "--out", "unused.png", *flags])
    return sampling_options(args, model, show=True)


@pytest.fixture(scope="module")
def flow_var() -> VAR:
    model = VAR(VARConfig(**TINY_FLOW_VAR)).eval()
    model.sampling, model.sampling_origin = dict(FLOW_RECOMMENDED), FROM_CONFIG
    return model


def test_a_categorical_var_s_line_is_unchanged(capsys) -> None:
    model = tiny_var().eval()
    model.sampling, model.sampling_origin = dict(CATEGORICAL_RECOMMENDED), FROM_CONFIG
    command_line(model, "--cfg", "2", "--top-p", "0.25")
    assert capsys.readouterr().out == ("sampling with cfg 2.0 (flag), top-k 4 (model config), top-p 0.25 (flag), "
                                       "draws inverse-cdf (model config), refiner none (model config)\n")


def test_a_flow_var_s_line_names_its_guidance_and_ode_alone(flow_var, capsys) -> None:
    settings = command_line(flow_var, "--flow-steps", "5")
    assert capsys.readouterr().out == ("sampling with cfg 2.5 (model config), flow-steps 5 (flag), "
                                       "flow-sampler heun (model config)\n")
    assert settings == VARSampling(cfg=2.5, flow_steps=5, flow_sampler="heun")
    flow_var.sampling = {}  # a config without the section: the defaults
    try:
        command_line(flow_var, "--cfg", "1", "--flow-sampler", "euler")
    finally:
        flow_var.sampling = dict(FLOW_RECOMMENDED)
    assert capsys.readouterr().out == ("sampling with cfg 1.0 (flag), flow-steps 10 (default), "
                                       "flow-sampler euler (flag)\n")


@pytest.mark.parametrize("flags, named", [
    (["--top-k", "0"], "--top-k: the categorical head's only; this VAR has the flow head: drop it"),
    (["--top-p", "0.9", "--draws", "multinomial"], "--top-p, --draws: the categorical head's only"),
    (["--more-smooth"], "--more-smooth: the categorical"), (["--prune", "0.5"], "--prune: the categorical"),
    (["--refiner", "some-run"], "--refiner: the categorical"),
])
def test_a_flag_of_the_categorical_head_is_a_one_line_error_for_a_flow_var(flow_var, flags, named, capsys) -> None:
    with pytest.raises(UserError) as raised:
        command_line(flow_var, *flags)
    assert str(raised.value).startswith(named) and "\n" not in str(raised.value)
    assert capsys.readouterr().out == ""  # refused before the line
    command_line(flow_var, "--refiner", "none")  # none: no refiner, as for a categorical VAR
