"""Every command README.md shows runs as written, in a test.

A *command* is a line of a fenced code block whose language is ``bash``, ``sh`` or ``shell`` (comments
and blank lines aside, a trailing ``\\`` joining the next line), or a ``$ `` line of a ``console`` block.
Blocks without a language (sample output, the package layout) and ``yaml`` or ``python`` blocks are
not commands. ``COMMANDS`` maps each command, exactly as the README writes it, to the test that runs it
exactly so; a command the README shows and the table does not name fails the suite, and so does a row
the README no longer shows or whose test does not exist.

The README's own commands run here from a fresh copy of the checkout (the files git tracks or would
track, with this venv as ``.venv``), one after another as a person types them, in the environment a
person has (no tracking URI or logging level set for them), and their output must hold no line a
library wrote (``tests/quiet.py``).
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import fresh_checkout
from mlflow.tracking import MlflowClient
from quiet import kind_of, third_party_lines

PROJECT = Path(__file__).resolve().parents[1]
README = PROJECT / "README.md"
COMMAND_LANGUAGES = {"bash", "sh", "shell"}  # every line is a command
CONSOLE_LANGUAGES = {"console"}  # only "$ " lines are commands
HERE = "tests/test_readme_commands.py"

ACTIVATE = ". .venv/bin/activate"
SERVE_PORT = 5001
FIRST_HOUR = f"{HERE}::test_a_first_hour_runs_as_written"
SLURM = "tests/test_slurm.py::test_a_two_task_job_array_runs_one_budgeted_session_and_a_cancelled_task_loses_nothing"

# command, as the README writes it -> the test (pytest node id) that runs it as written
COMMANDS = {
    # Toy size: `make demo` is minutes on 2 cores (the demo preset). The test checks that its recipe is the
    # documented `mlflow run . -e tune`; the session fixture `tuned` runs that `mlflow run` at the tiny preset.
    "make demo": f"{HERE}::test_make_demo_is_the_documented_mlflow_run",
    # CI (.ci/run) runs the README's test command itself; it is the suite that holds this table.
    "make test": "make test",
    # "A first hour" (already toy size) and the serving request, read from the README and run in its order.
    ". .venv/bin/activate": FIRST_HOUR,
    "python -m pipeline data synth --out data/tiny --preset tiny --seed 0": FIRST_HOUR,
    "python -m pipeline data inspect --data data/tiny": FIRST_HOUR,
    "python -m pipeline tune --config tiny": FIRST_HOUR,
    "python -m pipeline promote --config tiny": FIRST_HOUR,
    "python -m pipeline predict --config tiny --out submission.csv": FIRST_HOUR,
    "mlflow models serve -m models:/deepfake-ensemble@champion --env-manager local -h 127.0.0.1 -p 5001": FIRST_HOUR,
    "img=data/tiny/validation/$(sed -n 2p data/tiny/validation.csv | cut -d, -f1).png": FIRST_HOUR,
    """printf '{"dataframe_split": {"columns": ["image"], "data": [["%s"]]}}' "$(base64 -w0 "$img")" > request.json""":
        FIRST_HOUR,
    "curl -s -X POST http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d @request.json":
        FIRST_HOUR,
    # The Slurm recipe, run as written with PRESET, STUDY, TUNE_STORAGE and MLFLOW_TRACKING_URI set to a toy
    # preset, a real PostgreSQL and a real mlflow server, on a real single-node Slurm.
    'python -m pipeline tune --setup-only --config "$PRESET" --study "$STUDY" --storage "$TUNE_STORAGE"': SLURM,
    "sbatch --array=0-1 docs/slurm/tune-array.sbatch": SLURM,
    # The GPU check's toy size on the CPU, from a fresh copy with the Makefile's defaults (~1.5 min).
    "make gpu-check DEVICE=cpu":
        "tests/test_gpu_check.py::test_make_gpu_check_on_the_cpu_with_the_defaults_writes_every_field",
}


def code_blocks(markdown: str) -> list[tuple[str, list[str]]]:
    """(language, lines) of every fenced code block."""
    blocks, language, lines = [], None, []
    for line in markdown.splitlines():
        fence = re.match(r"^\s*```\s*([\w+-]*)", line)
        if fence and language is None:
            language, lines = fence.group(1).lower(), []
        elif fence:
            blocks.append((language, lines))
            language = None
        elif language is not None:
            lines.append(line)
    return blocks


def without_comment(line: str) -> str:
    """``line`` without a trailing ``  # comment`` (a ``#`` after whitespace, outside quotes)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def command_blocks(markdown: str) -> list[list[str]]:
    """The commands of each command block, in order, comments dropped, continuations joined."""
    blocks = []
    for language, lines in code_blocks(markdown):
        if language in CONSOLE_LANGUAGES:
            lines = [line[2:] for line in lines if line.startswith("$ ")]
        elif language not in COMMAND_LANGUAGES:
            continue
        commands, pending = [], ""
        for line in lines:
            text = without_comment(line).strip()
            if text.endswith("\\"):
                pending += text[:-1].rstrip() + " "
                continue
            text, pending = pending + text, ""
            if text:
                commands.append(text)
        blocks.append(commands)
    return blocks


def readme_commands(markdown: str) -> list[str]:
    """Every command of the README's command blocks, in order."""
    return [command for block in command_blocks(markdown) for command in block]


def readme_block_with(command_start: str) -> list[str]:
    """The README's command block holding a command that starts with ``command_start``."""
    blocks = [b for b in command_blocks(README.read_text()) if any(c.startswith(command_start) for c in b)]
    assert len(blocks) == 1, f"README.md has {len(blocks)} command blocks with `{command_start}`"
    return blocks[0]


def test_the_block_parser_reads_commands_as_a_person_would():
    markdown = "\n".join([
        "```bash", "make demo   # a comment", "", "# a whole-line comment",
        "printf '# not a comment' > x.txt", "mlflow server --host a \\", "  --port 5000", "```",
        "```", "speed of cnn_v1: 41 training images/s", "```",
        "```yaml", "study: {}", "```",
        "```console", "$ make test", "....  [100%]", "```",
    ])
    assert readme_commands(markdown) == ["make demo", "printf '# not a comment' > x.txt",
                                         "mlflow server --host a --port 5000", "make test"]


def test_every_readme_command_has_a_test_that_runs_it():
    commands = readme_commands(README.read_text())
    assert commands, "no command blocks found in README.md"
    missing = [c for c in commands if c not in COMMANDS]
    assert not missing, ("README commands with no test: add each to COMMANDS in tests/test_readme_commands.py "
                         "with the test that runs it as written:\n" + "\n".join(missing))
    stale = [c for c in COMMANDS if c not in commands]
    assert not stale, "COMMANDS rows the README no longer shows:\n" + "\n".join(stale)


@pytest.mark.parametrize("node", sorted(set(COMMANDS.values()) - {"make test"}))
def test_each_named_test_exists(node: str):
    path, name = node.split("::")
    tree = ast.parse((PROJECT / path).read_text())
    names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert name in names, f"{node} names no test"


def test_make_test_is_what_ci_runs():
    assert re.search(r"^make test$", (PROJECT / ".ci" / "run").read_text(), re.MULTILINE)
    assert re.search(r"^test:.*\n\t.*pytest", (PROJECT / "Makefile").read_text(), re.MULTILINE)


def test_readme_links_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists, and its #anchor a heading there."""
    broken = []
    for page in [README, *sorted((PROJECT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"https?:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path.read_text()):
                broken.append(f"{page.name}: {target}")
    assert not broken, "\n".join(broken)


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", markdown, re.MULTILINE)}


# ---- running the commands -------------------------------------------------------------------------------




def person_env(home: Path) -> dict[str, str]:
    """A person's environment: none of the variables the suite or make set for MLflow, Optuna or logging;
    the decode cache in the test's folder instead of ~/.cache."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "MAKE", "MFLAGS", "PYTEST_", "KINETO_", "VIRTUAL_ENV"))}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"  # the suite's rule; a person may leave it on
    env["DEEPFAKE_TUNE_CACHE"] = str(home / "cache")
    return env


def sh(command: str, cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``command`` in bash in ``cwd``, after the README's ``. .venv/bin/activate``."""
    proc = subprocess.run(["bash", "-c", f"{ACTIVATE} && {command}"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"`{command}` exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def assert_quiet(command: str, proc: subprocess.CompletedProcess) -> None:
    noise = third_party_lines(proc.stdout + proc.stderr)
    assert not noise, f"`{command}` printed library lines:\n" + "\n".join(f"[{kind_of(x)}] {x}" for x in noise)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
def test_a_first_hour_runs_as_written(tmp_path: Path):
    """The README's "A first hour" block, then its serving request, read from the README and run as
    written, in order, at the README's own (toy) size; each command's output quiet. The block is
    ``. .venv/bin/activate``, commands, and the server last (it runs until stopped)."""
    root, env = fresh_checkout(tmp_path / "deepfake-tune"), person_env(tmp_path)
    block, request = readme_block_with("mlflow models serve"), readme_block_with("curl ")
    assert block[0] == ACTIVATE and block[-1].startswith("mlflow models serve") and f"-p {SERVE_PORT}" in block[-1]
    commands, serve = block[1:-1], block[-1]
    for command in commands:
        proc = sh(command, root, env)
        assert_quiet(command, proc)
        if command.startswith("python -m pipeline data inspect"):
            assert re.search(r"^train\s+200 images", proc.stdout, re.MULTILINE), proc.stdout
        if command.startswith("python -m pipeline tune"):
            assert "audit" in proc.stdout and "#/models/deepfake-ensemble/versions/1" in proc.stdout
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("deepfake-ensemble", "champion")
    assert champion.version == client.get_model_version_by_alias("deepfake-ensemble", "challenger").version
    test_ids = (root / "data" / "tiny" / "test.csv").read_text().splitlines()[1:]
    rows = (root / "submission.csv").read_text().splitlines()
    assert rows[0].startswith("image_id,label") and len(rows) - 1 == len(test_ids)

    assert port_free(SERVE_PORT), f"port {SERVE_PORT} is in use: the README's serve command needs it"
    log_path = root / "serve.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(["bash", "-c", f"{ACTIVATE} && exec {serve}"], cwd=root, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while not ping(SERVE_PORT):
                assert server.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "server not ready in 120 s\n" + log_path.read_text()[-3000:]
                time.sleep(0.5)
            answer = sh("\n".join(request), root, env, timeout=60)  # one shell: the lines share $img
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    predictions = json.loads(answer.stdout)["predictions"]
    assert len(predictions) == 1 and set(predictions[0]) == {"label", *(f"prob_{k}" for k in range(5))}
    assert abs(sum(predictions[0][f"prob_{k}"] for k in range(5)) - 1) < 1e-4


def ping(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_make_demo_is_the_documented_mlflow_run():
    """Toy size: `make demo` is minutes on 2 cores, so its recipe runs in the suite at the tiny preset:
    what make would run for `make demo` (``make -n``) is the README's `mlflow run . -e tune --env-manager
    local --experiment-name deepfake -P config=demo`, and that same `mlflow run` with ``config=tiny`` is
    the session fixture ``tuned`` (tests/conftest.py) that ``test_tune.py`` checks end to end."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    recipe = subprocess.run(["make", "-n", "demo"], cwd=PROJECT, env=env, capture_output=True, text=True, check=True)
    runs = [re.sub(r"\s+", " ", x) for x in recipe.stdout.replace("\\\n", " ").splitlines() if "mlflow run" in x]
    assert len(runs) == 1, recipe.stdout
    documented = "mlflow run . -e tune --env-manager local --experiment-name deepfake -P config=demo"
    assert runs[0].endswith(documented) and documented in README.read_text().replace("\n", " "), runs[0]
