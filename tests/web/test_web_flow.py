"""A flow VAR (`train var --token-head flow`) on the web page, its functions called directly (no browser): loaded, the
page shows its flow steps and flow sampler at its recommended settings in place of top-k and top-p; it samples (VAR
alone and beside a DiT) and edits with them, keeping the kept tokens; FastVAR pruning or a CoDe refiner checked is a
one-line message."""
import numpy as np
import pytest
import torch

pytest.importorskip("gradio")

from scalegen.images import grid_labels, image_grid  # noqa: E402
from scalegen.models.sampling_settings import VAR_DEFAULTS, VARSampling  # noqa: E402
from scalegen.runs.loading import load_dit  # noqa: E402
from scalegen.runs.names import SHIPPED_DIT  # noqa: E402
from scalegen.web.app import WARNING, Models, build_app, edit, load, sample  # noqa: E402

from test_flow_head import flow_run  # noqa: E402, F401 (the tiny flow VAR run, a fixture)

CLASSES = ["class 1", "class 8"]  # the flow run's data set has no class names
# Recommended settings, none of them the defaults, given to the loaded flow VAR (as its config's `sampling` section).
RECOMMENDED = {**VAR_DEFAULTS, "cfg": 2.0, "flow_steps": 3, "flow_sampler": "heun"}
# What a Generate request sends: the hidden top-k and top-p at values a flow head refuses (they must not reach it).
REQUEST = dict(choice="VAR", classes=CLASSES, per_class=2, seed=0, dit_cfg=1.5, var_cfg=2.0, sampler="euler", steps=2,
               top_k=5, top_p=0.9, flow_steps=2, flow_sampler="heun", label_rows=False, prune=False, refine=False)
REFUSED = "FastVAR pruning and a CoDe refiner work with the categorical head only"


@pytest.fixture(scope="module")
def models(flow_run) -> Models:  # noqa: F811
    """The flow VAR loaded through the page's Load handler, then given RECOMMENDED."""
    models = Models(folders=(flow_run,))
    shown = load(models, "", str(flow_run / "var"))
    assert shown[0] == "loaded VAR: 10 classes"
    var_cfg, top_k, top_p, flow_steps, flow_sampler, edit_cfg = shown[6:]
    assert not top_k["visible"] and not top_p["visible"] and flow_steps["visible"] and flow_sampler["visible"]
    sampling = models.var.sampling  # what training wrote: the defaults, the run's guidance
    assert (var_cfg["value"], flow_steps["value"], flow_sampler["value"], edit_cfg["value"]) == (
        sampling["cfg"], sampling["flow_steps"], sampling["flow_sampler"], sampling["cfg"])
    models.var.sampling = dict(RECOMMENDED)
    return models


def test_the_page_starts_a_flow_var_at_its_recommended_flow_settings_with_top_k_and_top_p_hidden(models) -> None:
    app = build_app(models)
    widgets = {block.elem_id: block for block in app.blocks.values() if getattr(block, "elem_id", None)}
    assert widgets["flow-steps"].value == 3 and widgets["flow-sampler"].value == "heun"
    assert widgets["var-cfg"].value == widgets["edit-cfg"].value == 2.0
    assert widgets["flow-steps"].visible and widgets["flow-sampler"].visible
    assert not widgets["top-k"].visible and not widgets["top-p"].visible
    app = build_app(Models())  # no VAR: the categorical widgets, as before
    widgets = {block.elem_id: block for block in app.blocks.values() if getattr(block, "elem_id", None)}
    assert widgets["top-k"].visible and widgets["top-p"].visible and not widgets["flow-steps"].visible


def test_a_flow_var_samples_with_the_flow_widgets_alone(models) -> None:
    _, grid, _, forming, figures, download = sample(models, **REQUEST)
    assert grid is not None, figures
    labels = grid_labels([models.var.class_names.index(name) for name in CLASSES], 2)
    with torch.no_grad():
        images = models.var.generate(labels, cfg=2.0, flow_steps=2, flow_sampler="heun", seed=0)
    assert np.array_equal(np.asarray(grid), np.asarray(image_grid(images, rows=2)))
    assert forming.size == (3 * 8, 8) and "GFLOPs/image" in figures and download["visible"]
    euler = sample(models, **{**REQUEST, "flow_sampler": "euler"})[1]
    assert not np.array_equal(np.asarray(euler), np.asarray(grid))  # the sampler reached the VAR
    flops = models.flops.copy()
    sample(models, **{**REQUEST, "flow_steps": 4})
    assert len(models.flops) == len(flops) + 1  # counted apart for other flow steps
    for steps in (0, 101, 2.5):
        figures = sample(models, **{**REQUEST, "flow_steps": steps})[4]
        assert figures == WARNING + f"VAR flow steps must be a whole number from 1 to 100, not {steps:g}"


def test_a_flow_var_samples_beside_a_dit(models) -> None:
    both = Models(dit=load_dit(SHIPPED_DIT), var=models.var)
    both.dit.class_names = list(models.var.class_names)  # a DiT of the same classes
    dit_grid, var_grid, _, _, figures, _ = sample(both, **{**REQUEST, "choice": "both"})
    assert dit_grid is not None and var_grid is not None, figures
    assert "**DiT**" in figures and "**VAR**" in figures
    assert np.array_equal(np.asarray(var_grid), np.asarray(sample(models, **REQUEST)[1]))


def test_a_flow_var_edits_at_its_recommended_settings_keeping_the_kept_tokens(models, tmp_path, monkeypatch) -> None:
    var, recorded = models.var, {}
    generate_tokens = var.generate_tokens

    def recording(*args, **kwargs):
        recorded.update(kwargs, sampled=generate_tokens(*args, **kwargs))
        return recorded["sampled"]
    monkeypatch.setattr(var, "generate_tokens", recording)
    picture = tmp_path / "picture.png"
    image_grid(torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)), 1).save(picture)
    shown, mask, result, message = edit(models, {"path": str(picture)}, "0,0,4,8", "inpaint", "class 8", 0, 2.5, False,
                                        False)
    assert message == "inpainted the box 0,0,4,8" and result is not None
    assert recorded["settings"] == VARSampling.recommended(RECOMMENDED).with_given(cfg=2.5)
    kept = recorded["keep_mask"].flatten().bool()  # (16,): the right half of the 4×4 grid
    assert int(kept.sum()) == 8 and np.asarray(mask)[:, 4:].max() == 0 and np.asarray(mask)[:, :4].min() == 255
    source, edited = recorded["source_tokens"][-1], recorded["sampled"].tokens[-1]  # (1, 16, c)
    assert torch.equal(edited[:, kept], source[:, kept]) and not torch.equal(edited[:, ~kept], source[:, ~kept])


def test_pruning_or_a_refiner_checked_with_a_flow_var_is_a_one_line_message(models, tmp_path) -> None:
    with_refiner = Models(var=models.var, refiner=models.var)
    for prune, refine in ((True, False), (False, True)):
        dit_grid, var_grid, _, _, figures, download = sample(with_refiner, **{**REQUEST, "prune": prune,
                                                                               "refine": refine})
        assert dit_grid is var_grid is None and not download["visible"]
        assert figures.startswith(WARNING + REFUSED) and "\n" not in figures
        picture = tmp_path / "picture.png"
        image_grid(torch.full((1, 1, 8, 8), 0.5), 1).save(picture)
        *shown, message = edit(with_refiner, {"path": str(picture)}, "0,0,4,8", "inpaint", "", 0, 2.0, prune, refine)
        assert shown == [None, None, None] and message.startswith(WARNING + REFUSED) and "\n" not in message
