"""`scalegen eval`, `scalegen flops` and `scalegen scaling`."""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from scalegen.cli.parsing import NON_NEGATIVE_FLOAT, POSITIVE, module_docstring
from scalegen.errors import UserError
from scalegen.eval.settings import DEFAULT_BATCH_SIZE, FEATURE_NETWORKS
from scalegen.models.sampling_settings import FLOW_METHODS

EVAL_DESCRIPTION = """FID, sFID, IS, precision and recall as the ADM evaluator, for a sample batch against a reference
batch; each may be an ADM .npz (arr_0 uint8 NHWC, optional mu/sigma/mu_s/sigma_s) or an image folder. Stored
reference statistics take precedence over ones computed from arr_0, as in ADM. With --features fmnist: FID in the
shipped Fashion-MNIST classifier's features (against the real test set unless --ref is given) and, when the samples
carry labels of Fashion-MNIST's classes, how often the classifier sees the asked class (samples of a model with
other classes get an "accuracy_note" instead)."""


def run_eval(args: argparse.Namespace) -> None:
    """Handler of `scalegen eval`: prints the protocol in one line and each warning (progress too) on stderr, the
    metrics as JSON on stdout (the protocol among them)."""
    from scalegen.eval.evaluate import Evaluation  # torch: only once it runs
    from scalegen.eval.metrics import FrechetDisagreement

    if args.features == "fmnist":
        if args.samples is None or args.save_ref is not None:
            raise UserError("--features fmnist needs --samples and stores no reference (no --save-ref)")
    else:
        if args.samples is None and args.save_ref is None:
            raise UserError("give --samples to evaluate, or --save-ref OUT.npz to store reference statistics")
        if args.ref is None:
            raise UserError("give --ref: an ADM reference batch, an image folder, or a --save-ref file")
    evaluation = Evaluation(args.samples, args.ref, args.features)
    protocol = evaluation.protocol() if args.samples is not None else None
    if protocol is not None:
        print(f"protocol: {protocol}", file=sys.stderr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FrechetDisagreement)
        if args.features == "fmnist":
            result = evaluation.fmnist_scores()
        else:
            result = evaluation.inception_scores(args.inception_weights, args.batch_size, args.save_ref,
                                                 args.save_ref_images)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    if protocol is not None:
        result["protocol"] = protocol
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


def run_flops(args: argparse.Namespace) -> None:
    """Handler of `scalegen flops`: prints the DiT Gflops table (multiply-accumulates) and per-image sampling costs,
    or with --var that VAR's sampling cost per image."""
    from scalegen.eval.flops import flops_table, var_sampling_report  # torch: only once the command runs
    from scalegen.runs.loading import load_var

    if args.var is None:
        if any(value is not None for value in (args.cfg, args.flow_steps, args.flow_sampler)):
            raise UserError("--cfg, --flow-steps and --flow-sampler set a VAR's sampling: give it with --var")
        print(flops_table(args.image_size))
        return
    print(var_sampling_report(load_var(args.var), args.var, args.cfg, args.flow_steps, args.flow_sampler))


def run_scaling(args: argparse.Namespace) -> None:
    """Handler of `scalegen scaling`: fits L = (a·X)^b and prints the fit as JSON."""
    from scalegen.eval import scaling  # torch: only once the command runs

    if (args.table is None) == (args.runs is None):
        raise UserError("give either --table runs.csv or --runs RUN_FOLDER [RUN_FOLDER ...]")
    if args.table is not None:
        names, x, y = scaling.read_table(args.table, args.x, args.y)
    else:
        names, x, y = scaling.read_runs(args.runs, args.x, args.y)
    report = scaling.scaling_report(names, x, y, args.x, args.y, args.out)
    if "warning" in report:
        print(f"warning: {report['warning']}", file=sys.stderr)
    print(json.dumps(report, indent=2))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval`, `flops` and `scaling` commands."""
    parser = subparsers.add_parser("eval", help="FID, sFID, IS, precision/recall as the ADM evaluator",
                                   description=EVAL_DESCRIPTION)
    parser.add_argument("--samples", help="samples: ADM .npz (arr_0 uint8 N,H,W,3) or image folder")
    parser.add_argument("--ref", help="reference: ADM .npz (arr_0 and/or mu, sigma, mu_s, sigma_s) or image folder; "
                                      "optional with --features fmnist (default: the real test set)")
    parser.add_argument("--features", choices=FEATURE_NETWORKS, default=FEATURE_NETWORKS[0],
                        help="inception: the ADM metrics; fmnist: FID and class accuracy in the shipped "
                             "Fashion-MNIST classifier's features")
    parser.add_argument("--inception-weights", metavar="FILE",
                        help="pt_inception-2015-12-05-6726825d.pth (pytorch-fid's GitHub release)")
    parser.add_argument("--out", help="also write the JSON result to this file")
    parser.add_argument("--batch-size", type=POSITIVE, default=DEFAULT_BATCH_SIZE, help="images per Inception pass")
    parser.add_argument("--save-ref", metavar="OUT.npz", help="write the reference statistics as an ADM .npz")
    parser.add_argument("--save-ref-images", action="store_true",
                        help="with --save-ref: also store the reference images as arr_0 (for precision/recall)")
    parser.set_defaults(handler=run_eval)

    parser = subparsers.add_parser("flops", help="DiT Gflops (multiply-accumulates, as the DiT paper) against the "
                                                 "paper; DiT vs VAR cost per image")
    parser.add_argument("--image-size", type=POSITIVE, default=256, help="image side in pixels, a multiple of 64 (256 or 512)")
    parser.add_argument("--var", metavar="RUN_OR_EXPORT",
                        help="instead of the table: this VAR's network GMACs and GFLOPs to sample one image (its "
                             "recommended settings unless the flags below say otherwise)")
    recommended = " (default: the model's recommended setting)"
    parser.add_argument("--cfg", type=NON_NEGATIVE_FLOAT, default=None,
                        help="with --var: guidance strength (both halves run whatever it is)" + recommended)
    parser.add_argument("--flow-steps", type=POSITIVE, default=None,
                        help="with --var: a flow head's ODE steps per scale" + recommended)
    parser.add_argument("--flow-sampler", choices=FLOW_METHODS, default=None,
                        help="with --var: a flow head's ODE step (heun: two velocities a step)" + recommended)
    parser.set_defaults(handler=run_flops)

    parser = subparsers.add_parser("scaling", help="fit L = (a*X)^b over runs and plot it on log-log axes",
                                   description=module_docstring("scalegen.eval.scaling"),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", help="CSV with a header and one row per run (optional 'name' column)")
    parser.add_argument("--runs", nargs="+", help="run folders written by `scalegen train` (or exported folders)")
    parser.add_argument("--x", default="params", help="column / key of X (e.g. params, gflops, compute)")
    parser.add_argument("--y", default="loss", help="column / key of L (e.g. loss, fid)")
    parser.add_argument("--out", help="PNG of the log-log plot")
    parser.set_defaults(handler=run_scaling)
