"""The VAR's sampling widgets of the page: its guidance (Sample and Edit tabs), then its head's own settings on the
Sample tab — top-k and top-p for a categorical VAR, flow steps and the ODE sampler for a flow VAR (`--token-head
flow`, `models/flow_head.py`), the other head's widgets hidden. Each starts at the loaded VAR's recommended setting
(`VARSampling.recommended`, where `sample var` starts), again when a VAR is loaded under Models, and a request's values
reach the VAR only where its head samples with them, checked (`head_settings`)."""
from __future__ import annotations

from typing import Any

import gradio as gr

from scalegen.models.sampling_settings import FLOW_METHODS, VARSampling
from scalegen.models.var import VAR
from scalegen.web.fields import checked_whole

MAX_FLOW_STEPS = 100  # a flow head's ODE steps per scale a request may ask for
HEAD_WIDGETS = ("top_k", "top_p", "flow_steps", "flow_sampler")  # in `head_widgets`' order


def samples_flow(var: VAR | None) -> bool:
    """Whether `var` has the flow head (continuous tokens)."""
    return var is not None and var.token_head.continuous_tokens


def start_states(var: VAR | None) -> dict[str, dict[str, Any]]:
    """Each VAR widget's start ("cfg" and HEAD_WIDGETS): its value, the loaded VAR's recommended setting (none loaded:
    the official code's), and for a head's own setting whether it is shown (the loaded VAR's head's are)."""
    start, flow = VARSampling.recommended(var.sampling if var is not None else {}), samples_flow(var)
    shown = {name: flow == name.startswith("flow_") for name in HEAD_WIDGETS}  # a flow VAR's: flow_steps, flow_sampler
    return {"cfg": {"value": start.cfg},
            **{name: {"value": getattr(start, name), "visible": shown[name]} for name in HEAD_WIDGETS}}


def head_widgets(var: VAR | None) -> list[gr.components.Component]:
    """The widgets of the heads' own settings (HEAD_WIDGETS), in the Gradio row being laid out, at `var`'s start."""
    start = start_states(var)
    return [gr.Number(precision=0, label="VAR top-k (0: all)", elem_id="top-k", **start["top_k"]),
            gr.Slider(0.0, 1.0, step=0.01, label="VAR top-p (0: off)", elem_id="top-p", **start["top_p"]),
            gr.Slider(1, MAX_FLOW_STEPS, step=1, label="VAR flow steps (per scale)", elem_id="flow-steps",
                      **start["flow_steps"]),
            gr.Radio(list(FLOW_METHODS), label="VAR flow sampler", elem_id="flow-sampler", **start["flow_sampler"])]


def start_updates(var: VAR | None, loaded: bool = True) -> list[dict[str, Any]]:
    """What loading `var` does to its widgets: the Sample tab's guidance, the head's widgets (`head_widgets`' order)
    and the Edit tab's guidance, each set to `var`'s start (`start_states`); `loaded` False (the request loaded no
    VAR): each left as it is."""
    start = start_states(var)
    return [gr.update(**start[name]) if loaded else gr.update() for name in ("cfg", *HEAD_WIDGETS, "cfg")]


def checked_top_k(top_k: float | None, vocab_size: int) -> int:
    """The VAR's top-k field as an int, from 0 (all tokens) to the VAR's vocabulary size."""
    return checked_whole(top_k, "VAR top-k", 0, vocab_size, " (all tokens)", " (this VAR's vocabulary)")


def head_settings(var: VAR, top_k: float | None, top_p: float, flow_steps: float | None,
                  flow_sampler: str) -> dict[str, Any]:
    """The `VARSampling` fields the Sample tab's head widgets give `var`: a categorical VAR's top-k and top-p, a flow
    VAR's flow steps and sampler (the other head's values, hidden, are not its); a one-line error for a top-k or flow
    steps out of range (a flow sampler that is none is the model's to refuse)."""
    if samples_flow(var):
        return {"flow_steps": checked_whole(flow_steps, "VAR flow steps", 1, MAX_FLOW_STEPS),
                "flow_sampler": flow_sampler}
    return {"top_k": checked_top_k(top_k, var.config.vocab_size), "top_p": top_p}
