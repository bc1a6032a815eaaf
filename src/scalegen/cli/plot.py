"""`scalegen plot`: training curves of any runs, from their log.csv files."""
from __future__ import annotations

import argparse
from typing import get_args

from scalegen.train.curve_axes import STEP, PanelBy, XAxis


def run_plot(args: argparse.Namespace) -> None:
    """Handler of `scalegen plot`."""
    from scalegen.train.curves import plot_curves  # torch: only once the command runs

    metrics = [name.strip() for name in args.metric.split(",") if name.strip()]
    out = plot_curves(args.runs, args.out, metrics, x=args.x, by=args.by, log_scale=args.log_y)
    print(f"wrote {out}")


def register(commands) -> None:
    """Add `scalegen plot` to the command line."""
    parser = commands.add_parser("plot", help="training curves of runs (their log.csv) in one image",
                                 description="Draw figures logged by training runs (RUN/log.csv), one line per run "
                                             "(legend: the run folder's name), one panel per figure.")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by `scalegen train`")
    parser.add_argument("--out", required=True, help="image to write, e.g. curves.png")
    parser.add_argument("--metric", default="loss",
                        help="log.csv columns to draw, comma-separated (e.g. loss,mse,lr); an unknown one is "
                             "answered with the list the runs log")
    parser.add_argument("--x", choices=get_args(XAxis), default=STEP,
                        help="x axis: the step, or the images seen (step × the run's batch size)")
    parser.add_argument("--by", choices=get_args(PanelBy), default=get_args(PanelBy)[0],
                        help="metric: a panel per figure, a line per run; run: a panel per run, a line per figure")
    parser.add_argument("--log-y", action="store_true", help="logarithmic y axis")
    parser.set_defaults(handler=run_plot)
