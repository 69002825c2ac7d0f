"""Command line: ``python -m training train|evaluate`` (also installed as ``cxr-train``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, get_args

from pydantic import ValidationError
from pydantic_core import PydanticUndefined

from app.core.artifacts import ModelLoadError
from app.core.coded_error import first_validation_error
from app.core.engine import EngineError, resolve_device
from training.config import TrainConfig
from training.user_errors import UsageError

# Config fields whose CLI form is an on/off switch (--flag / --no-flag).
_SWITCHES = ("freeze_features", "hflip", "cache")


def _help(name: str) -> str:
    field = TrainConfig.model_fields[name]
    default = field.get_default(call_default_factory=True)
    suffix = "" if default is PydanticUndefined or default is None else f" (default: {default})"
    return f"{field.description}{suffix}"


def _choices(name: str) -> list[str] | None:
    annotation = TrainConfig.model_fields[name].annotation
    options = [a for a in get_args(annotation) if isinstance(a, str)]
    if not options:  # Literal nested in a type alias, or Optional
        options = [a for arg in get_args(annotation) for a in get_args(arg) if isinstance(a, str)]
    return options or None


def _add_train(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train", help="train, calibrate on validation and export a model", argument_default=argparse.SUPPRESS
    )
    types = {
        "epochs": int,
        "input_size": int,
        "batch_size": int,
        "seed": int,
        "patience": int,
        "workers": int,
        "threads": int,
        "limit_per_class": int,
        "bootstrap": int,
        "golden_count": int,
        "min_val_images": int,
        "lr": float,
        "momentum": float,
        "weight_decay": float,
        "warmup_epochs": float,
        "aug_strength": float,
        "val_fraction": float,
        "target_sensitivity": float,
        "dropout": float,
    }
    for name in TrainConfig.model_fields:
        flag = "--" + name.replace("_", "-")
        if name in _SWITCHES:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=_help(name))
        elif name in ("data", "out", "imagenet_weights"):
            parser.add_argument(flag, type=Path, metavar=name.upper().replace("_", "-"), help=_help(name))
        else:
            parser.add_argument(flag, type=types.get(name, str), choices=_choices(name), help=_help(name))
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="RUNDIR",
        help="continue a run from its last checkpoint (bare --resume: the --out directory if it has one); "
        "a finished run is only re-calibrated, re-evaluated and re-exported",
    )


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("evaluate", help="evaluate an exported model on a labelled folder")
    parser.add_argument(
        "--weights", type=Path, required=True, help="model.safetensors (model.json next to it) or its directory"
    )
    parser.add_argument("--data", type=Path, required=True, help="DIR/{NORMAL,PNEUMONIA} or a root with split folders")
    parser.add_argument(
        "--report", type=Path, required=True, help="output directory for metrics.json, predictions.csv, plots"
    )
    parser.add_argument("--split", default="test", help="split to use when --data has split folders (default: test)")
    parser.add_argument("--batch-size", type=int, default=64, help="inference batch size (default: 64)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument(
        "--workers",
        type=int,
        default=TrainConfig.model_fields["workers"].get_default(call_default_factory=True),
        help="image decoding threads",
    )
    parser.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples for 95 percent CIs; 0 = none (default: 1000)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_evaluate(sub)
    return parser


def _run(args: argparse.Namespace) -> None:
    values: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in ("command", "resume")}
    if args.command == "train":
        from training.trainer import resolve_config, train

        config, resuming = resolve_config(values, getattr(args, "resume", None))
        summary = train(config, resuming)
        if summary is not None:
            print(
                json.dumps(
                    {
                        "model": summary["model"],
                        "threshold": summary["threshold"],
                        "temperature": summary["temperature"],
                        "val_roc_auc": summary["validation"]["roc_auc"],
                        "unreadable": len(summary["unreadable"]),
                    }
                )
            )
        return
    from training.evaluate import run_evaluate

    device = resolve_device(args.device)
    metrics = run_evaluate(
        args.weights,
        args.data,
        args.report,
        split=args.split,
        device=device,
        batch_size=args.batch_size,
        workers=args.workers,
        bootstrap=args.bootstrap,
    )
    print(json.dumps({k: metrics[k] for k in ("n", "accuracy", "sensitivity", "specificity", "roc_auc", "threshold")}))


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors become one line on stderr and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        _run(args)
    except (UsageError, ModelLoadError, EngineError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        where, message, _ = first_validation_error(exc.errors())
        print(f"error: --{where.replace('_', '-')}: {message}", file=sys.stderr)
        return 2
    return 0
