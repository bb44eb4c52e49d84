"""The package's shape: imports point one way, every setting is declared once (flags and MLproject
parameters derive from it), search spaces and voting rules are tables a new entry extends."""

from __future__ import annotations

import ast
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import PROJECT_DIR

from pipeline.cli import build_parser
from pipeline.cli.command_table import COMMANDS
from pipeline.cli.flags import Flag
from pipeline.cli.mlproject import entry_points, render
from pipeline.config import ConfigError, load_preset
from pipeline.config.sections import AUGMENT_POLICIES, ENSEMBLE_METHODS, PRUNERS, SYNTH_PRESETS
from pipeline.ensemble.rules import RULES, combine

PACKAGE = PROJECT_DIR / "pipeline"

# Data flow, in import order: a module may import its own stage and the stages before it.
STAGES = ["config", "data", "models", "train", "tracking", "ensemble", "registry", "tune", "bench", "commands", "cli"]
LEAVES = {"pipeline.metrics", "pipeline.interrupt", "pipeline.faults", "pipeline.rng", "pipeline.ensemble.rules",
          "pipeline.ensemble"}  # import nothing of the package (the ensemble __init__ neither): free to import
NO_TRACKING_OR_SEARCH = ("pipeline.config", "pipeline.data", "pipeline.models", "pipeline.train")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PROJECT_DIR).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(package modules, external top-level packages) that ``name`` imports anywhere in its body."""
    is_package = path.name == "__init__.py"
    inner, outer = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
        for target in targets:
            if target.split(".")[0] == "pipeline":
                inner.add(target)
            else:
                outer.add(target.split(".")[0])
    return inner, outer


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = _modules()
    known = set(modules)
    edges, external = {}, {}
    for name, path in modules.items():
        inner, outer = _imports(name, path, known)
        own_ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        deps = set()
        for target in inner:
            # Importing a.b.c runs a and a.b first; a module's own packages are already running.
            parts = target.split(".")
            deps |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)} - own_ancestors - {name}
        edges[name] = {d for d in deps if d in known}
        external[name] = outer
    return edges, external


def _stage(module: str) -> int:
    part = module.split(".")[1] if module.count(".") else ""
    part = "cli" if part == "__main__" else part
    return STAGES.index(part) if part in STAGES else 0


def test_no_import_cycle_anywhere():
    edges, _ = _graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_imports_follow_the_data_flow():
    edges, _ = _graph()
    backwards = [f"{m} -> {d}" for m, deps in edges.items() for d in deps
                 if d not in LEAVES and _stage(d) > _stage(m)]
    assert not backwards, backwards
    for leaf in LEAVES:
        assert not edges[leaf] - {"pipeline"}, f"{leaf} must import nothing of the package: {edges[leaf]}"


def test_training_models_and_data_never_reach_mlflow_or_optuna():
    edges, external = _graph()
    for root in [m for m in edges if m.startswith(NO_TRACKING_OR_SEARCH)]:
        seen, todo = set(), [root]
        while todo:
            module = todo.pop()
            if module in seen:
                continue
            seen.add(module)
            assert not external[module] & {"mlflow", "optuna"}, f"{root} reaches {module}, which imports " \
                                                                 f"{external[module] & {'mlflow', 'optuna'}}"
            todo += edges[module]


def test_no_module_is_a_novel():
    sizes = {str(p.relative_to(PROJECT_DIR)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert max(sizes.values()) <= 330, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


MAX_PARAMETERS = 8  # more: pass the settings object that exists
MAX_FUNCTION_LINES = 50  # more: two functions
LONG_BY_DESIGN = {"pipeline/bench/report.py:format_table"}  # a reporting table, one row per line


def _functions() -> list[tuple[str, ast.FunctionDef]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((f"{path.relative_to(PROJECT_DIR)}:{node.name}", node))
    return found


def test_no_function_takes_more_than_eight_parameters():
    def count(node: ast.FunctionDef) -> int:
        a = node.args
        names = [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, (a.vararg, a.kwarg))]
        return len([n for n in names if n.arg not in ("self", "cls")])

    over = {name: count(node) for name, node in _functions() if count(node) > MAX_PARAMETERS}
    assert not over, over


def test_no_function_is_longer_than_a_screen():
    over = {name: node.end_lineno - node.lineno + 1 for name, node in _functions()
            if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES and name not in LONG_BY_DESIGN}
    assert not over, over


# Imports belong at the top of a module; these are deferred into the function that needs them, each
# for its reason: a heavy or optional library ...
DEFERRED_LIBRARIES = {
    "matplotlib": "pyplot and a backend take ~1 s; only drawing a figure needs them",
    "sklearn": "~1 s to import; only evaluation reports and the SVM baseline",
    "scipy": "only calibration and the McNemar test",
    "torchvision": "~0.5 s; only decoding, resizing and the reference loop",
    "pandas": "only model payloads and tables",
    "mlflow.pyfunc": "the model-serving stack (~1.5 s); only loading or saving a model",
    "mlflow.data": "dataset sources pull in pandas; only logging a dataset input",
    "tqdm": "bars, only on a terminal",
    "sqlalchemy": "only PostgreSQL's advisory locks",
    "torch": "pipeline/faults.py: only when a CUDA out-of-memory is injected",
}
# ... or a module whose imports are all deferred on purpose.
DEFERRED_MODULES = {
    "pipeline/ensemble/pyfunc.py": "model code MLflow loads in the server: the package loads with the model",
    "pipeline/bench/": "each section imports what it measures: a skipped section costs nothing",
    "pipeline/cli/rss_probe.py": "measures a command's own memory: imports it after the baseline",
}


def test_an_import_inside_a_function_has_its_reason():
    def name(node: ast.AST) -> str:
        if isinstance(node, ast.Import):
            return node.names[0].name
        return "." * node.level + (node.module or "")

    unexplained = []
    for where, function in _functions():
        path = where.split(":")[0]
        if any(path.startswith(m) for m in DEFERRED_MODULES):
            continue
        for node in ast.walk(function):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                module = name(node)
                if not any(module == lib or module.startswith(lib + ".") for lib in DEFERRED_LIBRARIES):
                    unexplained.append(f"{where}: {module}")
    assert not unexplained, unexplained


def test_no_module_name_means_two_things():
    """A module's name says what it holds: no two packages each have a module of the same name for
    different jobs (a stage's own ``run.py`` or ``figures.py`` is the one shared name allowed)."""
    shared = {"__init__", "__main__", "run", "figures"}
    by_name: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        by_name.setdefault(path.stem, []).append(str(path.relative_to(PROJECT_DIR)))
    for package in (p for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        by_name.setdefault(package.name, []).append(str(package.relative_to(PROJECT_DIR)) + "/")
    twice = {name: paths for name, paths in by_name.items() if len(paths) > 1 and name not in shared}
    assert not twice, twice


# ----------------------------------------------------------------------------- flags and MLproject

def test_mlproject_is_rendered_from_the_command_table():
    assert (PROJECT_DIR / "MLproject").read_text() == render(), "MLproject is stale: run `make mlproject`"


def _sentinel(flag: Flag, i: int) -> tuple[str, object]:
    """A valid value for ``flag`` (text, parsed value), distinct per flag where the type allows."""
    if flag.choices:
        choice = flag.choices[i % len(flag.choices)]
        return (choice, (choice,)) if flag.many else (str(choice), choice)
    if flag.kind is bool:
        return "true", True
    if flag.kind is int:
        return str(1000 + i), 1000 + i
    if flag.kind is float:
        return str(0.5 + i / 1000), 0.5 + i / 1000
    return f"s{i}", (f"s{i}",) if flag.many else f"s{i}"


@pytest.mark.parametrize("entry", list(entry_points()))
def test_every_mlproject_parameter_reaches_its_command(entry):
    spec = yaml.safe_load((PROJECT_DIR / "MLproject").read_text())["entry_points"][entry]
    flags, _ = entry_points()[entry]
    commands = [c for name, c in COMMANDS.items() if name.split(" ")[0] == entry]
    params = set(spec["parameters"]) - {"action"}
    assert params == {f.name for f in flags}
    for command in commands:
        accepted = {n for f in command.flags() for n in (f.name, *f.extra)}
        assert params <= accepted, (command.name, params - accepted)
        if len(commands) == 1:  # an entry point per command: every flag is a parameter
            assert {f.name for f in command.flags()} == params
        values = {f.name: _sentinel(f, i) for i, f in enumerate(flags)}
        text = spec["command"].format(action=command.name.partition(" ")[2],
                                      **{k: shlex.quote(v[0]) for k, v in values.items()})
        argv = shlex.split(text)[3:]  # after "python -m pipeline"
        args = build_parser().parse_args(argv)
        by_name = {n: f for f in command.flags() for n in (f.name, *f.extra)}
        for name, (_, expected) in values.items():
            assert getattr(args, by_name[name].dest) == expected, (command.name, name)


# What users and scripts called entry-point parameters before the settings were declared once.
TODAYS_PARAMETERS = {
    "data": "action data preset seed",
    "train": "arch augment batch_norm batch_size class_weights config convs_per_block cutmix data device dropout_fc "
             "dropout_features epochs experiment image_size label_smoothing lr mixup no_progress normalize optimizer "
             "precision run_name seed weight_decay weights",
    "baseline": "config data experiment image_size max_train pixels svm_c",
    "tune": "augment config data device ensemble_method epochs experiment image_size members model_name n_jobs "
            "no_progress normalize precision pruner seed setup_only storage study trials",
    "promote": "config data device dry_run experiment force min_gain model_name split",
    # experiment: predict writes a CSV and logs no run, so the flag did nothing (removed in #14).
    "predict": "batch_size config data device model_name model_uri no_progress out probabilities split",
    "bench": "archs config data device epochs experiment image_size json search_trials skip",
}


@pytest.mark.parametrize("entry", list(TODAYS_PARAMETERS))
def test_todays_parameter_names_keep_working(entry):
    spec = yaml.safe_load((PROJECT_DIR / "MLproject").read_text())["entry_points"][entry]
    assert set(TODAYS_PARAMETERS[entry].split()) <= set(spec["parameters"])


@pytest.mark.parametrize("argv", [
    ["predict", "--image-size", "64"],  # the registered model resizes its input itself
    ["promote", "--image-size", "64"],
    ["predict", "--cache-dir", "/tmp/c"],  # image bytes go to the model (promote finds its audit images in the cache)
    ["predict", "--experiment", "x"],  # predict writes a CSV, logs no run
], ids=lambda argv: " ".join(argv[:-1] if len(argv) > 2 and argv[-1] != "--no-progress" else argv))
def test_a_flag_a_command_does_not_use_is_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_a_flag_for_a_searched_setting_is_refused(capsys):
    from pipeline.cli import main

    assert main(["tune", "--config", "tiny", "--lr", "0.01", "--setup-only"]) == 2
    assert "train.lr is searched by study.space" in capsys.readouterr().err


# ----------------------------------------------------------------------------- tables

@pytest.mark.parametrize("rule", list(RULES))
def test_every_voting_rule(rule):
    rng = np.random.default_rng(0)
    p_a, p_b = rng.dirichlet(np.ones(5), 40), rng.dirichlet(np.ones(5), 40)
    np.testing.assert_allclose(combine(p_a, p_b, 1.0, rule), p_a, atol=1e-12)  # weight 1: member A alone
    np.testing.assert_allclose(combine(p_a, p_b, 0.0, rule), p_b, atol=1e-12)  # weight 0: member B alone
    for w in (0.2, 0.5, 0.9):
        mixed = combine(p_a, p_b, w, rule)
        np.testing.assert_allclose(mixed.sum(1), 1.0, atol=1e-9)
        assert (mixed >= 0).all()


def test_config_validates_against_the_rule_table(tmp_path):
    assert set(ENSEMBLE_METHODS) == set(RULES) | {"best"}
    path = tmp_path / "p.yaml"
    path.write_text("study:\n  ensemble_method: majority\n")
    with pytest.raises(ConfigError, match="study.ensemble_method must be one of soft, confidence, best"):
        load_preset(str(path))


def test_named_choices_match_their_implementations():
    from pipeline.data.augment import POLICIES
    from pipeline.data.synth import PRESETS

    assert tuple(POLICIES) == AUGMENT_POLICIES and tuple(PRESETS) == SYNTH_PRESETS


def test_the_pruner_tables_name_the_same_pruners_and_every_preset_uses_one_of_them():
    """config.PRUNERS (name -> what it does, validated without optuna) and tune's FACTORIES (name -> factory)."""
    from pipeline.tune.pruners import FACTORIES

    assert tuple(FACTORIES) == tuple(PRUNERS)
    assert all(isinstance(what, str) and what for what in PRUNERS.values())
    used = {path.name: (yaml.safe_load(path.read_text()).get("study") or {}).get("pruner")
            for path in sorted((PROJECT_DIR / "experiments").glob("*.yaml"))}
    assert used and {name for name in used.values() if name is not None} <= set(PRUNERS), used


def test_a_new_search_key_is_one_preset_line(tmp_path):
    """Any data/model/train setting can be searched without code: here the optimiser and lr patience."""
    import optuna

    from pipeline.config import DataConfig, ModelConfig, TrainConfig
    from pipeline.tune import suggest

    path = tmp_path / "p.yaml"
    path.write_text("study:\n  space:\n    train.optimizer: [adam, adamw]\n    train.lr_patience: {low: 2, high: 4}\n"
                    "    data.mixup_alpha: {low: 0.0, high: 0.4}\n")
    space = load_preset(str(path)).study.space
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        _, train, data = suggest(trial, space, ModelConfig(), TrainConfig(), DataConfig())
        assert isinstance(train.lr_patience, int) and 2 <= train.lr_patience <= 4
        assert 0.0 <= data.mixup_alpha <= 0.4
        seen.add(train.optimizer)
        study.tell(trial, 0.0)
    assert seen == {"adam", "adamw"}
    assert set(trial.params) == {"optimizer", "lr_patience", "mixup_alpha"}


@pytest.mark.parametrize("space, message", [
    ("    lr: [0.001, 0.003]\n", "key 'lr' is not a dotted setting"),
    ("    train.learning_rate: [0.1]\n", "train has no setting 'learning_rate'"),
    ("    train.lr: {low: 0.01, high: 0.001}\n", "needs finite low <= high"),
    ("    train.lr: {low: 0, high: 0.1, log: true}\n", "a log range needs low > 0"),
    ("    data.augment: [geometric, sepia]\n", "data.augment must be one of none, geometric, color"),
    ("    model.dropout_fc: {low: 0.2, high: 1.5}\n", "model.dropout_fc must be in [0, 1)"),
    ("    train.optimizer: {low: 1, high: 2}\n", "a range needs a numeric setting"),
])
def test_a_bad_search_space_names_the_key(tmp_path, space, message):
    path = tmp_path / "bad.yaml"
    path.write_text("study:\n  space:\n" + space)
    with pytest.raises(ConfigError) as err:
        load_preset(str(path))
    assert message in str(err.value) and str(path) in str(err.value)
