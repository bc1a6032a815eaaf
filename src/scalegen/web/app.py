"""The web page (`scalegen serve`): sample and edit with a DiT and a VAR in the browser, built with Gradio.

Two tabs. **Sample**: DiT, VAR or both side by side; classes by name, samples per class, seed, each model's guidance
(starting at its shipped setting); the DiT's sampler and steps, the VAR's top-k and top-p, or for a flow VAR
(`--token-head flow`) its flow steps and ODE sampler in their place (`web/var_widgets.py`: starting where `sample var`
does); the grids with the class names beside the rows, the time taken and the FLOPs per image, a PNG to download once
there is one, and a strip that shows a sample forming (VAR: after each scale; DiT: the predicted clean image along
the steps). The VAR's two speed-ups, each a checkbox: FastVAR's token pruning at the finest scales (`TokenPruning()`)
and CoDe's collaborative decoding, where the refiner loaded under Models generates the finest scales; the figures say
which ran (a flow VAR takes neither: checked, they are a message).
**Edit** (VAR): an uploaded image or one of the data set's, a typed box, in- or out-painting, optionally as another
class, with the same two speed-ups (a flow VAR at its recommended guidance, flow steps and sampler); input, mask and
result.
**Models**: load a DiT, a VAR and a VAR refiner (on the VAR's tokenizer), or the shipped one-step DiT, from the
folders the page was started with only (`allowed_model_path`). Bad input is a message in the page; one request runs at
a time, and the work it may ask for is bounded (samples per class, DiT steps, images per request).
Served beyond this machine, the page should ask for a login (`serve`'s `auth`, Gradio's own): without one it warns.
"""
from __future__ import annotations

import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from PIL import Image

from scalegen.data.fashion_mnist import FashionMNIST
from scalegen.errors import UserError
from scalegen.eval.flops import GIGA, counted_flops
from scalegen.images import grid_labels, image_grid, labelled, picture_tensor
from scalegen.diffusion.objectives import sampling_objective
from scalegen.models.dit import DiT
from scalegen.models.var import VAR
from scalegen.models.var_edit import edit_box, parse_box
from scalegen.models.var_pruning import TokenPruning
from scalegen.runs.loading import load_dit, load_refiner, load_var
from scalegen.runs.names import SHIPPED, SHIPPED_MEANFLOW_DIT
from scalegen.models.sampling_settings import DiTSampling, VARSampling
from scalegen.web.access import allowed_model_path, exposure_warning, model_folders, named_folders
from scalegen.web.fields import checked_seed, checked_whole
from scalegen.web.var_widgets import head_settings, head_widgets, start_states, start_updates

MODEL_CHOICES = ("DiT", "VAR", "both")
MAX_PER_CLASS, STRIP_FRAMES = 10, 8
MAX_STEPS = 250  # DiT steps a request may ask for: the official DDPM sampler's 250
# Images one request may draw over the models chosen: both models' whole Fashion-MNIST grid (2 × 10 classes ×
# MAX_PER_CLASS), while a 1000-class model cannot be asked for 10,000 at once.
MAX_SAMPLES_PER_REQUEST = 200
DEFAULT_BOX = "8,8,24,24"
UNCONDITIONAL = "(unconditional)"
WARNING = "⚠️ "
# Small images (32 px) are shown enlarged, pixel for pixel.
PIXEL_CSS = ".scalegen-pixels img {image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain}"
SHOWN_HEIGHT, STRIP_HEIGHT = 200, 90
# The VAR's speed-ups (Sample and Edit tabs): FastVAR's token pruning at its default settings, CoDe with the refiner.
PRUNE_LABEL, REFINE_LABEL = "VAR: FastVAR token pruning (finest scales)", "VAR: CoDe refiner for the finest scales"


@dataclass
class Models:
    """The loaded models, each with a lock so that one call at a time runs on it."""

    dit: DiT | None = None
    var: VAR | None = None
    refiner: VAR | None = None  # CoDe: generates the VAR's finest scales, on the VAR's tokenizer
    folders: tuple[Path, ...] = (SHIPPED.resolve(),)  # where the page may load models from (`allowed_model_path`)
    locks: dict[str, threading.Lock] = field(default_factory=lambda: {"DiT": threading.Lock(), "VAR": threading.Lock()})
    flops: dict[tuple, float] = field(default_factory=dict)  # GFLOPs per image, by model and settings

    def load(self, dit_path: str | None, var_path: str | None, refiner_path: str | None = None) -> str:
        """(Re)load the models named (a blank path keeps the loaded one; the refiner after the VAR, on its tokenizer);
        returns what is loaded, in words."""
        if dit_path:
            self.dit = load_dit(dit_path)
            self.flops.clear()  # counted for the models that were loaded
        if var_path:
            self.var = load_var(var_path)
            self.flops.clear()
        if refiner_path:
            if self.var is None:
                raise UserError("a VAR refiner needs a VAR: give the VAR path too")
            self.refiner = load_refiner(refiner_path, self.var)  # refused when its tokenizer is another
            self.flops.clear()
        loaded = [f"{name}: {len(model.class_names)} classes" for name, model in (("DiT", self.dit), ("VAR", self.var))
                  if model is not None]
        if self.refiner is not None:
            loaded.append(f"VAR refiner: {refiner_words(self.refiner)}")
        return "loaded " + "; ".join(loaded) if loaded else "no model loaded"

    def dit_settings(self) -> tuple[list[str], str, int, float]:
        """The samplers the loaded DiT's objective offers, and the page's starting sampler, steps and guidance: the
        DiT's recommended ones (`DiTSampling.recommended`: the shipped DiT's 50 Euler steps at cfg 2.5), else its
        objective's default steps and guidance with its fast sampler (the page starts fast: one network call a step,
        where `generate` would take a ddpm model's ancestral sampler)."""
        objective = self.dit.objective if self.dit is not None else sampling_objective("ddpm")
        recommended = DiTSampling.recommended(self.dit.sampling if self.dit is not None else {})
        start = DiTSampling(cfg=objective.default_cfg, steps=objective.default_steps, sampler=objective.fast_sampler)
        start = start.with_given(cfg=recommended.cfg, steps=recommended.steps, sampler=recommended.sampler)
        return list(objective.samplers), start.sampler, start.steps, start.cfg

    def class_names(self) -> list[str]:
        """The class names of the loaded models (the VAR's when both are loaded and they differ)."""
        model = self.var or self.dit
        return list(model.class_names) if model is not None else []


def refiner_words(refiner: VAR) -> str:
    """A refiner in words, as the load message and the figures name it."""
    return f"a depth-{refiner.config.depth} VAR"


def var_settings(models: Models, prune: bool, refine: bool, **widgets: Any) -> tuple[VARSampling, list[str]]:
    """What the page's VAR samples and edits with: (the loaded VAR's recommended settings with the widgets' values
    (`VARSampling` fields) and the speed-ups checked; the speed-ups in words); a one-line error for the refiner checked
    with none loaded."""
    if refine and models.refiner is None:
        raise UserError("no VAR refiner is loaded: give its path under Models, or uncheck the CoDe refiner")
    words = (["pruned"] if prune else []) + ([f"refined by {refiner_words(models.refiner)}"] if refine else [])
    settings = models.var.sampling_settings(pruning=TokenPruning() if prune else None,
                                            refiner=models.refiner if refine else None, **widgets)
    return settings, words


def selected_labels(model: DiT | VAR, classes: list[str] | None) -> list[int]:
    """Class ids of the names picked; a one-line error for none or an unknown one."""
    if not classes:
        raise UserError("pick at least one class")
    unknown = [name for name in classes if name not in model.class_names]
    if unknown:
        raise UserError(f"unknown class {unknown[0]!r} for this model")
    return [model.class_names.index(name) for name in classes]


def uploaded_picture(upload: dict | None) -> Image.Image:
    """The Edit tab's picture from its raw upload (Gradio's own decoding would fail on a file that is not an image
    with a bare "Error" and a server traceback); a one-line error for none or one PIL cannot read."""
    if not upload or not upload.get("path"):
        raise UserError("no image: upload one or take one of the data set")
    name = upload.get("orig_name") or Path(upload["path"]).name
    try:
        with Image.open(upload["path"]) as handle:
            handle.load()
            return handle.copy()
    except (OSError, ValueError):
        raise UserError(f"{name} is not an image: upload a PNG or JPEG file") from None


def strip(frames: list[torch.Tensor]) -> Image.Image:
    """The first sample of each frame, side by side."""
    return image_grid(torch.stack([frame[0] for frame in frames]), rows=1)


def run_model(models: Models, name: str, classes: list[str] | None, per_class: int, seed: float | None, cfg: float,
              sampler: str, steps: int, top_k: float | None, top_p: float, flow_steps: float | None,
              flow_sampler: str, label_rows: bool, prune: bool, refine: bool) -> tuple[Image.Image, Image.Image, str]:
    """Sample one model: (grid, with each row's class name on its left when `label_rows`; strip of a sample forming;
    a line of figures). The VAR takes the settings of its head (`head_settings`: top-k and top-p, or flow steps and
    sampler); `prune` and `refine` turn on its speed-ups (`var_settings`); the DiT ignores them."""
    model = models.dit if name == "DiT" else models.var
    if model is None:
        raise UserError(f"no {name} is loaded: give its path under Models")
    class_ids = selected_labels(model, classes)
    seed = checked_seed(seed)
    speed_up_words = []
    if name == "VAR":
        var_sampling, speed_up_words = var_settings(models, prune, refine, cfg=cfg,
                                                    **head_settings(model, top_k, top_p, flow_steps, flow_sampler))
    labels = grid_labels(class_ids, per_class)
    if name == "DiT":
        dit_sampling = model.sampling_settings(cfg=cfg, steps=steps, sampler=sampler)

        def draw(batch: torch.Tensor) -> torch.Tensor:
            return model.generate(batch, settings=dit_sampling, seed=seed)
        frames = lambda: model.generate_frames(labels[:1], settings=dit_sampling, seed=seed,  # noqa: E731
                                               frames=STRIP_FRAMES)
        flops_key = (name, dit_sampling.cfg, dit_sampling.steps, dit_sampling.sampler)
    else:
        def draw(batch: torch.Tensor) -> torch.Tensor:
            return model.generate(batch, settings=var_sampling, seed=seed)
        frames = lambda: model.generate_frames(labels[:1], settings=var_sampling, seed=seed)  # noqa: E731
        flops_key = (name, var_sampling.cfg, var_sampling.top_k, var_sampling.top_p, var_sampling.flow_steps,
                     var_sampling.flow_sampler, *speed_up_words)
    with models.locks[name], torch.no_grad():
        started = time.perf_counter()
        images = draw(labels)  # (N, C, H, W) in [0, 1]
        seconds = time.perf_counter() - started
        if flops_key not in models.flops:
            models.flops[flops_key] = counted_flops(lambda: draw(labels[:1])) / GIGA
        forming = strip(frames())
    ran = f" ({', '.join(speed_up_words)})" if speed_up_words else ""
    figures = (f"**{name}**{ran}: {len(labels)} images in {seconds:.2f} s, {models.flops[flops_key]:.2f} GFLOPs/image "
               "(2 per multiply-add)")
    if name == "DiT":
        calls = model.objective.network_calls(dit_sampling.sampler, dit_sampling.steps, dit_sampling.cfg,
                                              dit_sampling.cfg_interval)
        figures += f", {calls} network calls/image"
    grid = image_grid(images, rows=len(class_ids))
    return labelled(grid, [model.class_names[index] for index in class_ids]) if label_rows else grid, forming, figures


def sample(models: Models, choice: str, classes: list[str] | None, per_class: int, seed: float | None,
           dit_cfg: float, var_cfg: float, sampler: str, steps: int, top_k: float | None, top_p: float,
           flow_steps: float | None, flow_sampler: str, label_rows: bool, prune: bool, refine: bool):
    """Handler of Generate: each chosen model's grid and strip, the figures, and the PNG to download (shown only once
    there is one). `prune`, `refine`: the VAR's speed-ups (`var_settings`)."""
    outputs: dict[str, tuple] = {}
    try:
        per_class = checked_whole(per_class, "samples per class", 1, MAX_PER_CLASS)
        steps = checked_whole(steps, "DiT steps", 1, MAX_STEPS)
        chosen = [name for name in ("DiT", "VAR") if choice in (name, "both")]
        images = len(classes or []) * per_class * len(chosen)
        if images > MAX_SAMPLES_PER_REQUEST:
            raise UserError(f"{images} images asked ({len(classes)} classes × {per_class} × {len(chosen)} models); a "
                            f"request draws at most {MAX_SAMPLES_PER_REQUEST}: pick fewer classes or samples per class")
        for name, cfg in (("DiT", dit_cfg), ("VAR", var_cfg)):
            if choice in (name, "both"):
                outputs[name] = run_model(models, name, classes, per_class, seed, cfg, sampler, steps, top_k, top_p,
                                          flow_steps, flow_sampler, label_rows, prune, refine)
    except (UserError, ValueError) as error:
        return None, None, None, None, WARNING + str(error), gr.update(value=None, visible=False)
    grids = [grid for grid, _, _ in outputs.values()]
    download = Path(tempfile.mkdtemp(prefix="scalegen-")) / "samples.png"
    side_by_side = Image.new(grids[0].mode, (sum(grid.width for grid in grids), max(grid.height for grid in grids)))
    for index, grid in enumerate(grids):
        side_by_side.paste(grid, (sum(previous.width for previous in grids[:index]), 0))
    side_by_side.save(download)
    dit, var = outputs.get("DiT", (None, None, "")), outputs.get("VAR", (None, None, ""))
    figures = "  \n".join(text for _, _, text in outputs.values())
    return dit[0], var[0], dit[1], var[1], figures, gr.update(value=str(download), visible=True)


def data_set_image(models: Models, class_name: str | None, seed: int) -> tuple[Image.Image | None, str]:
    """A random Fashion-MNIST test image of the chosen class, for the Edit tab."""
    try:
        test_set = FashionMNIST(split="test")
        names = models.class_names()
        index = names.index(class_name) if class_name in names else None
        candidates = torch.arange(len(test_set)) if index is None else (test_set.labels == index).nonzero()[:, 0]
        generator = torch.Generator().manual_seed(checked_seed(seed))
        chosen = int(candidates[torch.randint(len(candidates), (1,), generator=generator)])
        return Image.fromarray(test_set.images[chosen, 0].numpy()), f"data set image {chosen}"
    except (UserError, ValueError) as error:
        return None, WARNING + str(error)


def edit(models: Models, upload: dict | None, box: str, mode: str, class_name: str, seed: float | None, cfg: float,
         prune: bool, refine: bool):
    """Handler of Edit, given the raw inputs (Gradio's preprocessing skipped, see `uploaded_picture`): (input as the
    model sees it, mask, result, message). `prune`, `refine`: the VAR's speed-ups (`var_settings`)."""
    try:
        if models.var is None:
            raise UserError("no VAR is loaded: give its path under Models")
        picture = uploaded_picture(upload)
        seed = checked_seed(seed)
        tokenizer = models.var.tokenizer
        image = picture_tensor(picture, tokenizer.image_size, tokenizer.config.in_channels)  # (1, C, S, S) in [0, 1]
        class_id = None if class_name in (None, "", UNCONDITIONAL) else selected_labels(models.var, [class_name])[0]
        settings, speed_up_words = var_settings(models, prune, refine, cfg=cfg)
        with models.locks["VAR"]:
            edited, regenerated = edit_box(models.var, image, parse_box(box), mode, class_id, settings=settings,
                                           seed=seed)
    except (UserError, ValueError) as error:
        return None, None, None, WARNING + str(error)
    ran = f" ({', '.join(speed_up_words)})" if speed_up_words else ""
    return image_grid(image, 1), image_grid(regenerated, 1), image_grid(edited, 1), f"{mode}ed the box {box}{ran}"


def load(models: Models, dit_path: str, var_path: str, refiner_path: str = ""):
    """Handler of Load: the message, the new class choices, the DiT's start settings and, when a VAR path is given,
    the VAR's (`start_updates`); a path outside the page's model folders is refused."""
    try:
        paths = [str(allowed_model_path(path, models.folders)) if path.strip() else None
                 for path in (dit_path, var_path, refiner_path)]
        message = models.load(*paths)
    except (UserError, ValueError) as error:
        message = WARNING + str(error)
    names = models.class_names()
    samplers, default, steps, cfg = models.dit_settings()
    return (message, gr.update(choices=names, value=[]), gr.update(choices=[UNCONDITIONAL, *names]),
            gr.update(choices=samplers, value=default), gr.update(value=steps), gr.update(value=cfg),
            *start_updates(models.var, loaded=bool(var_path.strip())))


def shown_image(label: str, elem_id: str, height: int = SHOWN_HEIGHT) -> gr.Image:
    """An output picture of the page: enlarged pixel for pixel, not editable."""
    return gr.Image(label=label, type="pil", elem_id=elem_id, elem_classes="scalegen-pixels", height=height,
                    interactive=False)


def build_app(models: Models) -> gr.Blocks:
    """The page, wired to `models`."""
    names, var_start = models.class_names(), start_states(models.var)
    with gr.Blocks(title="scalegen", analytics_enabled=False) as app:  # nothing leaves the machine
        gr.Markdown("# scalegen — DiT and VAR in the browser")
        with gr.Accordion("Models", open=False):
            with gr.Row():
                dit_path = gr.Textbox(label="DiT path (run, export or official .pt)", elem_id="dit-path",
                                      placeholder=f"the shipped MeanFlow DiT: {SHIPPED_MEANFLOW_DIT}")
                var_path = gr.Textbox(label="VAR path (run, export or official .pth)", elem_id="var-path")
                refiner_path = gr.Textbox(label="VAR refiner path (CoDe: generates the finest scales; empty: none)",
                                          elem_id="refiner-path")
            with gr.Row():
                load_button = gr.Button("Load", elem_id="load")
                load_meanflow = gr.Button("Load the shipped one-step DiT (MeanFlow)", elem_id="load-meanflow")
            load_message = gr.Markdown(models.load(None, None), elem_id="load-message")
        with gr.Tab("Sample", elem_id="sample-tab"):
            with gr.Row():
                choice = gr.Radio(list(MODEL_CHOICES), value="both", label="model", elem_id="model-choice")
                classes = gr.Dropdown(names, value=[], multiselect=True, label="classes (pick one or more)", elem_id="classes")
            with gr.Row():
                per_class = gr.Slider(1, MAX_PER_CLASS, value=4, step=1, label="samples per class", elem_id="per-class")
                seed = gr.Number(0, precision=0, label="seed", elem_id="seed")
                label_rows = gr.Checkbox(True, label="label rows with class names", elem_id="label-rows")
            with gr.Row():
                samplers, default_sampler, default_steps, default_cfg = models.dit_settings()
                dit_cfg = gr.Slider(1.0, 8.0, value=default_cfg, step=0.5, label="DiT guidance (cfg)",
                                    elem_id="dit-cfg")
                var_cfg = gr.Slider(1.0, 8.0, step=0.5, label="VAR guidance (cfg)", elem_id="var-cfg",
                                    **var_start["cfg"])
            with gr.Row():
                sampler = gr.Radio(samplers, value=default_sampler, label="DiT sampler", elem_id="sampler")
                steps = gr.Slider(1, MAX_STEPS, value=default_steps, step=1, label="DiT steps", elem_id="steps")
                top_k, top_p, flow_steps, flow_sampler = head_widgets(models.var)
            with gr.Row():
                var_prune = gr.Checkbox(False, label=PRUNE_LABEL, elem_id="var-prune")
                var_refine = gr.Checkbox(False, label=REFINE_LABEL, elem_id="var-refine")
            generate = gr.Button("Generate", variant="primary", elem_id="generate")
            figures = gr.Markdown(elem_id="sample-info")
            with gr.Row():
                dit_grid = shown_image("DiT", "dit-grid")
                var_grid = shown_image("VAR", "var-grid")
            with gr.Row():
                dit_strip = shown_image("DiT: predicted x̂₀ along the steps", "dit-strip", STRIP_HEIGHT)
                var_strip = shown_image("VAR: after each scale", "var-strip", STRIP_HEIGHT)
            download = gr.File(label="download (PNG)", elem_id="download", visible=False)  # shown with a file
        with gr.Tab("Edit", elem_id="edit-tab"):
            with gr.Row():
                picture = gr.Image(label="image", type="pil", sources=["upload", "clipboard"], elem_id="edit-input",
                                   elem_classes="scalegen-pixels", height=SHOWN_HEIGHT)
                with gr.Column():
                    take_class = gr.Dropdown([UNCONDITIONAL, *names], value=UNCONDITIONAL,
                                             label="take one of the data set's, of class", elem_id="take-class")
                    take = gr.Button("Take a data set image", elem_id="take")
                    box = gr.Textbox(DEFAULT_BOX, label="box x0,y0,x1,y1 (pixels of the model's image size)",
                                     elem_id="box")
                    mode = gr.Radio(["inpaint", "outpaint"], value="inpaint", label="mode", elem_id="mode")
                    edit_class = gr.Dropdown([UNCONDITIONAL, *names], value=UNCONDITIONAL, label="as class",
                                             elem_id="edit-class")
                    edit_seed = gr.Number(0, precision=0, label="seed", elem_id="edit-seed")
                    edit_cfg = gr.Slider(0.0, 8.0, step=0.5, label="guidance (cfg)", elem_id="edit-cfg",
                                         **var_start["cfg"])
                    edit_prune = gr.Checkbox(False, label=PRUNE_LABEL, elem_id="edit-prune")
                    edit_refine = gr.Checkbox(False, label=REFINE_LABEL, elem_id="edit-refine")
                    edit_button = gr.Button("Edit", variant="primary", elem_id="edit")
            edit_message = gr.Markdown(elem_id="edit-info")
            with gr.Row():
                shown_input = shown_image("input", "edit-shown")
                shown_mask = shown_image("mask (white: regenerated)", "edit-mask")
                shown_result = shown_image("result", "edit-result")
        loaded = [load_message, classes, edit_class, sampler, steps, dit_cfg, var_cfg, top_k, top_p, flow_steps,
                  flow_sampler, edit_cfg]  # `load`'s outputs
        load_button.click(lambda *paths: load(models, *paths), [dit_path, var_path, refiner_path], loaded)
        load_meanflow.click(lambda: load(models, str(SHIPPED_MEANFLOW_DIT), ""), [], loaded)
        generate.click(lambda *values: sample(models, *values),
                       [choice, classes, per_class, seed, dit_cfg, var_cfg, sampler, steps, top_k, top_p, flow_steps,
                        flow_sampler, label_rows, var_prune, var_refine],
                       [dit_grid, var_grid, dit_strip, var_strip, figures, download])
        take.click(lambda name, number: data_set_image(models, name, number), [take_class, edit_seed],
                   [picture, edit_message])
        edit_button.click(lambda *values: edit(models, *values),
                          [picture, box, mode, edit_class, edit_seed, edit_cfg, edit_prune, edit_refine],
                          [shown_input, shown_mask, shown_result, edit_message], preprocess=False)
    app.queue(default_concurrency_limit=1)  # one model call at a time
    return app


def serve(dit: str | None, var: str | None, host: str = "127.0.0.1", port: int = 7860, block: bool = True,
          refiner: str | None = None, auth: list[tuple[str, str]] | None = None,
          models_dirs: list[str] | None = None) -> gr.Blocks:
    """Load the models and serve the page on host:port (blocking unless `block` is False; then the app is returned).

    Args:
        dit, var: the models to start with (None: none).
        host, port: where to listen; a host other than a loopback address without `auth` prints a warning.
        block: serve until interrupted.
        refiner: a VAR to generate the VAR's finest scales (CoDe).
        auth: (user, password) pairs Gradio's login page accepts; None: no login.
        models_dirs: the folders the page may load models from; None: `model_folders` of the models given.
    """
    models = Models(folders=named_folders(models_dirs) if models_dirs else model_folders([dit, var, refiner]))
    print(models.load(dit, var, refiner))
    app = build_app(models)
    warning = exposure_warning(host, auth)
    if warning is not None:
        print(warning, file=sys.stderr)
    print(f"serving on http://{host}:{port} (Ctrl-C stops)")
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, ssr_mode=False, quiet=True,
               css=PIXEL_CSS, auth=auth or None)
    return app
