"""Metric names, defined once: the loop, the tracker, the pruner and the tests all use these."""

TRAIN_LOSS = "train_loss"
TRAIN_ACCURACY = "train_accuracy"
VAL_LOSS = "val_loss"
VAL_ACCURACY = "val_accuracy"
LR = "lr"
EPOCH_IMAGES_PER_SECOND = "epoch_images_per_second"  # training throughput of that epoch (wall clock)
EPOCH_METRICS = (TRAIN_LOSS, TRAIN_ACCURACY, VAL_LOSS, VAL_ACCURACY, LR, EPOCH_IMAGES_PER_SECOND)
TIMING_METRICS = (EPOCH_IMAGES_PER_SECOND,)  # differ run to run even when the learning is repeatable

BEST_VAL_ACCURACY = "best_val_accuracy"
BEST_EPOCH = "best_epoch"
EPOCHS_RUN = "epochs_run"
TRAIN_SECONDS = "train_seconds"
IMAGES_PER_SECOND = "images_per_second"
VAL_MACRO_F1 = "val_macro_f1"
EVAL_SECONDS = "eval_seconds"  # wall seconds spent evaluating the selection split during the run
EVAL_FRACTION = "eval_fraction"  # their share of the run's wall time
TRAIN_IMAGES = "train_images"  # training images seen (with repetition)
WALL_SECONDS = "wall_seconds"  # a whole command's wall time, data loading to the last artifact
SUMMARY_METRICS = (BEST_VAL_ACCURACY, BEST_EPOCH, EPOCHS_RUN, TRAIN_SECONDS, IMAGES_PER_SECOND, EVAL_SECONDS,
                   EVAL_FRACTION, TRAIN_IMAGES)

# The one number every study maximises and every pruner watches.
OBJECTIVE = VAL_ACCURACY

# Ensemble run. "selection": images every choice read (in-sample figures); "audit": images no choice
# read (honest figures, with a 95 % interval). Trial runs' val_* metrics are on the selection split.
SELECTION_ACCURACY = "selection_accuracy"
SELECTION_NLL = "selection_nll"
SELECTION_IMAGES = "selection_images"
MEMBER_A_SELECTION_ACCURACY = "member_a_selection_accuracy"
MEMBER_B_SELECTION_ACCURACY = "member_b_selection_accuracy"
ENSEMBLE_WEIGHT = "ensemble_weight"
TEMPERATURE_A = "temperature_a"
TEMPERATURE_B = "temperature_b"
AUDIT_ACCURACY = "audit_accuracy"
AUDIT_MACRO_F1 = "audit_macro_f1"
AUDIT_NLL = "audit_nll"
AUDIT_ECE = "audit_ece"
AUDIT_FIGURES = (AUDIT_ACCURACY, AUDIT_MACRO_F1, AUDIT_NLL, AUDIT_ECE)  # each also as <name>_low, <name>_high
AUDIT_IMAGES = "audit_images"
AUDIT_NLL_UNCALIBRATED = "audit_nll_uncalibrated"
AUDIT_ECE_UNCALIBRATED = "audit_ece_uncalibrated"
MEMBER_A_AUDIT_ACCURACY = "member_a_audit_accuracy"
MEMBER_B_AUDIT_ACCURACY = "member_b_audit_accuracy"

# Artifact paths inside a run
CHECKPOINT_ARTIFACT = "checkpoints/best.pt"
PREDICTIONS_ARTIFACT = "predictions/validation.npz"
CONFUSION_PNG = "confusion_matrix.png"
CONFUSION_JSON = "confusion_matrix.json"
REPORT_JSON = "classification_report.json"
WEIGHT_CURVE_PNG = "weight_curve.png"  # ensemble run: accuracy against the weight of member A

# Session figures in the parent run (PNG: the MLflow UI shows them inline)
FIGURES_DIR = "figures"
EPOCH_CURVES_PNG = f"{FIGURES_DIR}/val_accuracy_per_epoch.png"
PARAMS_PNG = f"{FIGURES_DIR}/best_accuracy_vs_params.png"
SESSION_WEIGHT_CURVE_PNG = f"{FIGURES_DIR}/ensemble_weight_curve.png"

# Promotion run (registry.promote): both versions scored on the same labelled split
CHALLENGER_ACCURACY = "challenger_accuracy"
CHALLENGER_MACRO_F1 = "challenger_macro_f1"
CHAMPION_ACCURACY = "champion_accuracy"
CHAMPION_MACRO_F1 = "champion_macro_f1"
ACCURACY_GAIN = "accuracy_gain"  # challenger - champion
PROMOTED = "promoted"  # 1.0 when @champion moved
ONLY_CHALLENGER_RIGHT = "only_challenger_right"  # discordant images, for the exact McNemar test
ONLY_CHAMPION_RIGHT = "only_champion_right"
MCNEMAR_P = "mcnemar_p"
