"""Metric names, defined once: the loop, the tracker, the pruner and the tests all use these."""

TRAIN_LOSS = "train_loss"
TRAIN_ACCURACY = "train_accuracy"
VAL_LOSS = "val_loss"
VAL_ACCURACY = "val_accuracy"
LR = "lr"
EPOCH_METRICS = (TRAIN_LOSS, TRAIN_ACCURACY, VAL_LOSS, VAL_ACCURACY, LR)

BEST_VAL_ACCURACY = "best_val_accuracy"
BEST_EPOCH = "best_epoch"
EPOCHS_RUN = "epochs_run"
TRAIN_SECONDS = "train_seconds"
IMAGES_PER_SECOND = "images_per_second"
VAL_MACRO_F1 = "val_macro_f1"
SUMMARY_METRICS = (BEST_VAL_ACCURACY, BEST_EPOCH, EPOCHS_RUN, TRAIN_SECONDS, IMAGES_PER_SECOND)

# The one number every study maximises and every pruner watches.
OBJECTIVE = VAL_ACCURACY

# Ensemble run
ENSEMBLE_VAL_ACCURACY = "ensemble_val_accuracy"
ENSEMBLE_HONEST_ACCURACY = "ensemble_holdout_accuracy"
MEMBER_A_VAL_ACCURACY = "member_a_val_accuracy"
MEMBER_B_VAL_ACCURACY = "member_b_val_accuracy"
ENSEMBLE_WEIGHT = "ensemble_weight"

# Artifact paths inside a run
CHECKPOINT_ARTIFACT = "checkpoints/best.pt"
PREDICTIONS_ARTIFACT = "predictions/validation.npz"
CONFUSION_PNG = "confusion_matrix.png"
CONFUSION_JSON = "confusion_matrix.json"
REPORT_JSON = "classification_report.json"

# Promotion run (registry.promote): both versions scored on the same labelled split
CHALLENGER_ACCURACY = "challenger_accuracy"
CHALLENGER_MACRO_F1 = "challenger_macro_f1"
CHAMPION_ACCURACY = "champion_accuracy"
CHAMPION_MACRO_F1 = "champion_macro_f1"
ACCURACY_GAIN = "accuracy_gain"  # challenger - champion
PROMOTED = "promoted"  # 1.0 when @champion moved
