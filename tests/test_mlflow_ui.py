"""Compare trials in the MLflow UI, checked in a real browser (headless Chromium).

A 2-trial ablation grid runs through jobs/ablation_grid.py (tiny backbone, synthetic SST-2
rows); `mlflow server` then serves its store on a free loopback port and Chromium opens the pages
a user opens, checking the rendered text:

- the link the sweep prints (the parent run's `ui.runs_view`): the runs table (not MLflow's
  GenAI overview), the parent run and both trials by their descriptive names, the swept knob as
  a column;
- the compare page of the two trials: the swept knobs are there;
- the parent run's description (the sweep's summary) and its artifacts: the ablation report.

A screenshot of each page goes to runs/ui-screenshots/ (CI keeps it as an artifact). Without
Chromium, chromedriver or selenium the test skips, saying which; where
$LORA_DIFFUSION_REQUIRE_BROWSER=1 (.ci/run, which installs them) it fails instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from support.loopback import free_port
from support.procs import kill_session

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "runs" / "ui-screenshots"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1920,1000")
SWEEP, NAMES = "ui-grid", ("r2 seed0", "r4 seed0")


def _browser_or_skip():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    if missing:
        reason = (f"the MLflow UI test needs {', '.join(missing)} "
                  "(apt-get install chromium chromium-driver, as .ci/run does)")
        if os.environ.get("LORA_DIFFUSION_REQUIRE_BROWSER") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


@pytest.fixture
def browser(tmp_path):
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")  # a first visit
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _grid(tmp_path, backbone, data_dir) -> Path:
    grid = {"description": "ui test", "seeds": [0], "grid": {"trajectory.rank": [2, 4]},
            "reference": {"trajectory.rank": 2},
            "fixed": {"backbone": str(backbone), "data_dir": str(data_dir), "max_length": 32,
                      "max_train_examples": 32, "max_eval_examples": 16, "train_accuracy_examples": 8,
                      "train.steps": 4, "train.batch_size": 8, "train.eval_every": 2,
                      "train.warmup_steps": 1, "trajectory.injection_layers": [0],
                      "diffusion.eval_t_points": 2, "diffusion.sampler_steps": 2}}
    path = tmp_path / "grid_ui.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def _run_grid(tmp_path, backbone, data_dir, uri) -> None:
    env = {**os.environ, "LORA_DIFFUSION_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "jobs/ablation_grid.py", "--grid", str(_grid(tmp_path, backbone, data_dir)),
           "--name", SWEEP, "--max-concurrent", "2", "--address", "local", "--verbose", "0",
           "--storage-path", str(tmp_path / "sweeps"), "--tracking-uri", uri, "--retrain-seeds", "1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]


def _start_server(uri: str, log: Path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}/"


def _wait_for(proc, base: str, log: Path) -> None:
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(base + "health", timeout=2)
            return
        except OSError:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
    raise AssertionError("mlflow server did not answer in 90 s: " + log.read_text()[-3000:])


def _page(driver, url: str, shot: str, *expected: str, timeout: float = 60) -> str:
    """Open `url`, wait until the page's text holds every `expected`, screenshot it."""
    driver.get(url)
    deadline, text = time.time() + timeout, ""
    while time.time() < deadline:
        text = driver.find_element("tag name", "body").text
        if all(e in text for e in expected):
            break
        _unfold(driver)
        time.sleep(0.5)
    time.sleep(1)  # let the last requests paint (charts, artifact previews)
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / shot))
    missing = [e for e in expected if e not in text]
    assert not missing, (f"{url} (now {driver.current_url}) shows no {missing}; screenshot "
                         f"{SHOTS / shot}; the page reads: {' | '.join(text.splitlines()[:40])}")
    return text


def _unfold(driver) -> None:
    """Click "Show more" as a reader would: MLflow folds a long run description."""
    from selenium.common.exceptions import WebDriverException

    for more in driver.find_elements("xpath", "//*[normalize-space(text())='Show more']"):
        try:
            more.click()
        except WebDriverException:  # re-rendered meanwhile: the next poll finds it again
            pass


@pytest.mark.slow
def test_compare_trials_in_the_mlflow_ui(browser, tiny_backbone_dir, synthetic_data_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    uri, log = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "mlflow-server.log"
    client = MlflowClient(uri)
    client.search_experiments()  # creates the store: the server starts while the grid runs
    server, base = _start_server(uri, log)
    try:
        _run_grid(tmp_path, tiny_backbone_dir, synthetic_data_dir, uri)
        [parent] = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                      f"tags.sweep = '{SWEEP}' and tags.role = 'sweep'")
        eid, pid = parent.info.experiment_id, parent.info.run_id
        trials = client.search_runs([eid], f"tags.`mlflow.parentRunId` = '{pid}'")
        _wait_for(server, base, log)
        # what a user opens: the sweep's link (without one, the experiment's page)
        link = parent.data.tags.get("ui.runs_view", f"#/experiments/{eid}")
        _page(browser, base + link, "runs.png", SWEEP, *NAMES, "trajectory.rank")
        assert "/runs" in browser.current_url, browser.current_url

        # the pages a click on a run or on Compare opens, in the runs table's "Model training" mode
        ml = "workflowType=machine_learning"
        ids = urllib.parse.quote(json.dumps([t.info.run_id for t in trials]))
        _page(browser, f"{base}#/compare-runs?runs={ids}&experiments={urllib.parse.quote(json.dumps([eid]))}&{ml}",
              "compare.png", *NAMES, "trajectory.rank", "train.seed")

        _page(browser, f"{base}#/experiments/{eid}/runs/{pid}?{ml}", "parent.png",
              "Selected on validation", "Resume it")
        _page(browser, f"{base}#/experiments/{eid}/runs/{pid}/artifacts?{ml}", "artifacts.png", "ablation")
        browser.find_element("xpath", "//*[normalize-space(text())='ablation']").click()
        _page_text_after_click(browser, "artifacts.png", "summary.md", "pareto.png")
    finally:
        kill_session(server.pid)  # the server and its workers (a session of their own)
        server.wait(timeout=30)


def _page_text_after_click(driver, shot: str, *expected: str, timeout: float = 30) -> None:
    deadline, text = time.time() + timeout, ""
    while time.time() < deadline and not all(e in text for e in expected):
        time.sleep(0.5)
        text = driver.find_element("tag name", "body").text
    driver.save_screenshot(str(SHOTS / shot))
    assert all(e in text for e in expected), f"no {expected} in the ablation folder: {text[:2000]}"
