"""Numbers you can trust: the audit split no choice reads, the content digest, calibration, a search
that cannot do worse than its members, and promotion by a paired test."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_competition_dataset, read_csv_rows, write_csv
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline import metrics as M
from pipeline.config import DataConfig, load_preset
from pipeline.data import DataError, load_dataset
from pipeline.data.roles import ids_digest, partition
from pipeline.ensemble.calibration import best_temperature, calibrated, fit_temperature, log_softmax
from pipeline.ensemble.search import calibrate, search
from pipeline.metrics import ece, mcnemar, nll
from pipeline.registry.promote import KEPT, PROMOTED, decide
from pipeline.registry.scoring import Score, Scored

pytestmark = [pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
              pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")]


def _cfg(root: Path, tmp: Path, **kw) -> DataConfig:
    return DataConfig(root=str(root), cache_dir=str(tmp / "cache"), **kw)


def _independent_audit_ids(root: Path, split: str, k_per_class: int) -> set[str]:
    """The audit rule, written again from its definition: per class, the k images whose decoded
    pixels (RGB, C x H x W) hash lowest."""
    chosen = set()
    rows = read_csv_rows(root / f"{split}.csv")
    for label in sorted({r["label"] for r in rows}):
        keyed = []
        for r in rows:
            if r["label"] == label:
                pixels = np.ascontiguousarray(np.asarray(Image.open(root / split / f"{r['image_id']}.png")
                                                         .convert("RGB")).transpose(2, 0, 1))
                digest = hashlib.sha256(str(pixels.shape).encode() + pixels.tobytes()).digest()
                keyed.append((digest + r["image_id"].encode(), r["image_id"]))
        chosen |= {image_id for _, image_id in sorted(keyed)[:k_per_class]}
    return chosen


# ----------------------------------------------------------------------------- the data's roles

def test_audit_ids_and_digest_depend_on_content_only(tmp_path):
    root = make_competition_dataset(tmp_path / "a", counts={"train": 3, "validation": 8}, test_count=4)
    cfg = _cfg(root, tmp_path, audit_fraction=0.3, audit_min_per_class=2)
    first = partition(load_dataset(cfg), cfg)
    assert first.info.source == "validation"  # the test split is unlabelled
    assert set(first.info.ids) == _independent_audit_ids(root, "validation", math.ceil(0.3 * 8))
    selection = set(first.data.validation.ids)
    assert not selection & set(first.info.ids) and len(selection) + len(first.info.ids) == 40

    # The same data at another path, every CSV's rows in another order: same digest, same audit images.
    moved = shutil.copytree(root, tmp_path / "elsewhere" / "copy")
    for split in ("train", "validation"):
        rows = read_csv_rows(moved / f"{split}.csv")[::-1]
        write_csv(moved / f"{split}.csv", [(r["image_id"], r["label"]) for r in rows])
    again = partition(load_dataset(_cfg(moved, tmp_path, audit_fraction=0.3, audit_min_per_class=2)), cfg)
    assert again.data.digest == first.data.digest and set(again.info.ids) == set(first.info.ids)

    # One relabelled training row: another dataset.
    rows = read_csv_rows(moved / "train.csv")
    rows[0]["label"] = str((int(rows[0]["label"]) + 1) % 5)
    write_csv(moved / "train.csv", [(r["image_id"], r["label"]) for r in rows])
    assert load_dataset(_cfg(moved, tmp_path)).digest != first.data.digest


def test_a_labelled_test_split_is_the_audit_split_and_small_classes_are_refused(tmp_path):
    root = make_competition_dataset(tmp_path / "d", counts={"train": 3, "validation": 2}, test_count=10,
                                    test_labels=True)
    data = load_dataset(_cfg(root, tmp_path))
    roles = partition(data, _cfg(root, tmp_path))
    assert roles.info.source == "test" and len(roles.audit) == 10
    assert roles.data.validation.ids == data.validation.ids  # all of validation is for selection
    unlabelled = make_competition_dataset(tmp_path / "u", counts={"train": 3, "validation": 2}, test_count=3)
    with pytest.raises(DataError, match="class 0 has 2 validation images, too few for an audit split of 20"):
        partition(load_dataset(_cfg(unlabelled, tmp_path)), _cfg(unlabelled, tmp_path))
    off = partition(load_dataset(_cfg(unlabelled, tmp_path)), _cfg(unlabelled, tmp_path, audit_fraction=0))
    assert off.audit is None and "in-sample" in off.info.describe()


def test_the_audit_split_per_class_is_the_fraction_rounded_up_at_least_the_minimum_at_most_half(tmp_path):
    """25 validation images a class: ceil(fraction x 25), at least the minimum, at most 12 (half); a class
    with too few images is refused by name. Counts chosen at the boundaries of each rule."""
    root = make_competition_dataset(tmp_path / "d", counts={"train": 1, "validation": 25}, test_count=2)
    data = load_dataset(_cfg(root, tmp_path))

    def audited(fraction: float, minimum: int, dataset=data) -> list[int]:
        roles = partition(dataset, _cfg(root, tmp_path, audit_fraction=fraction, audit_min_per_class=minimum))
        assert len(roles.data.validation) + len(roles.audit) == len(dataset.validation)
        return np.bincount(roles.audit.labels.numpy(), minlength=5).tolist()

    assert 0.28 * 25 > 7  # 7.000000000000001 in floating point...
    assert audited(0.28, 1) == [7] * 5  # ... but 28 % of 25 is 7, not 8
    assert audited(0.27, 1) == [7] * 5  # 6.75 -> 7
    assert audited(0.29, 1) == [8] * 5  # 7.25 -> 8
    assert audited(0.28, 7) == [7] * 5  # the minimum equals the fraction's count
    assert audited(0.28, 8) == [8] * 5  # the minimum is above it: the minimum
    assert audited(0.01, 2) == [2] * 5  # 0.25 -> 1, below the minimum of 2
    assert audited(0.48, 1) == [12] * 5  # exactly half (25 // 2): allowed
    with pytest.raises(DataError, match="class 0 has 25 validation images, too few for an audit split of 13"):
        audited(0.49, 1)  # 12.25 -> 13, more than half
    with pytest.raises(DataError, match="class 0 has 25 validation images, too few for an audit split of 13"):
        audited(0.1, 13)  # the minimum alone is more than half

    # Class 3 with 7 images (7 // 2 = 3 may be audited): 40 % is 2.8 -> 3, allowed; 48 % is 3.36 -> 4,
    # refused, and the error names class 3 (every other class, 12 of 25, passes).
    rows = read_csv_rows(root / "validation.csv")
    dropped = [r["image_id"] for r in rows if r["label"] == "3"][:18]
    write_csv(root / "validation.csv", [(r["image_id"], r["label"]) for r in rows if r["image_id"] not in dropped])
    uneven = load_dataset(_cfg(root, tmp_path))
    assert audited(0.4, 1, uneven) == [10, 10, 10, 3, 10]
    with pytest.raises(DataError, match="class 3 has 7 validation images, too few for an audit split of 4"):
        audited(0.48, 1, uneven)

    # audit_fraction 0: no audit split, even where the test split is labelled; all of validation selects.
    labelled = load_dataset(_cfg(make_competition_dataset(tmp_path / "t", counts={"train": 1, "validation": 2},
                                                          test_count=5, test_labels=True), tmp_path))
    for dataset in (data, labelled):
        off = partition(dataset, _cfg(root, tmp_path, audit_fraction=0))
        assert off.audit is None and off.info.source == "none" and off.info.spec == "none"
        assert off.data.validation.ids == dataset.validation.ids


def _copy(root: Path, dst: Path, change) -> Path:
    """A copy of ``root`` with ``change(copy)`` applied."""
    change(shutil.copytree(root, dst))
    return dst


def _rows(root: Path, split: str) -> list[dict[str, str]]:
    return read_csv_rows(root / f"{split}.csv")


def _write(root: Path, split: str, rows: list[dict[str, str]]) -> None:
    write_csv(root / f"{split}.csv", [(r["image_id"], r["label"]) for r in rows])


def test_the_content_digest_follows_labels_and_membership_not_names(tmp_path):
    """What ``content_digest`` promises beyond moved and reordered copies (above): renamed files are the
    same data; two labels swapped (the same label counts), an image moved to another split, or a changed
    labelled test image are other data; an unlabelled test split is no part of it."""
    root = make_competition_dataset(tmp_path / "d", counts={"train": 3, "validation": 2}, test_count=3)
    digest = load_dataset(_cfg(root, tmp_path)).digest

    def rename(copy: Path) -> None:
        rows = _rows(copy, "train")
        (copy / "train" / f"{rows[0]['image_id']}.png").rename(copy / "train" / "renamed.png")
        rows[0]["image_id"] = "renamed"
        _write(copy, "train", rows)

    def swap_labels(copy: Path) -> None:
        rows = _rows(copy, "train")
        j = next(j for j, r in enumerate(rows) if r["label"] != rows[0]["label"])
        rows[0]["label"], rows[j]["label"] = rows[j]["label"], rows[0]["label"]
        _write(copy, "train", rows)

    def move_to_validation(copy: Path) -> None:
        train, validation = _rows(copy, "train"), _rows(copy, "validation")
        moved = train.pop(0)
        (copy / "train" / f"{moved['image_id']}.png").rename(copy / "validation" / f"{moved['image_id']}.png")
        _write(copy, "train", train)
        _write(copy, "validation", [*validation, moved])

    def repaint_test(copy: Path) -> None:
        image_id = _rows(copy, "test")[0]["image_id"]
        Image.fromarray(np.full((16, 16, 3), 7, dtype=np.uint8)).save(copy / "test" / f"{image_id}.png")

    def digest_after(change, name: str, source: Path = root) -> str:
        return load_dataset(_cfg(_copy(source, tmp_path / name, change), tmp_path)).digest

    assert digest_after(rename, "renamed") == digest
    assert digest_after(repaint_test, "repainted") == digest  # the test split is unlabelled here
    assert digest_after(swap_labels, "swapped") != digest
    assert digest_after(move_to_validation, "moved") != digest
    labelled = make_competition_dataset(tmp_path / "l", counts={"train": 3, "validation": 2}, test_count=3,
                                        test_labels=True)
    assert digest_after(repaint_test, "repainted-labelled", labelled) != load_dataset(_cfg(labelled, tmp_path)).digest


def test_the_audit_digest_is_of_pixels_and_labels_in_any_order(tmp_path):
    root = make_competition_dataset(tmp_path / "d", counts={"train": 1, "validation": 4}, test_count=0)
    split = load_dataset(_cfg(root, tmp_path)).validation
    labels = split.labels.clone()
    digest = ids_digest(split)
    assert ids_digest(split.subset(np.arange(len(split))[::-1].copy())) == digest  # rows reversed: same images, labels
    swapped = labels.clone()
    j = int(np.flatnonzero(labels.numpy() != int(labels[0]))[0])
    swapped[0], swapped[j] = labels[j], labels[0]  # the same label counts, on other images
    assert ids_digest(replace(split, labels=swapped)) != digest
    assert ids_digest(split.subset(np.arange(1, len(split)))) != digest  # one image fewer
    assert ids_digest(None) == "none" and len(digest) == 16


# ----------------------------------------------------------------------------- calibration and search

def _informative(rng, labels, strength):
    return strength * np.eye(5)[labels] + rng.normal(0, 1, (len(labels), 5))


def test_calibration_lowers_the_audit_nll_of_an_over_confident_member():
    rng = np.random.default_rng(0)
    y_sel, y_audit = rng.integers(0, 5, 600), rng.integers(0, 5, 600)
    # Logits five times too sharp: right answers near-certain, wrong ones too.
    over = lambda y: 5 * _informative(rng, y, 1.5)  # noqa: E731
    z_sel, z_audit = over(y_sel), over(y_audit)
    t = fit_temperature(log_softmax(z_sel), y_sel)
    assert t > 2
    before, after = calibrated(log_softmax(z_audit), 1.0), calibrated(log_softmax(z_audit), t)
    assert nll(after, y_audit) < 0.8 * nll(before, y_audit)
    assert ece(after, y_audit) < ece(before, y_audit)
    assert (after.argmax(1) == before.argmax(1)).all()  # a temperature never changes the answer


def test_a_temperature_the_held_out_images_do_not_support_is_not_applied():
    """Ten selection images: nine right with a margin of 3, one wrong with the same margin. On all ten
    the NLL-minimising temperature is not 1; fitted on the folds without the wrong image it sharpens
    to the limit, which makes that image's NLL enormous: cross-fitted, calibration does not pay, so
    the member keeps T = 1."""
    labels = np.arange(10) % 5
    logits = np.zeros((10, 5))
    logits[np.arange(10), labels] = 3.0
    logits[9] = 0.0
    logits[9, (labels[9] + 1) % 5] = 3.0  # the wrong one, as confident
    logp = log_softmax(logits)
    assert abs(best_temperature(logp, labels) - 1.0) > 0.05  # a plain fit would move it
    assert fit_temperature(logp, labels) == 1.0
    # The same member on 600 images, five times too sharp: the held-out folds agree, T is applied.
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 600)
    over = log_softmax(5 * _informative(rng, y, 1.5))
    assert fit_temperature(over, y) == pytest.approx(best_temperature(over, y)) and fit_temperature(over, y) > 2


def _search(logits, labels, step=0.05):
    views = calibrate(logits, [None] * len(logits), labels)
    return search(views, ["cnn_v1", "cnn_v2"][:len(logits)], labels, ("soft", "confidence"), step, 0)


def test_mirror_votes_are_searched_only_when_allowed():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, 200)
    logits = [_informative(rng, y, 1.5), _informative(rng, y, 1.5)]
    flipped = [_informative(rng, y, 1.5), _informative(rng, y, 1.5)]
    assert {v for _, v in calibrate(logits, flipped, y)} == {"none", "hflip"}
    assert {v for _, v in calibrate(logits, flipped, y, mirror=False)} == {"none"}


def test_the_search_gives_all_weight_to_a_member_when_the_other_is_noise():
    for seed in range(3):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 5, 400)
        choice, _ = _search([_informative(rng, y, 2.5), rng.normal(0, 1.5, (400, 5))], y)
        assert (choice.a, choice.weight) == (0, 1.0), choice
        choice, _ = _search([rng.normal(0, 1.5, (400, 5)), _informative(rng, y, 2.5)], y)
        assert (choice.a, choice.weight) == (0, 0.0), choice  # member B alone


def test_the_chosen_ensemble_never_scores_below_its_better_member_on_selection():
    for seed in range(5):
        rng = np.random.default_rng(100 + seed)
        y = rng.integers(0, 5, 300)
        logits = [_informative(rng, y, 1.0 + rng.random()), _informative(rng, y, 1.0 + rng.random())]
        choice, ranked = _search(logits, y)
        members = [float((z.argmax(1) == y).mean()) for z in logits]
        assert choice.accuracy >= max(members) - 1e-12
        assert all(c.nll >= choice.nll for c in ranked)


# ----------------------------------------------------------------------------- promotion

def _scored(version: str, correct: np.ndarray) -> Scored:
    return Scored(Score(version, correct.astype(bool)), 0.0)


def test_mcnemar_decides_on_the_images_where_the_versions_disagree():
    base = np.zeros(200, dtype=bool)
    base[:150] = True  # the champion: 150 of 200
    one_more = base.copy()
    one_more[150] = True  # right on exactly one more image, wrong on none it got right
    outcome, reason, ev = decide(_scored("2", one_more), _scored("1", base), 0.0, 0.05, False)
    assert outcome == KEPT and (ev.only_challenger, ev.only_champion) == (1, 0) and ev.p == 1.0
    assert "1 vs 0 discordant, p = 1: not enough evidence" in reason
    clearly = base.copy()
    clearly[150:175] = True  # 25 more right...
    clearly[:3] = False  # ...and 3 fewer
    outcome, reason, ev = decide(_scored("2", clearly), _scored("1", base), 0.0, 0.05, False)
    assert outcome == PROMOTED and (ev.only_challenger, ev.only_champion) == (25, 3) and ev.p < 1e-4
    # The exact two-sided binomial p, from its definition.
    expected = 2 * sum(math.comb(28, k) for k in range(4)) / 2 ** 28
    assert ev.p == pytest.approx(expected, rel=1e-9)
    assert mcnemar(clearly, base)[2] == pytest.approx(expected, rel=1e-9)
    assert decide(_scored("2", clearly), _scored("1", base), 0.2, 0.05, False)[0] == KEPT  # gain 11 points < 20


# ----------------------------------------------------------------------------- a session, end to end

def test_no_choice_of_a_session_reads_an_audit_image(tmp_path, monkeypatch):
    """A tiny tune on data whose test split is unlabelled: trials, refits, the ensemble search and
    calibration read only the selection split; the audit ids are an artifact of the parent run; a
    worker with other data cannot join."""
    import mlflow

    from pipeline.config import override
    from pipeline.tune import TuneError, WorkerOptions, open_session, run_tuning

    root = make_competition_dataset(tmp_path / "data", size=32, counts={"train": 4, "validation": 6},
                                    test_count=3)
    preset_path = tmp_path / "p.yaml"
    preset_path.write_text(yaml.safe_dump({
        "data": {"root": str(root), "augment": "none", "normalize": "half", "audit_fraction": 0.3,
                 "audit_min_per_class": 1},
        "model": {"convs_per_block": 1},
        "train": {"epochs": 1, "batch_size": 10, "precision": "fp32", "device": "cpu"},
        "study": {"trials": 1, "pruner": "none", "top_k": 1, "ensemble_method": "best", "refit_epochs": 1,
                  "space": {"train.lr": {"low": 1e-3, "high": 2e-3, "log": True}}}}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    preset = load_preset(str(preset_path))
    preset = override(preset, study=override(preset.study, name="s", storage=storage))
    summary = run_tuning(preset, WorkerOptions("audit", progress=False))

    audit_ids = _independent_audit_ids(root, "validation", 2)  # ceil(0.3 x 6) per class
    validation = {r["image_id"] for r in read_csv_rows(root / "validation.csv")}
    selection = validation - audit_ids
    client = MlflowClient(uri)
    parent = client.get_run(summary.parent_run_id)
    stored = json.loads(Path(client.download_artifacts(parent.info.run_id, "audit/ids.json", str(tmp_path / "dl")))
                        .read_text())
    assert set(stored["ids"]) == audit_ids and stored["spec"] == "validation:0.3:1"
    assert parent.data.tags["dataset_digest"] == load_dataset(_cfg(root, tmp_path)).digest
    runs = client.search_runs([parent.info.experiment_id])
    chose = [r for r in runs if r.data.tags.get("kind") in ("trial", "ensemble")]
    assert len(chose) == 5  # a search trial and a refit per member, and the ensemble
    for run in chose:  # what each trial's epochs, pruning and top-k read, and the ensemble's search
        stored = client.download_artifacts(run.info.run_id, M.PREDICTIONS_ARTIFACT, str(tmp_path / run.info.run_id))
        npz = np.load(stored)
        assert set(npz["ids"]) == selection and not set(npz["ids"]) & audit_ids
    ensemble = next(r for r in chose if r.data.tags["kind"] == "ensemble")
    assert ensemble.data.metrics[M.AUDIT_IMAGES] == len(audit_ids) == 10
    assert ensemble.data.metrics[M.SELECTION_IMAGES] == len(selection) == 20
    audit_npz = np.load(client.download_artifacts(ensemble.info.run_id, f"audit/{M.PREDICTIONS_ARTIFACT}",
                                                  str(tmp_path / "audit-dl")))
    assert set(audit_npz["ids"]) == audit_ids
    # Each member's best trial was continued as a refit, a nested run tagged phase=refit, and the refits
    # were candidates of the ensemble search like any trial.
    refits = [r for r in chose if r.data.tags.get("phase") == "refit"]
    assert sorted(r.data.tags["arch"] for r in refits) == ["cnn_v1", "cnn_v2"]
    assert all(r.data.tags["refit_of_trial"] == "0" and r.info.status == "FINISHED" for r in refits)
    pairs = json.loads(Path(client.download_artifacts(ensemble.info.run_id, "best_pairs.json",
                                                      str(tmp_path / "pairs"))).read_text())
    in_search = {p["member_a_run_id"] for p in pairs} | {p["member_b_run_id"] for p in pairs}
    assert {r.info.run_id for r in refits} <= in_search
    tags = client.get_model_version("deepfake-ensemble", summary.model_version).tags
    assert tags["audit_split"] == "validation:0.3:1" and tags["dataset_digest"] == parent.data.tags["dataset_digest"]

    # A worker whose data differs (one relabelled row) refuses to join the session.
    other = shutil.copytree(root, tmp_path / "other")
    rows = read_csv_rows(other / "train.csv")
    rows[0]["label"] = str((int(rows[0]["label"]) + 1) % 5)
    write_csv(other / "train.csv", [(r["image_id"], r["label"]) for r in rows])
    changed = load_preset(str(preset_path))
    from dataclasses import replace
    changed = replace(changed, data=replace(changed.data, root=str(other)))
    with pytest.raises(TuneError, match="is not the data of session s"):
        open_session(changed, "audit", "s", storage)


def test_the_audit_runs_each_checkpoints_passes_once_and_scores_what_is_served(tmp_path, monkeypatch):
    """A one-run ensemble with its mirror vote (the plan's usual choice on a CPU budget): the audit
    reads the run's plain and mirrored passes once each (it used to run four), and its figures are
    the served members' own probabilities, computed here through ``Member.logprobs``."""
    import torch

    from pipeline.config import ModelConfig, TrainConfig
    from pipeline.ensemble.audit_scoring import audit_probs
    from pipeline.ensemble.pyfunc import Member
    from pipeline.ensemble.rules import combine
    from pipeline.ensemble.stage import Candidate, EnsembleResult
    from pipeline.models import build_model
    from pipeline.train.checkpoint import ModelInterface, save_checkpoint

    torch.manual_seed(0)
    model_cfg = ModelConfig(arch="cnn_v1", convs_per_block=1)
    path = save_checkpoint(tmp_path / "best.pt", build_model(model_cfg).state_dict(), model_cfg, DataConfig(),
                           TrainConfig(), ModelInterface(tuple("01234"), (32, 32)), 1, 0.5)
    run = Candidate("cnn_v1", 3, "r", 0.5, np.zeros((1, 5)), None, path)
    result = EnsembleResult("e", run, run, 0.4, "soft", "none", "hflip", 1.0, 1.7, 0.5, 1.0, 0.5, 0.5, 1)
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    device = torch.device("cpu")

    passes = []
    plain_logits = Member.logits
    monkeypatch.setattr(Member, "logits", lambda self, batch, size=256, flip=False: passes.append(flip)
                        or plain_logits(self, batch, size, flip))
    before, after, alone = audit_probs(result, images, device, batch_size=5)
    assert sorted(passes) == [False, True]

    monkeypatch.setattr(Member, "logits", plain_logits)
    a = Member(str(path), device, "fp32", "none", 1.0).logprobs(images)
    b = Member(str(path), device, "fp32", "hflip", 1.7).logprobs(images)
    np.testing.assert_allclose(after, combine(calibrated(a, 1.0), calibrated(b, 1.7), 0.4, "soft"), rtol=1e-5)
    np.testing.assert_allclose(before, combine(calibrated(a, 1.0), calibrated(b, 1.0), 0.4, "soft"), rtol=1e-5)
    for member_alone in alone:
        np.testing.assert_allclose(member_alone, calibrated(a, 1.0), rtol=1e-5)
