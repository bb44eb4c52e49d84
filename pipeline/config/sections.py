"""One frozen dataclass per concern, loaded from ``experiments/*.yaml``.

Every field is declared once with its help text and choices (``setting``); CLI flags and ``MLproject``
parameters derive from these declarations. Every run and every checkpoint stores the resolved values
as plain dicts (``asdict``), so a result can always be traced back to the settings that produced it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..ensemble.rules import RULES  # a leaf table (numpy only): the voting rules config validates against
from .fields import ConfigError, check, setting, validate_choices
from .space import SearchSpace, default_space

DEFAULT_DATA = "data/synthetic"
NUM_CLASSES = 5
# Images per forward pass when evaluating: at 100 px a cnn_v2 forward pass holds ~7 MB of
# activations per image (measured: batch 64 adds ~450 MB, batch 256 over 1.3 GB) and a CPU runs
# batch 64 as fast; a GPU preset sets train.eval_batch_size higher.
EVAL_BATCH = 64
NORMALIZATIONS = ("imagenet", "half")
AUGMENT_POLICIES = ("none", "geometric", "color", "shift")  # implemented in data/augment.py (a test ties the two)
SYNTH_PRESETS = ("tiny", "demo", "full")  # implemented in data/synth.py
SCHEDULES = ("linear", "cosine", "plateau")  # train/schedule.py: DECAYS holds the decaying ones
# Pruners by name (study.pruner validates against it); tune/pruners.py FACTORIES builds each (a test ties the two).
PRUNERS: dict[str, str] = {
    "median": "stops a trial below the median of earlier trials at the same epoch (after 2 finished and the warm-up)",
    "hyperband": "Hyperband: successive halving over several brackets, from the warm-up to the last epoch",
    "asha": "asynchronous successive halving: rungs at warm-up x 3^k epochs, the best third goes on",
    "none": "never prunes: every trial runs to its end",
    "always": "tests only: prunes every trial at its first report once the study has a complete trial",
}
ENSEMBLE_METHODS = (*RULES, "best")  # best: every rule is searched, the selection winner kept
JOBS_AS = ("auto", "threads", "processes")  # tune/launcher.py: how study.n_jobs runs


@dataclass(frozen=True)
class DataConfig:
    root: str = setting(DEFAULT_DATA, "dataset root: competition layout (train.csv, validation.csv, test.csv) or "
                                      f"ImageFolder; {DEFAULT_DATA} is generated on first use")
    image_size: int | None = setting(None, "resize images to this square size (default: their native size)")
    normalize: str = setting("imagenet", "input normalisation", choices=NORMALIZATIONS)
    augment: str = setting("geometric", "training augmentation policy (geometric: reference 1's, color: "
                                        "reference 2's, shift: flip + whole-pixel shift up to 6 px)",
                           choices=AUGMENT_POLICIES)
    cutmix_alpha: float = setting(0.0, "CutMix with Beta(alpha, alpha) when > 0 (0 = off)")
    mixup_alpha: float = setting(0.0, "MixUp with Beta(alpha, alpha) when > 0 (0 = off)")
    cache_dir: str | None = setting(None, "decode cache folder (default $DEEPFAKE_TUNE_CACHE or "
                                          "~/.cache/deepfake-tune)")
    synth_preset: str = setting("demo", "synthetic preset generated when the default dataset root is missing",
                                choices=SYNTH_PRESETS)
    synth_seed: int = setting(0, "seed of the synthetic dataset generated when the default root is missing")
    audit_fraction: float = setting(0.3, "part of each validation class that no choice ever reads, for honest "
                                         "figures (0 = off; a labelled test split is the audit split instead)")
    audit_min_per_class: int = setting(20, "at least this many audit images per class")

    def __post_init__(self) -> None:
        validate_choices(self, "data")
        check(self.image_size is None or self.image_size >= 8, "data.image_size", ">= 8", self.image_size)
        check(self.cutmix_alpha >= 0, "data.cutmix_alpha", ">= 0", self.cutmix_alpha)
        check(self.mixup_alpha >= 0, "data.mixup_alpha", ">= 0", self.mixup_alpha)
        check(0 <= self.audit_fraction < 1, "data.audit_fraction", "in [0, 1)", self.audit_fraction)
        check(self.audit_min_per_class >= 1, "data.audit_min_per_class", ">= 1", self.audit_min_per_class)


@dataclass(frozen=True)
class ModelConfig:
    arch: str = setting("cnn_v1", "network architecture (models.MODELS)")
    dropout_features: float | None = setting(None, "feature (conv) dropout (default: the architecture's own)")
    dropout_fc: float | None = setting(None, "classifier dropout (default: the architecture's own)")
    convs_per_block: int = setting(2, "3x3 convolutions per conv block (cnn_v1, cnn_v2)")
    batch_norm: bool = setting(True, "vgg16 only: the BatchNorm variant (true/false)")
    weights: str | None = setting(None, "vgg16 only: a local torchvision state_dict file (nothing is downloaded)")
    num_classes: int = setting(NUM_CLASSES, "classes of the dataset (set from the data)", cli=False)

    def __post_init__(self) -> None:
        for name in ("dropout_features", "dropout_fc"):
            value = getattr(self, name)
            check(value is None or 0.0 <= value < 1.0, f"model.{name}", "in [0, 1)", value)
        check(self.convs_per_block >= 1, "model.convs_per_block", ">= 1", self.convs_per_block)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = setting(30, "maximum epochs (per trial for tune)")
    batch_size: int = setting(64, "training batch size")
    micro_batch: int | None = setting(None, "run each batch through the network in parts of this many images, "
                                            "gradients summed before one optimiser step: a step's activation memory "
                                            "falls with the part (BatchNorm normalises each part alone); unset = "
                                            "the whole batch at once")
    lr: float = setting(1e-3, "learning rate")
    lr_batch: int | None = setting(None, "the batch size train.lr is meant for: a run at another batch size trains at "
                                         "lr x sqrt(batch_size / lr_batch) (the square-root rule for Adam); "
                                         "unset = lr as given")
    weight_decay: float = setting(1e-4, "weight decay")
    optimizer: str = setting("adam", "optimiser", choices=("adam", "adamw"))
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy loss")
    class_weights: str = setting("none", "loss class weights: none, balanced or 5 numbers such as 1.9,1,1,1,1.7")
    schedule: str = setting("linear", "learning-rate schedule: linear or cosine decay to zero at the run's end (its "
                                      "deadline in a time budget, else its last epoch; the last weights are the "
                                      "model), or plateau (drops on a stalled selection accuracy, best epoch kept)",
                            choices=SCHEDULES)
    warmup: float = setting(0.03, "share of the run over which the learning rate warms up (linear, cosine)")
    evaluations: int = setting(4, "selection-split evaluations spread over a linear/cosine run, the last at its end "
                                  "(fewer when they would take over eval_share of its time)")
    eval_share: float = setting(0.05, "intermediate evaluations stop once they would take over this share of the "
                                      "run's time (1 = never)")
    ema: float = setting(0.0, "decay of an exponential moving average of the weights, kept as the model (0 = off)")
    lr_patience: int = setting(5, "plateau only: epochs without a better selection accuracy before the rate drops")
    lr_factor: float = setting(0.5, "plateau only: factor the learning rate is multiplied by when it drops")
    early_stop_patience: int = setting(15, "plateau only: epochs without a better selection accuracy before "
                                           "training stops (0 = never)")
    precision: str = setting("auto", "auto: bf16 autocast where the hardware has it, else fp32",
                             choices=("auto", "fp32", "bf16"))
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    seed: int = setting(0, "seed of weight init, shuffling and augmentation (per trial: seed + trial number)")
    eval_batch_size: int = setting(EVAL_BATCH, "evaluation batch size (memory grows with it: cnn_v2 at 100 px "
                                                        "holds ~7 MB of activations per image)")
    images_per_epoch: int | None = setting(None, "train on at most this many images per epoch (a fresh random "
                                                 "draw each epoch): finer steps for pruning and budgets on large data")

    def __post_init__(self) -> None:
        validate_choices(self, "train")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        check(self.epochs >= 1, "train.epochs", ">= 1", self.epochs)
        check(self.batch_size >= 1, "train.batch_size", ">= 1", self.batch_size)
        check(self.micro_batch is None or self.micro_batch >= 2, "train.micro_batch", ">= 2 (BatchNorm needs two "
              "images)", self.micro_batch)
        check(self.eval_batch_size >= 1, "train.eval_batch_size", ">= 1", self.eval_batch_size)
        check(self.lr > 0, "train.lr", "> 0", self.lr)
        check(self.lr_batch is None or self.lr_batch >= 1, "train.lr_batch", ">= 1", self.lr_batch)
        check(0 <= self.warmup < 1, "train.warmup", "in [0, 1)", self.warmup)
        check(self.evaluations >= 1, "train.evaluations", ">= 1", self.evaluations)
        check(0 < self.eval_share <= 1, "train.eval_share", "in (0, 1]", self.eval_share)
        check(0 <= self.ema < 1, "train.ema", "in [0, 1)", self.ema)
        check(self.images_per_epoch is None or self.images_per_epoch >= 2, "train.images_per_epoch", ">= 2",
              self.images_per_epoch)
        check(0.0 <= self.label_smoothing < 1.0, "train.label_smoothing", "in [0, 1)", self.label_smoothing)
        parse_class_weights(self.class_weights)

    @property
    def applied_lr(self) -> float:
        """The peak learning rate a run trains at: ``lr`` scaled from ``lr_batch`` to ``batch_size``."""
        if self.lr_batch is None:
            return self.lr
        return self.lr * (self.batch_size / self.lr_batch) ** 0.5


@dataclass(frozen=True)
class StudyConfig:
    members: tuple[str, ...] = setting(("cnn_v1", "cnn_v2"), "member architectures, comma-separated")
    trials: int = setting(10, "finished (complete + pruned) trials per member study")
    pruner: str = setting("median", "pruner of the member studies", choices=tuple(PRUNERS))
    pruner_warmup_epochs: int = setting(2, "epochs before a trial may be pruned")
    sampler_seed: int = setting(0, "seed of the TPE samplers")
    top_k: int = setting(3, "best trials per member that enter the ensemble search")
    ensemble_method: str = setting("soft", "ensemble voting rule (best: search them all)", choices=ENSEMBLE_METHODS)
    ensemble_weight_step: float = setting(0.05, "the ensemble weight is searched on a grid of this step, 0 and 1 "
                                                "(one member alone) included")
    ensemble_margin: float = setting(2.0, "standard errors by which a cross-fitted challenger (the best member "
                                          "alone, the searched pair/flips/rule/weight) must beat the equal-weight "
                                          "pair on the selection split to replace it")
    heartbeat_seconds: int = setting(30, "Optuna heartbeat: a lost worker's trial is retried after twice this")
    name: str | None = setting(None, "study name; member studies are <name>.<arch> (default: the preset's name)")
    storage: str | None = setting(None, "Optuna storage URL (default: sqlite optuna.db beside mlflow.db)")
    model_name: str = setting("deepfake-ensemble", "registered model name")
    n_jobs: int = setting(1, "trials at once on this machine (several on one GPU): in threads of this process or in "
                             "worker processes, as study.jobs_as says")
    jobs_as: str = setting("auto", "how n_jobs > 1 runs: threads (one process), processes (this worker starts "
                                   "n_jobs - 1 more on the same storage and waits for them), auto (processes on "
                                   "CUDA, threads on the CPU)", choices=JOBS_AS)
    workers: int | None = setting(None, "workers sharing a time budget's plan: this machine's n_jobs by default; "
                                        "the total when workers also start elsewhere (a Slurm array's task count)")
    time_budget: str | None = setting(None, "wall clock of the whole session, shared by all its workers: 30m, 2h, "
                                            "90s; a plan made from measured speeds splits it into search, final "
                                            "runs, ensemble and registration (train: the run's length)")
    final_fraction: float = setting(0.6, "in a time budget with a search: share of the usable time for the final "
                                         "runs (the plan gives it all to them when there is no search)")
    rung_fraction: float = setting(0.1, "in a time budget: a search run's length relative to a final run's")
    min_rung_passes: float = setting(2.0, "in a time budget: a search run's least length, in passes over the "
                                          "training data (shorter runs rank configurations by noise)")
    min_configs: int = setting(3, "in a time budget: configurations per member (its default included) a search "
                                  "must afford, else the plan makes none")
    # 40 passes: on the sample one run still gained 7.3 audit points from 10.5 to 37 passes (about 4 a
    # doubling), more than voting two runs or a short search buys back; below that the time trains one run.
    pair_min_passes: float = setting(40.0, "in a time budget: passes over the training data each of two final runs "
                                           "must get for the plan to train a pair rather than one member")
    final_min_passes: float = setting(40.0, "in a time budget: passes a final run must still get after a search "
                                            "for the plan to make one (fewer: the defaults get the time)")
    finals_crossfit: bool = setting(True, "in a time budget with a pair: each final run also trains on one half of "
                                          "the selection split and is scored on the other (true/false)")
    refit_epochs: int = setting(0, "without a time budget: epochs that continue each member's best configuration "
                                   "(0 = no refit; a time budget has final runs instead)")
    tail_seconds: float = setting(30.0, "seconds of a time budget kept for the ensemble search and registration, "
                                        "besides the audit's cost (which the plan measures and adds)")
    warm_start: str | None = setting(None, "STUDY[@STORAGE]: first try the best configurations of an earlier "
                                           "study (e.g. a quick one on a sample)")
    warm_start_k: int = setting(3, "configurations per member a warm start enqueues")
    space: SearchSpace = setting(help="what the member studies sample: dotted setting -> range or list",
                                 cli=False, default_factory=default_space)

    def __post_init__(self) -> None:
        validate_choices(self, "study")
        check(self.trials >= 1, "study.trials", ">= 1", self.trials)
        check(self.top_k >= 1, "study.top_k", ">= 1", self.top_k)
        check(self.n_jobs >= 1, "study.n_jobs", ">= 1", self.n_jobs)
        check(self.workers is None or self.workers >= self.n_jobs, "study.workers", ">= study.n_jobs (the workers "
              "started on this machine count)", self.workers)
        check(0 < self.ensemble_weight_step <= 0.5, "study.ensemble_weight_step", "in (0, 0.5]",
              self.ensemble_weight_step)
        if not self.members:
            raise ConfigError("study.members must name at least one architecture")
        check(0 < self.final_fraction <= 1, "study.final_fraction", "in (0, 1]", self.final_fraction)
        check(0 < self.rung_fraction <= 1, "study.rung_fraction", "in (0, 1]", self.rung_fraction)
        check(self.min_rung_passes > 0, "study.min_rung_passes", "> 0", self.min_rung_passes)
        check(self.min_configs >= 2, "study.min_configs", ">= 2", self.min_configs)
        check(self.pair_min_passes >= 0, "study.pair_min_passes", ">= 0", self.pair_min_passes)
        check(self.final_min_passes >= 0, "study.final_min_passes", ">= 0", self.final_min_passes)
        check(self.refit_epochs >= 0, "study.refit_epochs", ">= 0", self.refit_epochs)
        check(self.ensemble_margin >= 0, "study.ensemble_margin", ">= 0", self.ensemble_margin)
        check(self.tail_seconds >= 0, "study.tail_seconds", ">= 0", self.tail_seconds)
        check(self.warm_start_k >= 1, "study.warm_start_k", ">= 1", self.warm_start_k)
        if self.time_budget is not None:
            parse_duration(self.time_budget)

    @property
    def plan_workers(self) -> int:
        """How many workers a time budget's plan is made for."""
        return self.workers or self.n_jobs


@dataclass(frozen=True)
class TrackingConfig:
    experiment: str = setting("deepfake", "MLflow experiment")


@dataclass(frozen=True)
class Preset:
    name: str = "default"
    data: DataConfig = setting(cli=False, default_factory=DataConfig)
    model: ModelConfig = setting(cli=False, default_factory=ModelConfig)
    train: TrainConfig = setting(cli=False, default_factory=TrainConfig)
    study: StudyConfig = setting(cli=False, default_factory=StudyConfig)
    tracking: TrackingConfig = setting(cli=False, default_factory=TrackingConfig)


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "study": StudyConfig,
                             "tracking": TrackingConfig}


def parse_duration(text: str) -> float:
    """``30m``, ``2h``, ``1h30m``, ``90s`` or plain seconds -> seconds."""
    spec = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", spec):
        seconds = float(spec)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", spec)
        if not parts or "".join(f"{n}{u}" for n, u in parts) != re.sub(r"\s+", "", spec):
            raise ConfigError(f"study.time_budget must be a duration such as 30m, 2h, 1h30m or 90s; got {text!r}")
        seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if seconds <= 0:
        raise ConfigError(f"study.time_budget must be positive, got {text!r}")
    return seconds


def parse_class_weights(spec: str) -> tuple[float, ...] | str:
    """``none`` / ``balanced`` stay words; anything else must be NUM_CLASSES positive numbers."""
    if spec in ("none", "balanced"):
        return spec
    try:
        weights = tuple(float(part) for part in spec.split(","))
    except ValueError:
        raise ConfigError(f"train.class_weights must be none, balanced or {NUM_CLASSES} comma-separated numbers; "
                          f"got {spec!r}") from None
    if len(weights) != NUM_CLASSES or any(w <= 0 for w in weights):
        raise ConfigError(f"train.class_weights needs {NUM_CLASSES} positive numbers, got {spec!r}")
    return weights
