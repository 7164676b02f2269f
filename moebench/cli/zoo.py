"""`moebench zoo`: list, train and describe the embedded testbed models; rebuild the task data."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `list`, `train`, `card` and `build-tasks` sub-commands."""
    sub = parser.add_subparsers(dest="zoo_command", metavar="ACTION", required=True)
    sub.add_parser("list", help="print each testbed model's name and local folder")
    train = sub.add_parser("train", help="train a testbed model from its recipe (CPU)")
    train.add_argument("name", help="testbed model name, e.g. testbed-8e")
    train.add_argument("--out", help="output folder (default: the model's folder in the package)")
    train.add_argument("--steps", type=int, help="optimiser steps (default: the recipe's)")
    train.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    card = sub.add_parser("card", help="evaluate a checkpoint and write its model card")
    card.add_argument("name", help="testbed model name")
    card.add_argument("--folder", help="checkpoint folder (default: the model's folder in the package)")
    card.add_argument("--train-summary", help="JSON file with the training summary to record")
    sub.add_parser("build-tasks", help="regenerate the lm-eval task data shipped in moebench.tasks")


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen action."""
    if args.zoo_command == "list":
        from moebench.testbed.zoo import list_models

        for row in list_models():
            state = "" if row["available"] else "  (not trained)"
            print(f"{row['name']}\t{row['folder']}{state}")
        return 0
    if args.zoo_command == "train":
        from moebench.testbed.train import train
        from moebench.testbed.zoo import model_dir

        out = args.out or str(model_dir(args.name))
        summary = train(args.name, out, steps=args.steps, threads=args.threads)
        print(json.dumps(summary))
        return 0
    if args.zoo_command == "card":
        from moebench.testbed.card import write_card
        from moebench.testbed.zoo import model_dir

        folder = args.folder or str(model_dir(args.name))
        write_card(args.name, folder, args.train_summary)
        return 0
    if args.zoo_command == "build-tasks":
        from moebench.testbed.export import build_tasks

        for path in build_tasks():
            print(path)
        return 0
    raise ValueError(f"unknown zoo action {args.zoo_command!r}")
