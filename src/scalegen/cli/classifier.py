"""`scalegen train classifier`: the Fashion-MNIST classifier behind `scalegen eval --features fmnist`."""
from __future__ import annotations

import argparse
import json
import shlex
import sys

from scalegen.cli.options import (
    COMPILE_WHOLE_MODEL_HELP, add_training_options, dataclass_from_args, train_config_from_args,
)
from scalegen.cli.parsing import POSITIVE
from scalegen.train.task_options import ClassifierOptions


def register(train_parsers) -> None:
    """Add `train classifier` to the command line."""
    parser = train_parsers.add_parser("classifier", help="train the Fashion-MNIST classifier used by eval --features fmnist")
    parser.add_argument("--data", default=ClassifierOptions.data, help="fashion-mnist or a folder of its four IDX files")
    parser.add_argument("--width", type=POSITIVE, default=ClassifierOptions.width, help="channels of the first stage")
    parser.add_argument("--feature-dim", type=POSITIVE, default=ClassifierOptions.feature_dim, help="FID feature size")
    parser.add_argument("--export", metavar="FILE.safetensors",
                        help="after training, write the better of EMA/raw weights (fp16), test-set statistics and a "
                             "JSON card beside it")
    add_training_options(parser, "classifier", {"compile": COMPILE_WHOLE_MODEL_HELP})
    parser.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> None:
    """Handler of `scalegen train classifier`: prints the exported card."""
    from scalegen.train.classifier_task import train_classifier

    options = dataclass_from_args(ClassifierOptions, args, command="scalegen " + shlex.join(sys.argv[1:]))
    card = train_classifier(options, train_config_from_args(args))
    if card is not None:
        print(json.dumps(card, indent=2))
