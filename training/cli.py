"""Command line: ``python -m training train|evaluate|mix`` (also installed as ``cxr-train``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from app.core.artifacts import ModelLoadError
from app.core.coded_error import first_validation_error
from app.core.engine import EngineError, resolve_device
from training.checkpoint import has_checkpoint
from training.config import TrainConfig, flag
from training.mix_choice import parse_fractions
from training.user_errors import UsageError


def _path(text: str) -> Path:
    """A path flag's value; an empty one is refused: ``Path("")`` is the current directory, which a run would
    fill with its files (and an empty ``$OUT`` in a script is a mistake, not a choice)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path: name a file or directory (. for the current one)")
    return Path(text)


def _base_type(annotation: Any) -> Any:
    """The Python type a flag parses to; pydantic checks the value's limits afterwards.

    ``X | None`` is X (a flag that is not given keeps the field's default), and a constrained
    ``Annotated[X, ...]`` is X. Pydantic unwraps a top-level ``Annotated`` itself but not one inside
    an optional, which then arrives here as ``typing.Union``, not ``types.UnionType``.
    """
    if get_origin(annotation) in (Union, UnionType):
        members = [arg for arg in get_args(annotation) if arg is not type(None)]
        annotation = members[0] if len(members) == 1 else annotation
    return get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation


def _help(field: FieldInfo) -> str:
    default = field.get_default(call_default_factory=True)
    suffix = "" if default is PydanticUndefined or default is None else f" (default: {default})"
    return f"{field.description}{suffix}"


def _argument(name: str, field: FieldInfo) -> dict[str, Any]:
    """argparse options for one TrainConfig field, from its annotation and description."""
    kind = _base_type(field.annotation)
    options: dict[str, Any] = {"help": _help(field)}
    if kind is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif get_origin(kind) is Literal:
        choices = list(get_args(kind))
        options.update(type=type(choices[0]), choices=choices)
    elif kind is Path:
        options.update(type=_path, metavar=name.upper().replace("_", "-"))
    elif kind in (int, float, str):
        options["type"] = kind
    else:
        raise TypeError(f"TrainConfig.{name}: no command-line form for {field.annotation}")
    return options


def _add_train(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train", help="train, calibrate on validation and export a model", argument_default=argparse.SUPPRESS
    )
    for name, field in TrainConfig.model_fields.items():
        parser.add_argument(flag(name), **_argument(name, field))
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="RUNDIR",
        help="continue a run from its last checkpoint (bare --resume: the --out directory if it has one); "
        "a finished run is only re-calibrated, re-evaluated and re-exported",
    )


def _as_in_training(name: str) -> dict[str, Any]:
    """An evaluate option that means what the TrainConfig field means: same type, default and help."""
    field = TrainConfig.model_fields[name]
    return {**_argument(name, field), "default": field.get_default(call_default_factory=True)}


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("evaluate", help="evaluate an exported model on a labelled folder")
    parser.add_argument(
        "--weights", type=_path, required=True, help="model.safetensors (model.json next to it) or its directory"
    )
    parser.add_argument("--data", type=_path, required=True, help="DIR/{NORMAL,PNEUMONIA} or a root with split folders")
    parser.add_argument(
        "--report", type=_path, required=True, help="output directory for metrics.json, predictions.csv, plots"
    )
    parser.add_argument("--split", default="test", help="split to use when --data has split folders (default: test)")
    parser.add_argument("--batch-size", type=int, default=64, help="inference batch size (default: 64)")
    parser.add_argument(
        "--ood",
        type=_path,
        metavar="DIR",
        help="also report the input guard's refusal rate per subfolder of DIR (folders of images that are not "
        "chest X-rays, e.g. from python -m benchmarks.ood_set)",
    )
    for name in ("device", "workers", "bootstrap"):
        parser.add_argument(flag(name), **_as_in_training(name))


def _add_mix(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "mix",
        help="export the point FRACTION of the way from a model to its own fine-tune (WiSE-FT), calibrated on "
        "validation like a trained model",
    )
    parser.add_argument("--parent", type=_path, required=True, help="the exported model that was fine-tuned")
    parser.add_argument(
        "--tuned",
        type=_path,
        nargs="+",
        required=True,
        help="its fine-tune (trained with --init model --init-model PARENT); several: their mean is the far end",
    )
    parser.add_argument(
        "--fraction",
        type=parse_fractions,
        required=True,
        metavar="F[,F...]",
        help="0 = the parent, 1 = the fine-tune; several (0.5,0.75,1): the largest that keeps the parent's "
        "validation AUC within its paired bootstrap interval (training/mix_choice.py)",
    )
    parser.add_argument("--data", type=_path, required=True, help="the data the fine-tune was trained on")
    parser.add_argument("--out", type=_path, required=True, help="output directory for the exported model")
    for name in ("version", "device", "workers", "threads", "bootstrap"):
        parser.add_argument(flag(name), **_argument(name, TrainConfig.model_fields[name]), default=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_evaluate(sub)
    _add_mix(sub)
    return parser


def _print_summary(summary: dict[str, Any]) -> None:
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


def _run(args: argparse.Namespace) -> None:
    values: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in ("command", "resume")}
    if args.command == "train":
        from training.rundir import resolve_config
        from training.trainer import train

        config, resuming = resolve_config(values, getattr(args, "resume", None))
        summary = train(config, resuming)
        if summary is not None:
            _print_summary(summary)
        return
    if args.command == "mix":
        from training.mix_export import run_mix

        named = ("parent", "tuned", "fraction", "data", "out")
        overrides = {k: v for k, v in values.items() if k not in named}
        _print_summary(
            run_mix(args.parent, args.tuned, args.fraction, data=args.data, out=args.out, overrides=overrides)
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
        ood=args.ood,
    )
    keys = ("n", "accuracy", "sensitivity", "specificity", "roc_auc", "threshold", "input_guard", "ood")
    print(json.dumps({k: metrics[k] for k in keys if k in metrics}))


def _how_to_continue(args: argparse.Namespace) -> str:
    """For an interrupted ``train``: the command that continues it from its last finished epoch."""
    if args.command != "train":
        return ""
    resume = getattr(args, "resume", None)  # flags given are attributes, those not given are not
    run_dir = resume if resume not in (None, "auto") else getattr(args, "out", None)
    if run_dir is None or not has_checkpoint(Path(run_dir)):
        return " before the first epoch finished: nothing to continue"
    return f"; continue from the last finished epoch with: python -m training train --resume {run_dir}"


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors become one line on stderr and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        _run(args)
    except (UsageError, ModelLoadError, EngineError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted{_how_to_continue(args)}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it
    except ValidationError as exc:
        where, message, _ = first_validation_error(exc.errors())
        # A check across several options (a model validator) has no location: the message names them.
        print(f"error: {flag(where)}: {message}" if where else f"error: {message}", file=sys.stderr)
        return 2
    return 0
