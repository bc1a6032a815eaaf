"""The web page (`scalegen serve`): sample and edit with a DiT and a VAR in the browser, built with Gradio.

Two tabs. **Sample**: DiT, VAR or both side by side; classes by name, samples per class, seed, guidance; the DiT's
sampler and steps, the VAR's top-k and top-p; the grid, the time taken and the FLOPs per image, a PNG to download,
and a strip that shows a sample forming (VAR: after each scale; DiT: the predicted clean image along the steps).
**Edit** (VAR): an uploaded image or one of the data set's, a typed box, in- or out-painting, optionally as another
class; input, mask and result. Bad input is a message in the page; one request runs at a time.
"""
from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import torch
from PIL import Image

from scalegen.data import FashionMNIST
from scalegen.errors import UserError
from scalegen.eval.flops import GIGA, counted_flops
from scalegen.images import grid_labels, image_grid, picture_tensor
from scalegen.diffusion.sampling import FAST_SAMPLERS, OBJECTIVE_SAMPLERS
from scalegen.models.dit import DiT
from scalegen.models.var import VAR
from scalegen.models.var_edit import edit_box, parse_box
from scalegen.pretrained import SHIPPED_DIT_CFG, SHIPPED_DIT_STEPS, load_dit, load_var

MODEL_CHOICES = ("DiT", "VAR", "both")
MAX_PER_CLASS, STRIP_FRAMES = 10, 8
DEFAULT_BOX = "8,8,24,24"
UNCONDITIONAL = "(unconditional)"
WARNING = "⚠️ "
# Small images (32 px) are shown enlarged, pixel for pixel.
PIXEL_CSS = ".scalegen-pixels img {image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain}"
SHOWN_HEIGHT, STRIP_HEIGHT = 200, 90


@dataclass
class Models:
    """The loaded models, each with a lock so that one call at a time runs on it."""

    dit: DiT | None = None
    var: VAR | None = None
    locks: dict[str, threading.Lock] = field(default_factory=lambda: {"DiT": threading.Lock(), "VAR": threading.Lock()})
    flops: dict[tuple, float] = field(default_factory=dict)  # GFLOPs per image, by model and settings

    def load(self, dit_path: str | None, var_path: str | None) -> str:
        """(Re)load the models named (a blank path keeps the loaded one); returns what is loaded, in words."""
        if dit_path:
            self.dit = load_dit(dit_path)
        if var_path:
            self.var = load_var(var_path)
        loaded = [f"{name}: {len(model.class_names)} classes" for name, model in (("DiT", self.dit), ("VAR", self.var))
                  if model is not None]
        return "loaded " + "; ".join(loaded) if loaded else "no model loaded"

    def dit_samplers(self) -> tuple[list[str], str]:
        """The samplers the loaded DiT's objective offers, and the page's default among them."""
        objective = self.dit.objective if self.dit is not None else "ddpm"
        return list(OBJECTIVE_SAMPLERS[objective]), FAST_SAMPLERS[objective]

    def class_names(self) -> list[str]:
        """The class names of the loaded models (the VAR's when both are loaded and they differ)."""
        model = self.var or self.dit
        return list(model.class_names) if model is not None else []


def selected_labels(model: DiT | VAR, classes: list[str] | None) -> list[int]:
    """Class ids of the names picked; a one-line error for none or an unknown one."""
    if not classes:
        raise UserError("pick at least one class")
    unknown = [name for name in classes if name not in model.class_names]
    if unknown:
        raise UserError(f"unknown class {unknown[0]!r} for this model")
    return [model.class_names.index(name) for name in classes]


def strip(frames: list[torch.Tensor]) -> Image.Image:
    """The first sample of each frame, side by side."""
    return image_grid(torch.stack([frame[0] for frame in frames]), rows=1)


def run_model(models: Models, name: str, classes: list[str] | None, per_class: int, seed: int, cfg: float,
              sampler: str, steps: int, top_k: int, top_p: float) -> tuple[Image.Image, Image.Image, str]:
    """Sample one model: (grid, strip of a sample forming, a line of figures)."""
    model = models.dit if name == "DiT" else models.var
    if model is None:
        raise UserError(f"no {name} is loaded: give its path under Models")
    labels = grid_labels(selected_labels(model, classes), int(per_class))
    if name == "DiT":
        def draw(batch: torch.Tensor) -> torch.Tensor:
            return model.generate(batch, cfg=cfg, steps=int(steps), sampler=sampler, seed=int(seed))
        frames = lambda: model.generate_frames(labels[:1], cfg=cfg, steps=int(steps), sampler=sampler,  # noqa: E731
                                               seed=int(seed), frames=STRIP_FRAMES)
        settings = (name, cfg, int(steps), sampler)
    else:
        def draw(batch: torch.Tensor) -> torch.Tensor:
            return model.generate(batch, cfg=cfg, top_k=int(top_k), top_p=top_p, seed=int(seed))
        frames = lambda: model.generate_frames(labels[:1], cfg=cfg, top_k=int(top_k), top_p=top_p,  # noqa: E731
                                               seed=int(seed))
        settings = (name, cfg, int(top_k), top_p)
    with models.locks[name], torch.no_grad():
        started = time.perf_counter()
        images = draw(labels)  # (N, C, H, W) in [0, 1]
        seconds = time.perf_counter() - started
        if settings not in models.flops:
            models.flops[settings] = counted_flops(lambda: draw(labels[:1])) / GIGA
        forming = strip(frames())
    figures = (f"**{name}**: {len(labels)} images in {seconds:.2f} s, {models.flops[settings]:.2f} GFLOPs/image")
    return image_grid(images, rows=len(set(labels.tolist()))), forming, figures


def sample(models: Models, choice: str, classes: list[str] | None, per_class: int, seed: int, cfg: float,
           sampler: str, steps: int, top_k: int, top_p: float):
    """Handler of Generate: each chosen model's grid and strip, the figures, and the PNG to download."""
    outputs: dict[str, tuple] = {}
    try:
        for name in ("DiT", "VAR"):
            if choice in (name, "both"):
                outputs[name] = run_model(models, name, classes, per_class, seed, cfg, sampler, steps, top_k, top_p)
    except (UserError, ValueError) as error:
        return None, None, None, None, WARNING + str(error), None
    grids = [grid for grid, _, _ in outputs.values()]
    download = Path(tempfile.mkdtemp(prefix="scalegen-")) / "samples.png"
    side_by_side = Image.new(grids[0].mode, (sum(grid.width for grid in grids), max(grid.height for grid in grids)))
    for index, grid in enumerate(grids):
        side_by_side.paste(grid, (sum(previous.width for previous in grids[:index]), 0))
    side_by_side.save(download)
    dit, var = outputs.get("DiT", (None, None, "")), outputs.get("VAR", (None, None, ""))
    figures = "  \n".join(text for _, _, text in outputs.values())
    return dit[0], var[0], dit[1], var[1], figures, str(download)


def data_set_image(models: Models, class_name: str | None, seed: int) -> tuple[Image.Image | None, str]:
    """A random Fashion-MNIST test image of the chosen class, for the Edit tab."""
    try:
        test_set = FashionMNIST(split="test")
        names = models.class_names()
        index = names.index(class_name) if class_name in names else None
        candidates = torch.arange(len(test_set)) if index is None else (test_set.labels == index).nonzero()[:, 0]
        chosen = int(candidates[torch.randint(len(candidates), (1,), generator=torch.Generator().manual_seed(int(seed)))])
        return Image.fromarray(test_set.images[chosen, 0].numpy()), f"data set image {chosen}"
    except (UserError, ValueError) as error:
        return None, WARNING + str(error)


def edit(models: Models, picture: Image.Image | None, box: str, mode: str, class_name: str, seed: int, cfg: float):
    """Handler of Edit: (input as the model sees it, mask, result, message)."""
    try:
        if models.var is None:
            raise UserError("no VAR is loaded: give its path under Models")
        if picture is None:
            raise UserError("no image: upload one or take one of the data set")
        tokenizer = models.var.tokenizer
        image = picture_tensor(picture, tokenizer.image_size, tokenizer.config.in_channels)  # (1, C, S, S) in [0, 1]
        class_id = None if class_name in (None, "", UNCONDITIONAL) else selected_labels(models.var, [class_name])[0]
        with models.locks["VAR"]:
            edited, regenerated = edit_box(models.var, image, parse_box(box), mode, class_id, cfg=cfg, seed=int(seed))
    except (UserError, ValueError) as error:
        return None, None, None, WARNING + str(error)
    return image_grid(image, 1), image_grid(regenerated, 1), image_grid(edited, 1), f"{mode}ed the box {box}"


def load(models: Models, dit_path: str, var_path: str):
    """Handler of Load: the message and the new class choices."""
    try:
        message = models.load(dit_path.strip() or None, var_path.strip() or None)
    except (UserError, ValueError) as error:
        message = WARNING + str(error)
    names = models.class_names()
    samplers, default = models.dit_samplers()
    return (message, gr.update(choices=names, value=[]), gr.update(choices=[UNCONDITIONAL, *names]),
            gr.update(choices=samplers, value=default))


def shown_image(label: str, elem_id: str, height: int = SHOWN_HEIGHT) -> gr.Image:
    """An output picture of the page: enlarged pixel for pixel, not editable."""
    return gr.Image(label=label, type="pil", elem_id=elem_id, elem_classes="scalegen-pixels", height=height,
                    interactive=False)


def build_app(models: Models) -> gr.Blocks:
    """The page, wired to `models`."""
    names = models.class_names()
    with gr.Blocks(title="scalegen", analytics_enabled=False) as app:  # nothing leaves the machine
        gr.Markdown("# scalegen — DiT and VAR in the browser")
        with gr.Accordion("Models", open=False):
            with gr.Row():
                dit_path = gr.Textbox(label="DiT path (run, export or official .pt)", elem_id="dit-path")
                var_path = gr.Textbox(label="VAR path (run, export or official .pth)", elem_id="var-path")
            load_button = gr.Button("Load", elem_id="load")
            load_message = gr.Markdown(models.load(None, None), elem_id="load-message")
        with gr.Tab("Sample", elem_id="sample-tab"):
            with gr.Row():
                choice = gr.Radio(list(MODEL_CHOICES), value="both", label="model", elem_id="model-choice")
                classes = gr.Dropdown(names, value=[], multiselect=True, label="classes (pick one or more)", elem_id="classes")
            with gr.Row():
                per_class = gr.Slider(1, MAX_PER_CLASS, value=4, step=1, label="samples per class", elem_id="per-class")
                seed = gr.Number(0, precision=0, label="seed", elem_id="seed")
                cfg = gr.Slider(1.0, 8.0, value=SHIPPED_DIT_CFG, step=0.5, label="guidance (cfg)", elem_id="cfg")
            with gr.Row():
                samplers, default_sampler = models.dit_samplers()
                sampler = gr.Radio(samplers, value=default_sampler, label="DiT sampler", elem_id="sampler")
                steps = gr.Slider(2, 250, value=SHIPPED_DIT_STEPS, step=1, label="DiT steps", elem_id="steps")
                top_k = gr.Number(0, precision=0, minimum=0, label="VAR top-k (0: all)", elem_id="top-k")
                top_p = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="VAR top-p (0: off)", elem_id="top-p")
            generate = gr.Button("Generate", variant="primary", elem_id="generate")
            figures = gr.Markdown(elem_id="sample-info")
            with gr.Row():
                dit_grid = shown_image("DiT", "dit-grid")
                var_grid = shown_image("VAR", "var-grid")
            with gr.Row():
                dit_strip = shown_image("DiT: predicted x̂₀ along the steps", "dit-strip", STRIP_HEIGHT)
                var_strip = shown_image("VAR: after each scale", "var-strip", STRIP_HEIGHT)
            download = gr.File(label="download (PNG)", elem_id="download")
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
                    edit_cfg = gr.Slider(0.0, 8.0, value=1.5, step=0.5, label="guidance (cfg)", elem_id="edit-cfg")
                    edit_button = gr.Button("Edit", variant="primary", elem_id="edit")
            edit_message = gr.Markdown(elem_id="edit-info")
            with gr.Row():
                shown_input = shown_image("input", "edit-shown")
                shown_mask = shown_image("mask (white: regenerated)", "edit-mask")
                shown_result = shown_image("result", "edit-result")
        load_button.click(lambda *paths: load(models, *paths), [dit_path, var_path],
                          [load_message, classes, edit_class, sampler])
        generate.click(lambda *values: sample(models, *values),
                       [choice, classes, per_class, seed, cfg, sampler, steps, top_k, top_p],
                       [dit_grid, var_grid, dit_strip, var_strip, figures, download])
        take.click(lambda name, number: data_set_image(models, name, number), [take_class, edit_seed],
                   [picture, edit_message])
        edit_button.click(lambda *values: edit(models, *values), [picture, box, mode, edit_class, edit_seed, edit_cfg],
                          [shown_input, shown_mask, shown_result, edit_message])
    app.queue(default_concurrency_limit=1)  # one model call at a time
    return app


def serve(dit: str | None, var: str | None, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> gr.Blocks:
    """Load the models and serve the page on host:port (blocking unless `block` is False; then the app is returned)."""
    models = Models()
    print(models.load(dit, var))
    app = build_app(models)
    print(f"serving on http://{host}:{port} (Ctrl-C stops)")
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, ssr_mode=False, quiet=True,
               css=PIXEL_CSS)
    return app
