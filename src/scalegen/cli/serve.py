"""`scalegen serve`: the web page (Gradio) with the shipped models, or the DiT and VAR given."""
from __future__ import annotations

import argparse
from pathlib import Path

from scalegen.cli.parsing import at_least
from scalegen.errors import UserError
from scalegen.pretrained import SHIPPED_DIT, SHIPPED_MEANFLOW_DIT, SHIPPED_VAR, SHIPPED_VAR_REFINER

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860
PORT = at_least(1)


def run_serve(args: argparse.Namespace) -> None:
    """Handler of `scalegen serve`: serves until interrupted."""
    try:
        from scalegen.web.app import serve  # Gradio is an optional extra: imported only to serve
    except ImportError as error:
        raise UserError(f"the web page needs Gradio ({error}): pip install 'scalegen[web]'") from None
    refiner = args.refiner
    if refiner is None and Path(args.var).resolve() == SHIPPED_VAR.resolve():
        refiner = str(SHIPPED_VAR_REFINER)  # made for the shipped VAR only
    serve(args.dit, args.var, args.host, args.port, refiner=refiner)


def register(commands) -> None:
    """Add `scalegen serve` to the command line."""
    parser = commands.add_parser("serve", help="a web page to sample and edit with a DiT and a VAR (Gradio)")
    parser.add_argument("--dit", default=str(SHIPPED_DIT),
                        help=f"DiT run, export or official .pt (default: the shipped one; the shipped MeanFlow DiT: "
                             f"{SHIPPED_MEANFLOW_DIT})")
    parser.add_argument("--var", default=str(SHIPPED_VAR), help="VAR run, export or official .pth (default: the shipped one)")
    parser.add_argument("--refiner", default=None,
                        help="a VAR on the --var's tokenizer for collaborative decoding (CoDe): it generates the finest "
                             "scales when the page's refiner box is checked (default: the shipped refiner with the "
                             "shipped VAR, else none; an empty string for none)")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on")
    parser.add_argument("--port", type=PORT, default=DEFAULT_PORT, help="port")
    parser.set_defaults(handler=run_serve)
