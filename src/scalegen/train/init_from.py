"""Fine-tuning: start a run from the weights of an official checkpoint, a scalegen run or an export (`--init-from`).

Every tensor must fit the new model, except the class embedding when the number of classes differs (ImageNet-1k →
a 5-class folder): its rows are drawn fresh, the null-class row (the unconditional embedding guidance uses) is kept.
Tensors the new model's objective adds (a MeanFlow DiT's interval embedding, fine-tuned from a flow DiT) start at
their initialisation.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from scalegen.errors import UserError
from scalegen.runs.folder import RunFolder
from scalegen.runs.weights import load_weights, stored_config

# The class embeddings of the two class-conditional transformers (the last row is the null class).
CLASS_EMBEDDINGS = ("y_embedder.embedding_table.weight", "class_emb.weight")


def fine_tuning_origin(model: nn.Module, path: str | Path, run_dir: str | Path) -> dict:
    """The weights of `path` in `model` when the run starts afresh; a run that resumes keeps its own weights and the
    origin its config recorded. Returns the origin to store in the run's config."""
    run = RunFolder(run_dir)
    if not run.last_pointer.exists() and not run.step_folders():
        return initialize_from(model, path)
    return stored_config(run.root).get("init_from") or {"path": str(Path(path).resolve()), "reinitialized": []}


@torch.no_grad()
def initialize_from(model: nn.Module, path: str | Path) -> dict:
    """Load the weights at `path` into `model` (in place), re-initialising only a class embedding of another size.

    Args:
        model: the freshly built model of the run.
        path: an official .pt/.pth, a scalegen run or checkpoint folder, or an export (EMA weights when there are).
    Returns:
        The origin to store in the run's config: {"path", "reinitialized": [tensor names]}.
    Raises:
        UserError: a tensor of another shape (other than a class embedding), or one missing from the file.
    """
    _, weights = load_weights(path)
    own = model.state_dict()
    additions = getattr(model, "OBJECTIVE_ADDITIONS", ())
    fresh = [name for name in own if name not in weights and name.startswith(additions)]
    weights.update({name: own[name] for name in fresh})  # an objective's own tensors start at their initialisation
    missing = [name for name in own if name not in weights]
    if missing:
        raise UserError(f"{path} has no tensor {missing[0]!r} (and {len(missing) - 1} more) that this model needs; "
                        "fine-tune from a checkpoint of the same kind of model")
    reinitialized = []
    for name, tensor in own.items():
        source = weights[name]
        if source.shape == tensor.shape:
            continue
        if name in CLASS_EMBEDDINGS and source.shape[1:] == tensor.shape[1:]:
            weights[name] = torch.cat([tensor[:-1], source[-1:].to(tensor.dtype)])  # fresh rows, the source's null row
            reinitialized.append(name)
            continue
        raise UserError(f"tensor {name!r} is {tuple(source.shape)} in {path} but {tuple(tensor.shape)} in this model; "
                        "give the options (size, patch, channels) of the checkpoint you fine-tune from")
    model.load_state_dict({name: weights[name] for name in own}, strict=True)
    if fresh:
        print(f"init-from {path}: {len(fresh)} tensors of this objective start at their initialisation "
              f"({', '.join(sorted({name.split('.')[0] for name in fresh}))})")
    if reinitialized:
        print(f"init-from {path}: another number of classes, so {', '.join(reinitialized)} starts afresh "
              "(the null-class row is kept)")
    return {"path": str(Path(path).resolve()), "reinitialized": reinitialized}
