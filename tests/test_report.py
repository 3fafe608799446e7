"""esper.report: an HTML report built from a real (tiny) PPO run, rendered in headless Chromium;
--watch, esper.train --report, esper.evaluate --plot, and the refusals."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_config import TINY

from esper import evaluate, train
from esper.leyline.events import EventKind, TelemetryEvent
from esper.nissa.backends import JsonlBackend
from esper.report.__main__ import main as report_main
from esper.report.build import Report, summary, write_report
from esper.report.telemetry import TelemetryReader
from esper.report.watch import watch

FIGURES = ("accuracy", "timeline", "blueprints", "rewards", "ppo", "anomalies")
SECTIONS = (*FIGURES, "config")


class Page(HTMLParser):
    """Section ids, and each section's <img> sources and attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, list[dict[str, str]]] = {}
        self.current: str | None = None
        self.refresh = False
        self.text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "section":
            self.current = a.get("id")
            self.sections[self.current] = []
        elif tag == "img" and self.current is not None:
            self.sections[self.current].append(a)
        elif tag == "meta" and a.get("http-equiv") == "refresh":
            self.refresh = True

    def handle_data(self, data: str) -> None:
        self.text += data


def parse(html: str) -> Page:
    page = Page()
    page.feed(html)
    return page


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One round of PPO over 2 envs x 3 epochs, env 1's loss turned NaN at epoch 2 (a fault
    drill: the governor rolls it back), with --report: the report is written at the end."""
    tmp = tmp_path_factory.mktemp("report")
    config = tmp / "tiny.json"
    config.write_text(json.dumps({**TINY, "faults": {"nan_loss_envs": [1], "at_epoch": 2}}))
    run_dir = tmp / "run"
    rc = train.main(["--config", str(config), "--rounds", "1", "--backends", "jsonl", "--run-dir", str(run_dir),
                     "--report"])
    assert rc == 0
    return run_dir


def test_report_of_a_real_ppo_run_has_every_section(ppo_run: Path) -> None:
    first = json.loads((ppo_run / "telemetry.jsonl").read_text().splitlines()[0])
    assert first["kind"] == "run" and first["payload"]["config"]["episode"]["envs"] == 2
    html = (ppo_run / "report.html").read_text()  # written by esper.train --report
    page = parse(html)
    assert list(page.sections) == list(SECTIONS)
    for sid in FIGURES:
        (img,) = page.sections[sid]
        assert img["alt"] and img["src"].startswith("data:image/png;base64,"), sid
        pixels = png_pixels(base64.b64decode(img["src"].split(",", 1)[1]))
        assert pixels.shape[0] > 150 and pixels.shape[1] > 800, sid
        assert pixels.std() > 20 and (pixels.min(axis=2) < 200).mean() > 0.02, f"{sid} figure is blank"
    assert not page.sections["config"] and '"shallow"' in page.text  # the config table, from the run event
    assert "governor" in page.text and "rolled back" in page.text  # the drill's rollback, listed
    assert "1 rounds" in page.text and "2 envs x 3 slots, 3 epochs" in page.text
    assert not page.refresh and "<script" not in html
    assert not re.search(r"(src|href)=\"(https?:)?//", html)  # self-contained: nothing fetched


def test_large_run_options_draw_a_subset(ppo_run: Path, tmp_path: Path) -> None:
    out = write_report(ppo_run, tmp_path / "r.html", draw=1, rows=3)
    text = parse(out.read_text()).text
    assert "1 of 2 envs in full" in text and "mean" in text
    assert "1 of 2 envs; slots per env, top to bottom: early, mid, late." in text


def test_latest_run_of_a_reused_run_dir_is_shown(ppo_run: Path, tmp_path: Path) -> None:
    once = (ppo_run / "telemetry.jsonl").read_text()
    (tmp_path / "telemetry.jsonl").write_text(once + once)  # the same run dir used twice
    report = Report(tmp_path)
    report.update()
    assert report.run.earlier_runs == 1 and report.run.steps == 3 and len(report.run.ppo) == 1
    assert ("earlier runs", "1 earlier run(s) in the same files; the latest is shown") in summary(report.run, report.reader)


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium; .ci/run does)")
    return exe


def _run_chromium(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)


def test_report_renders_in_headless_chromium(ppo_run: Path, tmp_path: Path) -> None:
    exe = _chromium()
    html = (ppo_run / "report.html").read_text()
    # A copy that records, once loaded, each image's decoded size on the element itself.
    probe = ("<script>window.addEventListener('load', () => document.querySelectorAll('img').forEach(i => "
             "i.setAttribute('data-decoded', i.complete ? i.naturalWidth + 'x' + i.naturalHeight : 'no')));</script>")
    copy = tmp_path / "probe.html"
    copy.write_text(html.replace("</body>", probe + "</body>"))
    dom = _run_chromium(exe, tmp_path / "profile1", "--dump-dom", copy.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = parse(dom.stdout)
    for sid in FIGURES:
        (img,) = page.sections[sid]
        w, h = (int(v) for v in img["data-decoded"].split("x"))
        assert w > 800 and h > 150, f"{sid}: the browser did not decode its figure"
    shot = tmp_path / "shot.png"
    result = _run_chromium(exe, tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1100,3000",
                           (ppo_run / "report.html").as_uri())
    assert shot.exists(), result.stderr[-2000:]
    pixels = png_pixels(shot.read_bytes())
    assert pixels.shape[:2] == (3000, 1100)
    assert pixels.std() > 20 and (pixels.min(axis=2) < 200).mean() > 0.05, "the screenshot is blank"


def test_watch_follows_the_growing_telemetry(ppo_run: Path, tmp_path: Path) -> None:
    lines = (ppo_run / "telemetry.jsonl").read_text().splitlines(keepends=True)
    half = next(i for i, ln in enumerate(lines) if json.loads(ln)["kind"] == "episode")  # before an episode ends
    live = tmp_path / "telemetry.jsonl"
    live.write_text("".join(lines[:half]))
    pages: list[str] = []

    def grow() -> None:
        with live.open("a") as f:
            f.write("".join(lines[half:]))

    def on_write(path: Path) -> None:
        pages.append(path.read_text())
        if len(pages) == 1:
            threading.Timer(0.3, grow).start()

    final = watch(Report(tmp_path), interval=0.5, on_write=on_write, max_writes=2)
    first, second = parse(pages[0]), parse(pages[1])
    assert first.refresh and second.refresh and "reloads every 1 s" in first.text
    assert "episodes ended" not in first.text and "2 episodes ended" in second.text
    assert not parse(final.read_text()).refresh  # the page stays still once watching stops


def test_watch_stops_cleanly_on_sigint(ppo_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(ppo_run / "telemetry.jsonl", tmp_path / "telemetry.jsonl")

    def ctrl_c_once_written() -> None:  # the handler is in place before the first write
        deadline = time.monotonic() + 60
        while not (tmp_path / "report.html").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c_once_written, daemon=True).start()
    assert report_main(["--watch", str(tmp_path), "--interval", "0.5"]) == 0
    out, err = capsys.readouterr()
    assert "stopped watching" in out and "Traceback" not in err
    assert not parse((tmp_path / "report.html").read_text()).refresh
    assert not list(tmp_path.glob(".report.html.*.tmp"))


def test_reader_follows_rotation(tmp_path: Path) -> None:
    backend = JsonlBackend(tmp_path / "telemetry.jsonl", max_bytes=300, backups=5)
    reader = TelemetryReader(tmp_path)
    got: list[int] = []
    for i in range(30):
        backend.emit(TelemetryEvent(kind=EventKind.EPISODE, env=0, epoch=i, payload={"pad": "x" * 40}))
        backend.flush()
        if i % 4 == 0:
            got += [e["epoch"] for e in reader.poll()]
    got += [e["epoch"] for e in reader.poll()]
    backend.close()
    assert len(list(tmp_path.glob("telemetry.jsonl.*"))) == 5  # rotated several times over
    assert got == list(range(30))  # every event once, in order, across the renames


def test_evaluate_plot_draws_per_env_points(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    plot, out = tmp_path / "cmp.png", tmp_path / "eval.json"
    rc = evaluate.main(["--policies", "static,heuristic", "--config", str(config), "--backends", "none",
                        "--json", str(out), "--plot", str(plot)])
    assert rc == 0 and f"plot {plot}" in capsys.readouterr().out
    for r in json.loads(out.read_text())["results"].values():
        per_env = r["per_env"]
        assert per_env["env"] == [0, 1] and len(per_env["test_acc"]) == len(per_env["params_added"]) == 2
        assert np.isclose(np.mean(per_env["test_acc"]), r["test_acc"]["mean"])
    pixels = png_pixels(plot.read_bytes())
    assert pixels.shape[1] > 800 and pixels.std() > 20
    assert evaluate.main(["--policies", "static", "--config", str(config), "--plot", str(tmp_path / "x.jpg")]) == 2
    assert "error: cannot tell the image format" in capsys.readouterr().err


def test_refusals_in_the_one_error_format(ppo_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def refused(argv: list[str], *words: str) -> None:
        assert report_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "(RUN_DIR); " in err and all(w in err for w in words), err

    refused([str(tmp_path / "absent")], "does not exist")
    refused([str(tmp_path)], "no telemetry.jsonl")
    (tmp_path / "file").write_text("")
    refused([str(tmp_path / "file")], "not a directory")
    only_run = (ppo_run / "telemetry.jsonl").read_text().splitlines()[0]
    (tmp_path / "telemetry.jsonl").write_text(only_run + "\n")
    refused([str(tmp_path)], "holds no epoch")
    assert not (tmp_path / "report.html").exists()
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    assert train.main(["--policy", "heuristic", "--config", str(config), "--backends", "console", "--report"]) == 2
    assert "error: --report reads the run's JSONL telemetry" in capsys.readouterr().err


@pytest.mark.parametrize("interval", ["inf", "nan", "0.1"])
def test_watch_interval_must_be_finite(tmp_path: Path, interval: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``--interval inf`` was a traceback (the page's refresh is an integer) after watching began."""
    assert report_main(["--watch", str(tmp_path), "--interval", interval]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --interval ") and "(--interval); a finite number >= 0.5" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "report.html").exists()
