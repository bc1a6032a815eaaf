"""The names a checkpoint is taken by, free of torch so that the command line's parsers show them without loading
the checkpoint code: the shipped models (`shipped:NAME`) and their folders, and the kinds of weights to load."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from scalegen.errors import UserError

ASSETS = Path(__file__).parent.parent / "assets"  # weights shipped inside the package
# The shipped Fashion-MNIST models (see their RECIPE.md): `shipped:NAME` names one wherever a checkpoint is taken.
SHIPPED = ASSETS / "fashion_mnist"
SHIPPED_PREFIX = "shipped:"
SHIPPED_CHECKPOINTS = {"dit": "dit", "dit-meanflow": "dit_meanflow", "var": "var", "var-refiner": "var_refiner"}
# Which weights to load: a run's EMA (ema.safetensors) or raw (model.safetensors) weights; an export holds one kind.
WeightChoice = Literal["ema", "raw"]
WEIGHT_CHOICES: tuple[str, ...] = get_args(WeightChoice)
PIXEL_SPACE = "none"  # as a DiT's `vae`: the model works on pixels, decode nothing


def checkpoint_path(path: str | Path) -> Path:
    """`path`, or the folder of the shipped model that `shipped:NAME` names (a one-line error lists the names)."""
    text = str(path)
    if not text.startswith(SHIPPED_PREFIX):
        return Path(path)
    name = text.removeprefix(SHIPPED_PREFIX)
    if name not in SHIPPED_CHECKPOINTS:
        raise UserError(f"no shipped model is called {text!r}; the shipped ones are {shipped_names()}")
    return SHIPPED / SHIPPED_CHECKPOINTS[name]


def shipped_names() -> str:
    """The `shipped:` names, as help texts and errors list them."""
    return ", ".join(SHIPPED_PREFIX + name for name in SHIPPED_CHECKPOINTS)


# The demo's Fashion-MNIST models (see their RECIPE.md; each config.json holds its sampling settings): the DiT (flow
# matching), the one-step DiT (MeanFlow), the VAR, and a depth-2 VAR on the shipped VAR's tokenizer, the refiner of
# its two finest scales (CoDe: `generate(..., refiner=...)`). On the command line: shipped:dit, shipped:var, ….
SHIPPED_DIT, SHIPPED_MEANFLOW_DIT = checkpoint_path("shipped:dit"), checkpoint_path("shipped:dit-meanflow")
SHIPPED_VAR, SHIPPED_VAR_REFINER = checkpoint_path("shipped:var"), checkpoint_path("shipped:var-refiner")
