"""Argument parsing only: each command maps flags onto the preset and calls one library function.

Flags left out (or given as an empty string, which is how MLproject passes "not set") keep the
preset's value, so `--config` and explicit flags compose.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from typing import Any, Callable

from .interrupt import install_sigterm
from .config import ConfigError, DEFAULT_DATA, Preset, load_preset, override


def _opt(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """An optional flag: an empty string (MLproject's "not set") means "keep the preset's value"."""

    def parse(text: str) -> Any:
        return None if text.strip() == "" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=_opt(str), help=f"dataset root (default {DEFAULT_DATA}, generated on first use)")
    p.add_argument("--experiment", type=_opt(str), default=None, help="MLflow experiment (default deepfake)")
    p.add_argument("--device", type=_opt(str), help="auto | cpu | cuda | cuda:N")
    p.add_argument("--config", type=_opt(str), help="a preset in experiments/ (name or YAML path)")
    p.add_argument("--image-size", type=_opt(int), help="resize images to this square size")
    p.add_argument("--no-progress", type=_bool, nargs="?", const=True, default=False, help="no progress bars")


def _training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=_opt(int), help="maximum epochs (per trial for tune)")
    p.add_argument("--precision", type=_opt(str), help="auto | fp32 | bf16")
    p.add_argument("--seed", type=_opt(int))
    p.add_argument("--augment", type=_opt(str), help="none | geometric | color")
    p.add_argument("--normalize", type=_opt(str), help="imagenet | half")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="synthesise or inspect a dataset")
    data_sub = data.add_subparsers(dest="action", required=True)
    synth = data_sub.add_parser("synth", help="write the embedded synthetic dataset")
    synth.add_argument("--out", "--data", dest="out", default=DEFAULT_DATA)
    synth.add_argument("--preset", default="demo", help="tiny | demo | full")
    synth.add_argument("--seed", type=int, default=0)
    inspect = data_sub.add_parser("inspect", help="validate a dataset and print a summary")
    _common(inspect)
    inspect.add_argument("--preset", type=_opt(str), help="synthetic preset if the default root is generated")
    inspect.add_argument("--seed", type=_opt(int), help="ignored by inspect (kept so MLproject can pass it)")

    train = sub.add_parser("train", help="train one architecture as one MLflow run")
    _common(train)
    _training_flags(train)
    train.add_argument("--arch", type=_opt(str), help="cnn_v1 | cnn_v2 | deepfakenet | vgg16")
    train.add_argument("--batch-size", type=_opt(int))
    train.add_argument("--lr", type=_opt(float))
    train.add_argument("--weight-decay", type=_opt(float))
    train.add_argument("--optimizer", type=_opt(str), help="adam | adamw")
    train.add_argument("--dropout-features", type=_opt(float), help="feature (conv) dropout")
    train.add_argument("--dropout-fc", type=_opt(float), help="classifier dropout")
    train.add_argument("--convs-per-block", type=_opt(int))
    train.add_argument("--label-smoothing", type=_opt(float))
    train.add_argument("--class-weights", type=_opt(str), help="none | balanced | 1.9,1,1,1,1.7")
    train.add_argument("--cutmix", type=_opt(float), help="CutMix alpha (0 = off)")
    train.add_argument("--mixup", type=_opt(float), help="MixUp alpha (0 = off)")
    train.add_argument("--weights", type=_opt(str), help="vgg16: local torchvision state_dict file")
    train.add_argument("--batch-norm", type=_opt(_bool), help="vgg16: BatchNorm variant (true/false)")
    train.add_argument("--run-name", type=_opt(str))

    baseline = sub.add_parser("baseline", help="SVM (RBF) on flattened standardised pixels")
    _common(baseline)
    baseline.add_argument("--svm-c", type=_opt(float), default=None, help="SVM C (default 10)")
    baseline.add_argument("--pixels", type=_opt(int), default=None,
                          help="downscale to this square size before flattening (default 32)")
    baseline.add_argument("--max-train", type=_opt(int), default=None,
                          help="use at most this many training images (default all)")

    tune = sub.add_parser("tune", help="Optuna member studies, ensemble search, registration")
    _common(tune)
    _training_flags(tune)
    tune.add_argument("--trials", type=_opt(int), help="finished trials per member study")
    tune.add_argument("--study", type=_opt(str), help="study name (member studies derive from it)")
    tune.add_argument("--storage", type=_opt(str), help="Optuna storage URL (default sqlite beside mlflow.db)")
    tune.add_argument("--model-name", type=_opt(str), default=None, help="registered model (default deepfake-ensemble)")
    tune.add_argument("--members", type=_opt(str), help="comma-separated architectures (default cnn_v1,cnn_v2)")
    tune.add_argument("--pruner", type=_opt(str), help="median | hyperband | none")
    tune.add_argument("--n-jobs", type=_opt(int), default=None, help="trials in parallel in this process (threads)")
    tune.add_argument("--ensemble-method", type=_opt(str), help="soft | confidence | best")
    tune.add_argument("--setup-only", type=_bool, nargs="?", const=True, default=False,
                      help="create the storages, studies and parent run, then exit (before starting workers)")

    promote = sub.add_parser("promote", help="move @champion to @challenger on evidence")
    _common(promote)
    promote.add_argument("--model-name", type=_opt(str), default=None)
    promote.add_argument("--split", type=_opt(str), default=None, help="labelled split to score on")
    promote.add_argument("--min-gain", type=_opt(float), default=None)
    promote.add_argument("--dry-run", type=_bool, nargs="?", const=True, default=False)
    promote.add_argument("--force", type=_bool, nargs="?", const=True, default=False)

    predict = sub.add_parser("predict", help="write a Kaggle submission")
    _common(predict)
    predict.add_argument("--model-uri", type=_opt(str), default=None,
                         help="default models:/deepfake-ensemble@champion")
    predict.add_argument("--model-name", type=_opt(str), default=None)
    predict.add_argument("--out", type=_opt(str), default=None, help="submission CSV (default submission.csv)")
    predict.add_argument("--split", type=_opt(str), default=None, help="split to predict (default test)")
    predict.add_argument("--probabilities", type=_bool, nargs="?", const=True, default=False, help="also write prob_0..prob_4 columns")
    predict.add_argument("--batch-size", type=_opt(int), default=None)

    bench = sub.add_parser("bench", help="measure our paths against the reference way")
    _common(bench)
    bench.add_argument("--epochs", type=_opt(int), default=None, help="epochs for the accuracy-parity check")
    bench.add_argument("--archs", type=_opt(str), default=None, help="default cnn_v1,cnn_v2")
    bench.add_argument("--search-trials", type=_opt(int), default=None)
    bench.add_argument("--skip", type=_opt(str), default=None, help="comma list of sections to skip")
    bench.add_argument("--json", type=_opt(str), default=None, help="also write the JSON line to this file")
    return parser


def _preset_from(args: argparse.Namespace) -> Preset:
    preset = load_preset(args.config)
    g = lambda name: getattr(args, name, None)  # noqa: E731 - flags absent from a command read as None
    data = override(preset.data, root=g("data"), synth_preset=g("preset"), image_size=g("image_size"), augment=g("augment"),
                    normalize=g("normalize"), cutmix_alpha=g("cutmix"), mixup_alpha=g("mixup"))
    model = override(preset.model, arch=g("arch"), dropout_features=g("dropout_features"),
                     dropout_fc=g("dropout_fc"), convs_per_block=g("convs_per_block"),
                     weights=g("weights"), batch_norm=g("batch_norm"))
    train = override(preset.train, epochs=g("epochs"), batch_size=g("batch_size"), lr=g("lr"),
                     weight_decay=g("weight_decay"), optimizer=g("optimizer"),
                     label_smoothing=g("label_smoothing"), class_weights=g("class_weights"),
                     precision=g("precision"), device=g("device"), seed=g("seed"))
    members = tuple(m.strip() for m in g("members").split(",")) if g("members") else None
    study = override(preset.study, trials=g("trials"), members=members, pruner=g("pruner"),
                     ensemble_method=g("ensemble_method"))
    return replace(preset, data=data, model=model, train=train, study=study)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file is noise
    install_sigterm()
    from .data import DataError

    try:
        return dispatch(args)
    except (ConfigError, DataError, FileNotFoundError, FileExistsError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"interrupted: {exc or 'Ctrl-C'}", file=sys.stderr)
        return 130


def dispatch(args: argparse.Namespace) -> int:
    experiment = args.experiment if getattr(args, "experiment", None) else "deepfake"
    progress = not getattr(args, "no_progress", False)
    if args.command == "data" and args.action == "synth":
        from .data.synth import synthesize

        summary = synthesize(args.out, args.preset, args.seed)
        print(f"wrote {summary.preset} dataset to {summary.out}: " +
              ", ".join(f"{k} {v}" for k, v in summary.counts.items()) +
              f" ({summary.image_size}x{summary.image_size}) in {summary.seconds:.2f}s")
        return 0
    preset = _preset_from(args)
    if args.command == "data":
        from .data import load_dataset, summarize

        print(summarize(load_dataset(preset.data)))
        return 0
    if args.command == "train":
        from .train_run import run_training

        outcome = run_training(preset, experiment, args.run_name, progress=progress)
        print(f"run {outcome.run_id}: " + ", ".join(f"{k}={v:.4g}" for k, v in outcome.summary.items()
                                                    if not k.startswith("val_recall")))
        return 0
    if args.command == "baseline":
        from .baseline import run_baseline

        outcome = run_baseline(preset, experiment, c=args.svm_c, pixels=args.pixels, max_train=args.max_train)
        print(f"run {outcome.run_id}: " + ", ".join(f"{k}={v:.4g}" for k, v in outcome.summary.items()))
        return 0
    if args.command == "tune":
        from .tune import run_tuning

        run_tuning(preset, experiment, study_name=args.study, storage=args.storage,
                   model_name=args.model_name or "deepfake-ensemble", n_jobs=args.n_jobs or 1,
                   progress=progress, setup_only=args.setup_only)
        return 0
    if args.command == "promote":
        from .registry import promote

        decision = promote(preset.data, args.model_name or "deepfake-ensemble", split=args.split,
                           min_gain=args.min_gain or 0.0, dry_run=args.dry_run, force=args.force,
                           experiment=experiment, device=args.device, progress=progress)
        print(decision.describe())
        return 0
    if args.command == "predict":
        from .submission import write_submission

        model_name = args.model_name or "deepfake-ensemble"
        uri = args.model_uri or f"models:/{model_name}@champion"
        result = write_submission(preset.data, uri, args.out or "submission.csv", split=args.split or "test",
                                  probabilities=args.probabilities, batch_size=args.batch_size or 256,
                                  progress=progress, device=args.device)
        print(result.describe())
        return 0
    if args.command == "bench":
        from .bench import run_bench

        run_bench(preset, epochs=args.epochs, archs=args.archs, search_trials=args.search_trials,
                  skip=args.skip, json_path=args.json)
        return 0
    raise AssertionError(args.command)
