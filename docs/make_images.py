"""Regenerate the README's pictures from a fresh session: ``make docs-images``.

1. runs ``python -m pipeline tune`` (preset ``demo`` unless ``--config``) into a temporary store,
   with ``MLFLOW_UI_URL`` pointing at the UI started in step 2, so the links its summary prints are
   the links shot below;
2. starts ``mlflow ui`` on that store (one worker, no job runner: ready in ~12 s) and waits for /health;
3. opens every printed link in headless Debian Chromium through Python ``playwright`` (``pip install
   -e '.[docs]'``; never ``playwright install``: the browser is /usr/bin/chromium), checks each page
   shows what it should, and writes the screenshots and the session's PNG figures into ``docs/``.

Only for the docs: the test suite and ``.ci/run`` need neither playwright nor chromium.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # our own downloads below
sys.path.insert(0, str(ROOT))

from pipeline import metrics as M  # noqa: E402
from pipeline.config import load_preset  # noqa: E402
from pipeline.tracking import links  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
VIEWPORT = {"width": 1600, "height": 1000}
MAX_BYTES = 300_000


def run_session(work: Path, config: str, study: str, base: str) -> dict[str, str]:
    """The tune, its progress passed through; returns the links its summary printed, by label."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "MLFLOW_UI_URL": base,
           "DEEPFAKE_TUNE_CACHE": str(work / "cache"), "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    data = load_preset(config).data
    if not (work / data.root).exists():  # tune generates only the default root by itself
        subprocess.run([sys.executable, "-m", "pipeline", "data", "synth", "--out", data.root, "--preset",
                        data.synth_preset, "--seed", str(data.synth_seed)], cwd=work, env=env, check=True)
    cmd = [sys.executable, "-m", "pipeline", "tune", "--config", config, "--study", study, "--no-progress"]
    print("$", " ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, cwd=work, env=env, stdout=subprocess.PIPE, text=True)
    sys.stderr.write(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"tune failed ({proc.returncode})")
    (work / "summary.txt").write_text(proc.stdout)
    block = proc.stdout[proc.stdout.index("then, in the UI's model-training view:"):]
    return dict(re.findall(r"^  (\S.*?)\s{2,}(http\S+)$", block, re.M))


def start_ui(work: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = open(work / "mlflow-ui.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri",
                             f"sqlite:///{work / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mlflow ui exited ({proc.returncode}); see {work / 'mlflow-ui.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.read().strip() == b"OK":
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit("mlflow ui did not answer /health within 120 s")


def seed(experiment_id: str, expand: tuple[str, ...] = ()) -> dict[str, str]:
    """localStorage before the page loads: the Assistant panel closed (it opens by itself on
    127.0.0.1), model-training mode, and the given parent runs expanded in the runs table."""
    state = {"mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true", "mlflow.assistant.panelOpen_v1": "false",
             "mlflow.workflowType_v1": json.dumps("machine_learning")}
    if expand:
        key = f"MLflowLocalStorage-1.1-ExperimentPage-{json.dumps([experiment_id])}-ReactComponentState"
        state[key] = json.dumps({"runsExpanded": dict.fromkeys(expand, True)})
    return state


def shoot(browser, url: str, out: Path, wait_for: str | re.Pattern, storage: dict[str, str],
          absent: tuple[str, ...] = (), settle_ms: int = 1500, height: int = VIEWPORT["height"],
          chart_search: str | None = None) -> str:
    """Screenshot ``url`` once ``wait_for`` is visible; fail if any of ``absent`` is on the page
    (how a GenAI-mode page would show). ``chart_search`` is typed into the chart view's search box
    (charts are alphabetical and only those on screen are drawn). Returns the page's text."""
    ctx = browser.new_context(viewport={**VIEWPORT, "height": height})
    ctx.add_init_script("(s=>{for(const[k,v]of Object.entries(s))localStorage.setItem(k,v)})("
                        + json.dumps(storage) + ")")
    page = ctx.new_page()
    try:
        # "load", not "networkidle": the 3.17 UI keeps polling, so the network is never idle; the
        # page is ready when the text it must show is visible (below).
        page.goto(url, wait_until="load", timeout=60_000)
        if chart_search:
            page.get_by_placeholder("Search metric charts").fill(chart_search)
        page.get_by_text(wait_for).first.wait_for(state="visible", timeout=60_000)
        page.wait_for_timeout(settle_ms)
        text = page.inner_text("body")
        for marker in absent:
            if marker in text:
                raise SystemExit(f"{url}: the page shows {marker!r}: not the model-training view")
        page.screenshot(path=str(out))
        print(f"shot {out.name}: {url}", file=sys.stderr)
        return text
    finally:
        ctx.close()


def shrink(path: Path) -> None:
    """A 256-colour palette: UI screenshots and plots lose nothing visible and shrink 3-5x."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)
    size = path.stat().st_size
    print(f"{path.name}: {size // 1000} KB", file=sys.stderr)
    if size > MAX_BYTES:
        raise SystemExit(f"{path} is {size} bytes, over {MAX_BYTES}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo", help="preset of the session to shoot (default demo)")
    parser.add_argument("--study", default="demo")
    parser.add_argument("--out", default=str(ROOT / "docs"))
    parser.add_argument("--port", type=int, default=5055)
    parser.add_argument("--work", help="keep the session here (default: a temporary folder, removed)")
    args = parser.parse_args()
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="docs-images-"))
    work.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{args.port}"
    printed = run_session(work, args.config, args.study, base)
    missing = {"session runs", "chart comparison", "parent run", "session figures", "model version"} - set(printed)
    if missing:
        raise SystemExit(f"the summary printed no link for {sorted(missing)}")
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    parent_id = re.search(r"/runs/([0-9a-f]{32})\?", printed["parent run"]).group(1)
    parent = client.get_run(parent_id)
    exp = parent.info.experiment_id
    version = printed["model version"].split("/versions/")[1].split("?")[0]
    # Trial runs are named <arch>-<phase>-<n>: the first member's first search run.
    trial = f"{parent.data.params['session.member_studies'].split(',')[0].split('.')[-1]}-search-0"
    for name in (M.EPOCH_CURVES_PNG, M.PARAMS_PNG, M.SESSION_WEIGHT_CURVE_PNG):
        got = client.download_artifacts(parent_id, name, str(work / "figures"))
        target = out / f"session-{Path(name).name}"
        shutil.copyfile(got, target)
        shrink(target)
    genai = ("Detect Issues", "Training runs", "Evaluation runs")  # what GenAI mode shows instead
    ui = start_ui(work, args.port)
    checks = work / "shots"
    checks.mkdir(exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-quic"])
            plain = seed(exp)
            shots = [  # (file, url, wait for, localStorage, keep in docs/, chart search)
                ("ui-runs.png", links.experiment_runs(base, exp), trial, seed(exp, (parent_id,)), True, None),
                ("ui-session-runs.png", printed["session runs"], trial, plain, False, None),
                ("ui-charts.png", printed["chart comparison"], re.compile(r"^val_accuracy$"), plain, True,
                 M.VAL_ACCURACY),
                ("ui-parent-run.png", printed["parent run"], "About this run", plain, False, None),
                ("ui-session-figure.png", printed["session figures"], Path(M.EPOCH_CURVES_PNG).name, plain, True,
                 None),
                ("ui-model-version.png", printed["model version"], f"Version {version}", plain, True, None),
            ]
            for name, url, wait, storage, keep, search in shots:
                target = checks / name
                shoot(browser, url, target, wait, storage, genai, settle_ms=4000 if search else 1500,
                      chart_search=search)
                if keep:
                    shutil.copyfile(target, out / name)
                    shrink(out / name)
            browser.close()
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    if args.work:
        print(f"pictures in {out}; every page checked is in {checks}", file=sys.stderr)
    else:
        print(f"pictures in {out}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
