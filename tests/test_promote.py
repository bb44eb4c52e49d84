"""`promote`: @champion moves to @challenger on evidence, every decision is a run, nothing is lost.

The registry under test is a copy of the session's tuned store (``mlflow.db``), so no test changes
what other tests see. Its artifacts stay where ``tune`` wrote them (paths in the db are absolute);
nothing here deletes them.

Worse and better challengers: a tiny tune's models are near chance, so their order on the real
labels is luck. Instead the challenger is the champion with its output classes rotated (a real,
separately registered model whose every prediction differs from the champion's), and the
evaluation data are copies of the test images labelled with one model's own predictions: on
``champion_wins`` the champion scores 100% and the challenger 0%, on ``challenger_wins`` the
reverse. The scores come from the real scoring path, so the assertions test what promote does
with them.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import read_csv_rows, write_csv
from mlflow.tracking import MlflowClient

from pipeline import metrics as M
from pipeline.config import DataConfig
from pipeline.data import DataError, load_dataset
from pipeline.registry.promote import (
    ALREADY_CHAMPION,
    KEPT,
    PROMOTED,
    PromotionError,
    PromotionRule,
    ScoringOptions,
    decide,
    promote,
)
from pipeline.registry.register import log_ensemble_model
from pipeline.registry.scoring import AUDIT_FIGURES, IN_SAMPLE, OTHER_DATA, Score, Scored

NAME = "deepfake-ensemble"
EXPERIMENT = "promotions"


def use_store(monkeypatch: pytest.MonkeyPatch, uri: str) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", uri, raising=False)


def rotate_classes(src: Path, dst: Path) -> Path:
    """A copy of a checkpoint whose classifier answers class k+1 where the original answers k."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    last = [k for k, v in state.items() if k.endswith(".weight") and v.ndim == 2][-1]
    for key in (last, last.replace(".weight", ".bias")):
        state[key] = torch.roll(state[key], 1, dims=0)
    torch.save(ckpt, dst)
    return dst


def relabel(data: Path, dst: Path, labels: np.ndarray) -> Path:
    """A copy of the dataset whose test split carries ``labels``."""
    shutil.copytree(data, dst)
    ids = [row["image_id"] for row in read_csv_rows(data / "test.csv")]
    write_csv(dst / "test.csv", [(i, int(y)) for i, y in zip(ids, labels, strict=True)])
    return dst


@dataclass
class Template:
    db: Path
    champion: str
    challenger: str
    champion_wins: Path
    challenger_wins: Path


@pytest.fixture(scope="module")
def template(tuned, tmp_path_factory) -> Template:
    """The tuned store plus a rotated challenger; @champion = the tuned version (set directly)."""
    root = tmp_path_factory.mktemp("promotion-template")
    shutil.copy2(tuned.workdir / "mlflow.db", root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        use_store(mp, uri)
        mp.chdir(root)
        client = MlflowClient(uri, uri)
        champion = str(client.get_model_version_by_alias(NAME, "challenger").version)
        model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{champion}",
                                                             dst_path=str(root / "champion")))
        artifacts = {k: model_dir / v["path"] for k, v in
                     mlflow.models.Model.load(model_dir).flavors["python_function"]["artifacts"].items()}
        spec = json.loads(artifacts["ensemble"].read_text())
        experiment = client.create_experiment("variants", artifact_location=(root / "artifacts").as_uri())
        run_id = client.create_run(experiment, run_name="rotated").info.run_id
        ids = [row["image_id"] for row in read_csv_rows(tuned.data / "test.csv")]
        example = pd.DataFrame({"image": [(tuned.data / "test" / f"{ids[0]}.png").read_bytes()]})
        challenger = log_ensemble_model(run_id, rotate_classes(artifacts["member_a"], root / "a.pt"),
                                        rotate_classes(artifacts["member_b"], root / "b.pt"), artifacts["ensemble"],
                                        spec["classes"], example, NAME)
        # Built on the same data and audited on the same images as the champion: comparable.
        for key in ("dataset_digest", "audit_split"):
            client.set_model_version_tag(NAME, challenger, key, client.get_model_version(NAME, champion).tags[key])
        client.set_registered_model_alias(NAME, "challenger", challenger)
        client.set_registered_model_alias(NAME, "champion", champion)

        blobs = pd.DataFrame({"image": [(tuned.data / "test" / f"{i}.png").read_bytes() for i in ids]})
        pred = {v: mlflow.pyfunc.load_model(f"models:/{NAME}/{v}").predict(blobs)["label"].to_numpy()
                for v in (champion, challenger)}
    assert (pred[champion] != pred[challenger]).all()
    return Template(root / "mlflow.db", champion, challenger,
                    relabel(tuned.data, root / "champion-wins", pred[champion]),
                    relabel(tuned.data, root / "challenger-wins", pred[challenger]))


@pytest.fixture
def store(template, tmp_path, monkeypatch) -> MlflowClient:
    """A private copy of the template registry, active for this test."""
    shutil.copy2(template.db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    use_store(monkeypatch, uri)
    monkeypatch.chdir(tmp_path)
    return MlflowClient(uri, uri)


def aliases(client: MlflowClient) -> dict[str, str]:
    return {alias: str(v) for alias, v in client.get_registered_model(NAME).aliases.items()}


def snapshot(client: MlflowClient) -> tuple:
    versions = client.search_model_versions(f"name='{NAME}'")
    runs = [r.info.run_id for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return aliases(client), sorted((str(v.version), sorted(v.tags.items())) for v in versions), sorted(runs)


def decision_run(client: MlflowClient, run_id: str):
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["kind"] == "promotion"
    return run


def test_first_tune_becomes_champion(tuned, tmp_path, monkeypatch):
    shutil.copy2(tuned.workdir / "mlflow.db", tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    use_store(monkeypatch, uri)
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(uri, uri)
    version = str(client.get_model_version_by_alias(NAME, "challenger").version)
    assert "champion" not in aliases(client)

    decision = promote(DataConfig(root=str(tuned.data)), NAME, experiment=EXPERIMENT)
    assert decision.outcome == PROMOTED and decision.reason == "no champion yet"
    # The synthetic test split is labelled, so it is the audit split, and the one scored.
    assert decision.scored_on.name == "audit (test)" and decision.scored_on.honest
    assert aliases(client) == {"challenger": version, "champion": version}

    # The score is the accuracy of the model's own predictions on the test files.
    rows = read_csv_rows(tuned.data / "test.csv")
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    predicted = model.predict(pd.DataFrame({"image": [(tuned.data / "test" / f"{r['image_id']}.png").read_bytes()
                                                      for r in rows]}))["label"].to_numpy()
    accuracy = float(np.mean(predicted == np.array([int(r["label"]) for r in rows])))
    assert decision.challenger.score.accuracy == pytest.approx(accuracy) and decision.challenger.score.images == 50

    tags = client.get_model_version(NAME, version).tags
    assert tags["previous_champion"] == "none" and tags["promoted_at"].endswith("Z")
    assert tags["promotion_score"] == f"{accuracy:.6f}" and tags["promotion_run_id"] == decision.run_id
    run = decision_run(client, decision.run_id)
    assert run.data.metrics[M.PROMOTED] == 1.0
    assert run.data.metrics[M.CHALLENGER_ACCURACY] == pytest.approx(accuracy)
    assert M.CHALLENGER_MACRO_F1 in run.data.metrics and M.CHAMPION_ACCURACY not in run.data.metrics
    assert run.data.params["challenger_version"] == version and run.data.params["champion_version"] == "none"
    assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT

    # Same version under both aliases: nothing to score, nothing written.
    before = snapshot(client)
    again = promote(DataConfig(root=str(tuned.data)), NAME, experiment=EXPERIMENT)
    assert again.outcome == ALREADY_CHAMPION and again.run_id is None and "already champion" in again.describe()
    assert snapshot(client) == before


def test_worse_challenger_is_not_promoted(template, store):
    decision = promote(DataConfig(root=str(template.champion_wins)), NAME, experiment=EXPERIMENT)
    assert decision.outcome == KEPT and not decision.promoted
    assert (decision.challenger.score.accuracy, decision.champion.score.accuracy) == (0.0, 1.0)
    assert aliases(store) == {"challenger": template.challenger, "champion": template.champion}
    run = decision_run(store, decision.run_id)
    assert run.data.metrics[M.PROMOTED] == 0.0 and run.data.metrics[M.ACCURACY_GAIN] == pytest.approx(-1.0)
    assert run.data.params["champion_version"] == template.champion
    tags = store.get_model_version(NAME, template.challenger).tags
    assert tags["promotion_outcome"] == KEPT and "promoted_at" not in tags
    assert "superseded_by" not in store.get_model_version(NAME, template.champion).tags


def test_better_challenger_is_promoted_and_the_old_champion_kept(template, store):
    decision = promote(DataConfig(root=str(template.challenger_wins)), NAME, experiment=EXPERIMENT)
    assert decision.outcome == PROMOTED and decision.gain == pytest.approx(1.0)
    assert aliases(store)["champion"] == template.challenger
    new = store.get_model_version(NAME, template.challenger).tags
    assert new["previous_champion"] == template.champion and new["promotion_score"] == "1.000000"
    old = store.get_model_version(NAME, template.champion)
    assert old.tags["superseded_by"] == template.challenger  # still a version, ready for a rollback
    run = decision_run(store, decision.run_id)
    assert run.data.metrics[M.CHAMPION_ACCURACY] == 0.0 and run.data.metrics[M.CHALLENGER_ACCURACY] == 1.0
    # The evidence: 50 images only the challenger gets right, none the other way, p = 2 / 2^50.
    assert (run.data.metrics[M.ONLY_CHALLENGER_RIGHT], run.data.metrics[M.ONLY_CHAMPION_RIGHT]) == (50, 0)
    assert run.data.metrics[M.MCNEMAR_P] == pytest.approx(2 / 2 ** 50)
    assert run.data.metrics[f"{M.CHALLENGER_ACCURACY}_low"] > 0.9
    assert f"set_registered_model_alias('{NAME}', 'champion', '{template.champion}')" in decision.describe()
    # The documented rollback.
    store.set_registered_model_alias(NAME, "champion", template.champion)
    assert aliases(store)["champion"] == template.champion


def test_dry_run_changes_nothing(template, store):
    before = snapshot(store)
    decision = promote(DataConfig(root=str(template.challenger_wins)), NAME, dry_run=True, experiment=EXPERIMENT)
    assert decision.outcome == PROMOTED and decision.dry_run and decision.run_id is None
    assert "dry run: would promote" in decision.describe()
    assert snapshot(store) == before


def test_min_gain_and_force(template, store):
    data = DataConfig(root=str(template.challenger_wins))
    decision = promote(data, NAME, PromotionRule(min_gain=1.5), experiment=EXPERIMENT)  # wins by 1.0 < 1.5
    assert decision.outcome == KEPT and "less than min gain" in decision.reason
    assert aliases(store)["champion"] == template.champion
    forced = promote(DataConfig(root=str(template.champion_wins)), NAME, PromotionRule(force=True),
                     experiment=EXPERIMENT)
    assert forced.outcome == PROMOTED and forced.reason.startswith("forced")
    assert aliases(store)["champion"] == template.challenger
    with pytest.raises(ValueError, match="min-gain must be >= 0"):
        promote(data, NAME, PromotionRule(min_gain=-0.1))


def test_versions_built_on_other_data_or_audited_on_other_images_are_not_compared(template, store):
    """Both versions' ``dataset_digest`` and ``audit_split`` tags must be known and equal: else a clear
    refusal naming which differs (challenger's value first) and nothing written; ``--force`` goes past it."""
    data = DataConfig(root=str(template.challenger_wins))
    tags = store.get_model_version(NAME, template.champion).tags
    digest, split = tags["dataset_digest"], tags["audit_split"]
    pair = f"{NAME} v{template.challenger} and v{template.champion} were built and audited on different"

    def refused(version: str, key: str, value: str | None, expected: str) -> None:
        if value is None:
            store.delete_model_version_tag(NAME, version, key)
        else:
            store.set_model_version_tag(NAME, version, key, value)
        before = snapshot(store)
        with pytest.raises(PromotionError, match=re.escape(f"{pair} {expected}: their scores are not comparable")):
            promote(data, NAME, experiment=EXPERIMENT)
        assert snapshot(store) == before  # no run, no alias, no tag
        store.set_model_version_tag(NAME, version, key, tags[key])

    refused(template.challenger, "dataset_digest", "0" * 16, f"data (dataset_digest {'0' * 16} vs {digest})")
    refused(template.champion, "dataset_digest", None, f"data (dataset_digest {digest} vs unknown)")
    refused(template.challenger, "audit_split", "validation:0.3:20",
            f"audit split (audit_split validation:0.3:20 vs {split})")
    refused(template.challenger, "audit_split", None, f"audit split (audit_split unknown vs {split})")
    assert aliases(store) == {"challenger": template.challenger, "champion": template.champion}

    # --force: promoted past both differences, with its scores.
    store.set_model_version_tag(NAME, template.challenger, "dataset_digest", "0" * 16)
    store.set_model_version_tag(NAME, template.challenger, "audit_split", "validation:0.3:20")
    forced = promote(DataConfig(root=str(template.champion_wins)), NAME, PromotionRule(force=True),
                     experiment=EXPERIMENT)
    assert forced.outcome == PROMOTED and forced.forced
    assert forced.reason.startswith("forced: challenger 0.0 % vs 100.0 %")
    assert aliases(store)["champion"] == template.challenger


def test_a_score_on_other_data_is_not_called_an_audit_figure(tuned, template, store):
    """Scored on data other than the challenger was built on (another content digest), the figures are
    not its audit figures, whatever split they come from: the decision's text, its run's ``scoring`` tag
    and ``honest`` param say so. On the version's own data they are audit figures."""
    built_on = store.get_model_version(NAME, template.challenger).tags["dataset_digest"]
    other_digest = load_dataset(DataConfig(root=str(template.champion_wins))).digest
    assert other_digest != built_on  # the relabelled copy is other data
    other = promote(DataConfig(root=str(template.champion_wins)), NAME, experiment=EXPERIMENT)
    name = f"test images of other data (digest {other_digest}; v{template.challenger} was built on {built_on})"
    assert other.outcome == KEPT and other.scored_on.name == name and not other.scored_on.honest
    assert (f"scored on {name}: 50 labelled images (scored on other data: not the version's audit split)"
            in other.describe())
    assert "audit (" not in other.describe()
    run = decision_run(store, other.run_id)
    assert run.data.tags["scoring"] == OTHER_DATA and run.data.params["scored_on"] == name
    assert run.data.params["honest"] == "False"

    own = promote(DataConfig(root=str(tuned.data)), NAME, experiment=EXPERIMENT)
    assert own.scored_on.name == "audit (test)" and own.scored_on.honest and not own.scored_on.other_data
    assert "scored on audit (test): 50 labelled images\n" in own.describe()
    run = decision_run(store, own.run_id)
    assert run.data.tags["scoring"] == AUDIT_FIGURES and run.data.params["honest"] == "True"
    # A split the sessions chose on, of the version's own data: in-sample, not other data.
    chosen_on = promote(DataConfig(root=str(tuned.data)), NAME, scoring=ScoringOptions(split="validation"),
                        dry_run=True)
    assert chosen_on.scored_on.label == IN_SAMPLE and f"({IN_SAMPLE})" in chosen_on.describe()


def test_decision_rule_tie_keeps_the_champion():
    def scored(right: list[int], version: str) -> Scored:
        correct = np.zeros(50, dtype=bool)
        correct[right] = True
        return Scored(Score(version, correct), 0.0)

    champion = scored(list(range(20)), "1")
    assert decide(scored(list(range(20)), "2"), champion, 0.0, 0.05, False)[0] == KEPT  # a tie is no evidence
    # Same count, other images: a tie too, however the images fall.
    assert decide(scored(list(range(10, 30)), "2"), champion, 0.0, 0.05, False)[0] == KEPT
    clearly = scored(list(range(35)), "2")  # 15 more right, none fewer: 15 vs 0 discordant
    assert decide(clearly, champion, 0.0, 0.05, False)[0] == PROMOTED
    assert decide(clearly, champion, 0.3, 0.05, False)[0] == PROMOTED  # exactly min_gain (15/50)
    assert decide(clearly, champion, 0.32, 0.05, False)[0] == KEPT
    assert decide(clearly, champion, 0.0, 1e-6, False)[0] == KEPT  # p = 2^-14 is not below alpha 1e-6
    assert decide(scored(list(range(19)), "2"), champion, 0.0, 0.05, True)[0] == PROMOTED  # forced
    assert decide(scored([], "2"), None, 0.5, 0.05, False)[:2] == (PROMOTED, "no champion yet")


def test_unlabelled_split_and_missing_challenger_are_clear_errors(tuned, template, store, tmp_path):
    data = shutil.copytree(tuned.data, tmp_path / "data")
    ids = [row["image_id"] for row in read_csv_rows(data / "test.csv")]
    write_csv(data / "test.csv", [(i,) for i in ids], ("image_id",))
    with pytest.raises(DataError, match="test split has no labels"):
        promote(DataConfig(root=str(data)), NAME, scoring=ScoringOptions(split="test"))
    store.delete_registered_model_alias(NAME, "challenger")
    with pytest.raises(PromotionError, match="carries @challenger"):
        promote(DataConfig(root=str(data)), NAME)
    with pytest.raises(PromotionError, match="no registered model 'nothing'"):
        promote(DataConfig(root=str(data)), "nothing")


def test_promote_cli(template, store, tmp_path, capsys):
    import signal

    from pipeline.cli import main

    handler = signal.getsignal(signal.SIGTERM)  # main installs its own
    try:
        code = main(["promote", "--data", str(template.challenger_wins), "--experiment", EXPERIMENT,
                     "--min-gain", "0.5", "--no-progress"])
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert code == 0 and f"promoted {NAME} v{template.challenger} to @champion" in capsys.readouterr().out
    assert str(store.get_model_version_by_alias(NAME, "champion").version) == template.challenger
