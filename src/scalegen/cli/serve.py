"""`scalegen serve`: the web page (Gradio) with the shipped models, or the DiT and VAR given; optionally behind a login,
loading models from the folders named only."""
from __future__ import annotations

import argparse
from pathlib import Path

from scalegen.cli.parsing import at_least
from scalegen.errors import UserError
from scalegen.runs.names import SHIPPED_DIT, SHIPPED_MEANFLOW_DIT, SHIPPED_VAR, SHIPPED_VAR_REFINER, checkpoint_path

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860
PORT = at_least(1)


def credentials(line: str, source: str) -> tuple[str, str]:
    """(user, password) from "USER:PASSWORD" (the password may hold ':'); a one-line error, which never shows the
    password, naming `source` for anything else."""
    user, separator, password = line.partition(":")
    if not separator or not user.strip() or not password:
        raise UserError(f"{source} is not USER:PASSWORD (both non-empty): give the login as user:password")
    return user.strip(), password


def read_logins(auth: str | None, auth_file: str | None) -> list[tuple[str, str]] | None:
    """The logins of --auth and of --auth-file's lines (one user:password a line, blank lines skipped); None for no
    login."""
    logins = [credentials(auth, "--auth")] if auth is not None else []
    if auth_file is not None:
        try:
            lines = Path(auth_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"cannot read --auth-file {auth_file} ({error}): give a text file of user:password lines"
                            ) from None
        logins += [credentials(line, f"line {number} of {auth_file}") for number, line in enumerate(lines, 1)
                   if line.strip()]
        if not logins:
            raise UserError(f"--auth-file {auth_file} holds no login: write one user:password a line")
    return logins or None


def run_serve(args: argparse.Namespace) -> None:
    """Handler of `scalegen serve`: serves until interrupted."""
    try:
        from scalegen.web.app import serve  # Gradio is an optional extra: imported only to serve
    except ImportError as error:
        raise UserError(f"the web page needs Gradio ({error}): pip install 'scalegen[web]'") from None
    refiner = args.refiner
    if refiner is None and checkpoint_path(args.var).resolve() == SHIPPED_VAR.resolve():  # a path or shipped:var
        refiner = str(SHIPPED_VAR_REFINER)  # made for the shipped VAR only
    serve(args.dit, args.var, args.host, args.port, refiner=refiner, auth=read_logins(args.auth, args.auth_file),
          models_dirs=args.models_dir)


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
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (other than a loopback one, give --auth or --auth-file)")
    parser.add_argument("--auth", metavar="USER:PASSWORD",
                        help="the page asks for this login (Gradio's login page); --auth-file keeps the password out "
                             "of the shell history and the process list")
    parser.add_argument("--auth-file", metavar="FILE", help="the page asks for a login: one user:password a line")
    parser.add_argument("--models-dir", action="append", metavar="DIR",
                        help="a folder the page may load models from, repeatable; any other path is refused (default: "
                             "the shipped models' folder and the folders of --dit, --var and --refiner)")
    parser.add_argument("--port", type=PORT, default=DEFAULT_PORT, help="port")
    parser.set_defaults(handler=run_serve)
