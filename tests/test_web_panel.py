"""The "SA3 Training" web panel in headless Chromium, against the pack's real routes and a real TrainingManager.

A recorded run (events.jsonl, checkpoints, demo FLAC/PNG/JSON written by tests/web/recorded_run.py) and a live run
whose trainer is replaced by a job that writes the events the test feeds it. The page stands in for ComfyUI: stub
`scripts/app.js` / `scripts/api.js` (tests/web/stubs) load the real entry `web/sa3_panel.js`; events reach the page
over a real websocket, as ComfyUI's `send_sync` sends them. Route traversal tests need no browser.
"""

import http.client
import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from sa3_lora_studio.nodes.lora_nodes import RUN_PREFIX

sys.path.insert(0, str(Path(__file__).resolve().parent / "web"))

from browser import Browser, missing_requirements  # noqa: E402
from panel_server import PanelServer  # noqa: E402
from recorded_run import DEMO_SETTINGS, step_events, write_demo, write_recorded_run, write_reference  # noqa: E402
from sa3_lora_studio.training.events import (  # noqa: E402  # noqa: E402
    EventLog,
    best_validation,
    ema,
    loss_by_timestep,
    metrics_csv,
    read_events,
    validation_events,
)
from sa3_lora_studio.training.runs import RunConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
LIVE_HISTORY = 30


def wait_until(predicate, timeout=10.0, what="condition"):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Server + runs: `done` (60 steps, demos and checkpoints every 20), `failed`, `interrupted`, `live` (training)."""
    root = tmp_path_factory.mktemp("runs")
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.txt").write_text("TOP SECRET")
    server = PanelServer(root)
    registry = server.manager.registry
    runs = {
        "done": write_recorded_run(registry, "synth-pads", 60, 60, "done", validation_items=2),
        "failed": write_recorded_run(registry, "drum-loops", 12, 400, "failed", demo_every=0, adapter_type="lora",
                                     rank=8, error="CUDA out of memory at step 13: lower batch_size or crop_seconds"),
        "interrupted": write_recorded_run(registry, "bass-lines", 25, 100, "interrupted", demo_every=0,
                                          adapter_type="dora-cols", rank=4),
    }
    done_dir = registry.run_dir(runs["done"])
    (done_dir / "demos" / "escape.txt").symlink_to(outside / "secret.txt")
    (done_dir / "demos" / "outside").symlink_to(outside, target_is_directory=True)
    server.start()
    runs["live"] = server.manager.submit(RunConfig(dataset="datasets/tiny-synth", name="live-strings", steps=200,
                                                   adapter_type="bora", rank=32))
    feed = server.manager.feed(runs["live"])
    for event in step_events(1, LIVE_HISTORY, 200, seed=5):
        feed.put(event)
    wait_until(lambda: registry.get(runs["live"])["step"] == LIVE_HISTORY, what="the live run's history")
    server.runs, server.root, server.outside = runs, root, outside
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    why = missing_requirements()
    if why:
        pytest.skip(why)
    b = Browser()
    yield b
    b.close()


def open_panel(browser, site, width=420, theme=None, run=None, frontend=None):
    query = f"?width={width}" + (f"&theme={theme}" if theme else "") + (f"&frontend={frontend}" if frontend else "")
    browser.goto(site.url + "/" + query, width=max(1280, width + 40), height=900)
    browser.wait("document.querySelector('.sa3-panel')?.dataset.ready === 'true'", timeout=10000)
    if run:
        select(browser, run)


def select(browser, run_id):
    browser.click(f'.sa3-run[data-run-id="{run_id}"] button')
    browser.wait(f"(p => p.dataset.run === {json.dumps(run_id)} && p.dataset.loaded === 'true')"
                 "(document.querySelector('.sa3-panel'))")


def series(browser, chart):
    return browser.eval(f"document.querySelector('[data-chart={chart}]').sa3Series.map(s => "
                        "({name: s.name, steps: s.steps, values: s.values}))")


def get(site, path):
    """(status, headers, body bytes) of a raw GET (the path is sent as is, no client-side normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", site.port, timeout=10)
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, dict(response.getheaders()), response.read()


def file_route(run_id, relative):
    return f"/sa3/runs/{urllib.parse.quote(run_id)}/file?path={urllib.parse.quote(relative, safe='')}"


# ---------------------------------------------------------------------------------------------------------- routes


def test_file_route_serves_demo_audio_images_and_checkpoint_downloads(site):
    run = site.runs["done"]
    status, headers, body = get(site, file_route(run, "demos/step_000020/demo_0.flac"))
    assert status == 200 and body[:4] == b"fLaC" and headers["Content-Type"] == "audio/flac"
    status, headers, body = get(site, file_route(run, "demos/step_000020/demo_0.png"))
    assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"
    status, headers, _ = get(site, file_route(run, "checkpoints/synth-pads-step=000060.safetensors") + "&download=1")
    assert status == 200 and "attachment" in headers["Content-Disposition"]


@pytest.mark.parametrize("relative", [
    "../runs.json", "demos/../../runs.json", "..", "..\\..\\runs.json", "demos\\..\\..\\runs.json",
    "/etc/passwd", "\\etc\\passwd", "C:/Windows/win.ini", "demos/escape.txt", "demos/outside/secret.txt",
    "demos/step_000020/\x00demo_0.flac", "",
])
def test_file_route_refuses_paths_that_leave_the_run_folder(site, relative):
    status, _, body = get(site, file_route(site.runs["done"], relative))
    assert status in ((400,) if relative == "" else (403, 404)), (relative, status)  # no path at all: a bad request
    assert b"TOP SECRET" not in body and b"root:" not in body
    assert "error" in json.loads(body)


@pytest.mark.parametrize("run_id", ["..", "%2E%2E", "..%2F..", "%2Fetc", "nope"])
def test_run_routes_refuse_run_ids_outside_the_runs_folder(site, run_id):
    for path in (f"/sa3/runs/{run_id}/file?path=runs.json", f"/sa3/runs/{run_id}/events?offset=0",
                 f"/sa3/runs/{run_id}/file?path=secret.txt"):
        status, _, body = get(site, path)
        assert status in (400, 403, 404), (path, status)
        assert b"TOP SECRET" not in body and b'"id"' not in body


# ------------------------------------------------------------------------------------------------ panel maths (node)

NODE_SCRIPT = """
import * as series from %s;
let text = "";
for await (const chunk of process.stdin) text += chunk;
const events = JSON.parse(text);
console.log(JSON.stringify({
  bins: Object.fromEntries([3, 5, 7].map((n) => [n, series.lossByNoiseLevel(events, n)])),
  ema: series.ema(series.stepSeries(events, "loss").values),
  demos: series.demoSteps(events).map((s) => [s.step, s.demos.map((d) => d.index), s.checkpoint && s.checkpoint.path]),
  latest: series.latestCheckpoint(events).step,
  validation: series.validationSeries(events),
  best: series.bestValidation(events),
  eta: [series.etaSeconds(30, 200, 2.5), series.etaSeconds(200, 200, 2.5), series.etaSeconds(3, 10, 0)],
  durations: [5, 154, 7384].map(series.formatDuration),
  ticks: [[1, 2], [1, 3], [0, 60], [5, 5]].map(([a, b]) => series.stepTicks(a, b)),
}));
"""


STORE_SCRIPT = r"""
const { Store } = await import(%s);
let runs = [{ id: "only", status: "done" }];
let live = null;
const api = {
  runs: async () => runs,
  events: async (id, offset) => (offset ? { events: [], offset }
    : { events: [{ type: "warning", time: 1, message: "kept" }], offset: 1 }),
  onEvent: (cb) => { live = cb; return () => {}; },
  onReconnect: () => () => {},
};
const seen = [];
async function shownAfter(change) {
  const store = new Store(api, { storage: null });
  await store.start();
  store.subscribe("events", ({ run, events }) => seen.push([run && run.id, events.length]));
  seen.length = 0;
  await change(store);
  return seen.at(-1);
}
const result = {};
result.deleted = await shownAfter(async () => live({ run: "only", type: "deleted" }));
runs = [{ id: "only", status: "done" }];
result.folderGone = await shownAfter(async (store) => { runs = []; await store.refreshRuns(); });
runs = [{ id: "only", status: "done" }];
api.control = async () => ({ deleted: true });  // the reply came before the websocket's "deleted"
result.deletedHere = await shownAfter(async (store) => { runs = []; await store.control("delete", {}); });
// the selected run deleted with another left: that one is shown
runs = [{ id: "a", status: "done" }, { id: "b", status: "training" }];
result.another = await shownAfter(async () => {
  runs = [runs[0]];
  live({ run: "b", type: "deleted" });
  await new Promise((resolve) => setTimeout(resolve, 50));  // its history read
});
// a run queued while the panel shows none: listed and shown
runs = [];
const empty = new Store(api, { storage: null });
await empty.start();
runs = [{ id: "new", status: "queued" }];
live({ run: "new", type: "status", status: "queued" });
await empty.pendingList;
result.firstRun = empty.selectedId;
console.log(JSON.stringify(result));
"""


def test_views_of_the_selected_run_empty_when_it_goes_away_with_no_other_run():
    """The last run deleted (live event, or the panel's own delete answered first) or gone from the list (its folder
    removed): the views that follow the selected run's events (charts, log, demos) get an empty selection, not the
    gone run's history. A run that appears while none is shown is shown."""
    if shutil.which("node") is None:
        pytest.skip("node not found (see tests/web/INSTALL.sh)")
    module = json.dumps((REPO / "web" / "panel" / "store.js").as_uri())
    out = subprocess.run(["node", "--input-type=module", "-e", STORE_SCRIPT % module], capture_output=True,
                         text=True, timeout=30, check=True)
    assert json.loads(out.stdout) == {"deleted": [None, 0], "folderGone": [None, 0], "deletedHere": [None, 0],
                                      "another": ["a", 1], "firstRun": "new"}


def test_panel_curves_and_demo_grouping_equal_the_server_rules(site):
    if shutil.which("node") is None:
        pytest.skip("node not found (see tests/web/INSTALL.sh)")
    events, _ = read_events(site.manager.events_path(site.runs["done"]), 0)
    redone = [dict(e, loss=e["loss"] * 1.5, samples=[[t, x * 1.5] for t, x in e["samples"]])
              for e in events if e["type"] == "step" and 21 <= e["step"] <= 30]
    events = events + redone  # steps 21-30 trained again after a crash: the second attempt is the history
    module = json.dumps((REPO / "web" / "panel" / "series.js").as_uri())
    out = subprocess.run(["node", "--input-type=module", "-e", NODE_SCRIPT % module], input=json.dumps(events),
                         capture_output=True, text=True, timeout=30, check=True)
    got = json.loads(out.stdout)
    for bins in (3, 5, 7):
        assert got["bins"][str(bins)] == loss_by_timestep(events, bins), bins  # same op order: bit-equal
    history = {e["step"]: e["loss"] for e in events if e["type"] == "step"}  # the last event of a step wins
    assert got["ema"] == pytest.approx(ema([history[s] for s in sorted(history)]), rel=1e-12)
    assert got["bins"]["5"] != loss_by_timestep(events[: -len(redone)], 5)  # the re-done steps count
    assert got["demos"] == [[s, [0, 1], f"checkpoints/synth-pads-step={s:06d}.safetensors"] for s in (20, 40, 60)]
    assert got["latest"] == 60
    scored = validation_events(events)
    assert got["validation"] == {"steps": [e["step"] for e in scored], "values": [e["loss"] for e in scored]}
    assert got["validation"]["steps"] == [0, 20, 40, 60]
    assert got["best"] == best_validation(events) and got["best"]["step"] == 40
    assert got["eta"] == [68.0, None, None]
    assert got["durations"] == ["5 s", "2 min 34 s", "2 h 03 min"]
    assert got["ticks"] == [[[1, "start"], [2, "end"]], [[1, "start"], [2, "middle"], [3, "end"]],
                            [[0, "start"], [30, "middle"], [60, "end"]], [[5, "start"]]]  # each step labelled once
    # step 40 scored again after a resume, and the score was NaN (written as null): it has no score now, so neither
    # its stale earlier one nor a "best" at step 40, in the panel as on the server
    rescored = events + [{"type": "validation", "step": 40, "loss": None, "levels": [], "items": 2}]
    out = subprocess.run(["node", "--input-type=module", "-e", NODE_SCRIPT % module], input=json.dumps(rescored),
                         capture_output=True, text=True, timeout=30, check=True)
    again = json.loads(out.stdout)
    assert again["validation"]["steps"] == [e["step"] for e in validation_events(rescored)] == [0, 20, 60]
    assert again["best"] == best_validation(rescored) and again["best"]["step"] != 40


# --------------------------------------------------------------------------------------------------------- browser


def test_runs_list_shows_pack_adapter_status_progress_rate_and_eta(site, browser):
    open_panel(browser, site)
    rows = browser.eval("""[...document.querySelectorAll('.sa3-run')].map(r => ({
        id: r.dataset.runId, status: r.dataset.status, name: r.querySelector('.sa3-run-name').textContent,
        f: Object.fromEntries([...r.querySelectorAll('[data-field]')].map(e => [e.dataset.field, e.textContent])),
        value: r.querySelector('progress').value, max: r.querySelector('progress').max}))""")
    by_id = {r["id"]: r for r in rows}
    assert [r["id"] for r in rows][0] == site.runs["live"], "the newest run is on top"
    live, failed, done = by_id[site.runs["live"]], by_id[site.runs["failed"]], by_id[site.runs["done"]]
    assert live["name"] == "live-strings" and live["status"] == "training"
    assert live["f"]["pack"] == "sa3-small-music" and live["f"]["adapter"] == "bora r32"
    assert live["f"]["step"] == f"{LIVE_HISTORY} / 200" and (live["value"], live["max"]) == (LIVE_HISTORY, 200)
    assert live["f"]["rate"].endswith("steps/s") and live["f"]["rate"][0].isdigit()
    assert live["f"]["eta"].startswith("ETA ") and "–" not in live["f"]["eta"]
    assert failed["status"] == "failed" and "CUDA out of memory" in failed["f"]["error"]
    assert failed["f"]["adapter"] == "lora r8" and failed["f"]["step"] == "12 / 400"
    assert done["f"]["step"] == "60 / 60" and done["f"]["eta"] == "ETA –"
    assert by_id[site.runs["interrupted"]]["status"] == "interrupted"
    assert browser.call("errors") == []


@pytest.mark.parametrize("frontend", ["bottom", "legacy"])
def test_panel_falls_back_to_a_bottom_panel_tab_or_a_floating_window_on_older_frontends(site, browser, frontend):
    open_panel(browser, site, frontend=frontend)
    titles = browser.eval("app.extensions.flatMap(e => e.bottomPanelTabs || []).map(t => t.title)")
    assert titles == ["SA3 Training"]
    assert browser.eval("document.querySelectorAll('.sa3-panel').length") == 1
    assert browser.eval("document.querySelectorAll('.sa3-run').length") >= 3
    assert browser.call("errors") == []


def test_charts_plot_loss_lr_grad_norm_and_loss_by_noise_level_of_the_recorded_run(site, browser):
    open_panel(browser, site, width=1100, run=site.runs["done"])
    events, _ = read_events(site.manager.events_path(site.runs["done"]), 0)
    steps = [e for e in events if e["type"] == "step"]
    loss = series(browser, "loss")
    assert [s["name"] for s in loss] == ["raw", "smoothed", "validation"]
    assert loss[0]["steps"] == list(range(1, 61)) and loss[0]["values"] == [e["loss"] for e in steps]
    assert loss[1]["values"] == pytest.approx(ema([e["loss"] for e in steps]), rel=1e-12)
    scored = validation_events(events)  # the held-out items' score at step 0 and each checkpoint
    assert loss[2]["steps"] == [0, 20, 40, 60] and loss[2]["values"] == [e["loss"] for e in scored]
    best = best_validation(events)
    row = browser.eval("(() => { const r = document.querySelector('.sa3-best'); return {hidden: r.hidden, "
                       "text: r.textContent, href: r.querySelector('[data-action=download-best]').href}; })()")
    assert not row["hidden"] and f"Lowest validation loss {best['loss']:.4g} at step 40" in row["text"]
    assert "Use best (step 40)" in row["text"]
    csv_href = browser.eval("document.querySelector('[data-action=metrics-csv]').href")
    with urllib.request.urlopen(csv_href) as r:  # every step's metrics, as the command line writes them
        assert r.headers["Content-Type"].startswith("text/csv")
        assert f'filename="{site.runs["done"]}-metrics.csv"' in r.headers["Content-Disposition"]
        assert r.read().decode() == metrics_csv(events)
    assert row["href"].endswith("path=" + urllib.parse.quote(best["path"], safe="") + "&download=1")
    assert series(browser, "lr")[0]["values"] == pytest.approx([e["lr"] for e in steps], rel=1e-12)
    assert series(browser, "grad_norm")[0]["values"] == [e["grad_norm"] for e in steps]
    assert series(browser, "delta_norm")[0]["values"] == [e["delta_norm"] for e in steps]

    # one smoothed line per noise-level bin, equal to the server's /loss_by_timestep (one rule, two languages)
    with urllib.request.urlopen(site.url + f"/sa3/runs/{site.runs['done']}/loss_by_timestep?bins=5") as r:
        bins = json.load(r)["bins"]
    assert bins == loss_by_timestep(events, 5)
    with urllib.request.urlopen(site.url + f"/sa3/runs/{site.runs['done']}") as r:
        one = json.load(r)  # the record carries its latest checkpoint, as the list of runs does
    assert one["run"]["latest_checkpoint"] == one["latest_checkpoint"] and one["latest_checkpoint"]["step"] > 0
    lbt = series(browser, "loss_by_noise")
    assert [s["name"] for s in lbt] == ["t 0.0–0.2", "t 0.2–0.4", "t 0.4–0.6", "t 0.6–0.8", "t 0.8–1.0"]
    for drawn, served in zip(lbt, bins):
        assert drawn["steps"] == served["steps"]
        assert drawn["values"] == pytest.approx(served["smoothed"], rel=1e-12)
    legend = browser.eval("[...document.querySelectorAll('[data-chart=loss_by_noise] .sa3-legend-item')]"
                          ".map(e => e.textContent)")
    assert len(legend) == 5

    # hover shows step and value; the keyboard moves the same cursor
    browser.call("hover", selector="[data-chart=loss] svg", x=200, y=80)
    readout = browser.eval("document.querySelector('[data-chart=loss] .sa3-readout').textContent")
    assert readout.startswith("step ") and "smoothed:" in readout
    browser.eval("document.querySelector('[data-chart=lr]').focus()")
    browser.call("key", key="End")
    assert browser.eval("document.querySelector('[data-chart=lr]').dataset.cursorStep") == "60"
    ARTIFACTS.mkdir(exist_ok=True)
    browser.call("screenshot", path=str(ARTIFACTS / "panel.png"), fullPage=True)
    assert browser.call("errors") == []


def test_demos_timeline_has_players_spectrograms_settings_and_a_step_slider(site, browser):
    open_panel(browser, site, width=1100, run=site.runs["done"])
    browser.wait("document.querySelectorAll('.sa3-demo').length === 2")
    assert browser.eval("document.querySelector('.sa3-slider-label').textContent") == "Step 60 (3 of 3)"
    cards = browser.eval("""[...document.querySelectorAll('.sa3-demo')].map(c => ({
        step: c.dataset.step, prompt: c.querySelector('.sa3-demo-prompt').textContent,
        settings: c.querySelector('.sa3-demo-settings').textContent,
        audio: c.querySelector('audio').getAttribute('src'), image: c.querySelector('img').getAttribute('src')}))""")
    assert [c["step"] for c in cards] == ["60", "60"]
    assert cards[0]["prompt"] == DEMO_SETTINGS[0]["prompt"] and cards[1]["prompt"] == "(unconditional)"
    assert cards[0]["settings"].startswith("base · CFG 7 · 50 steps · seed 1")
    assert cards[1]["settings"].startswith("ARC · CFG 1 · 8 steps · seed 3")
    assert cards[0]["settings"].endswith("-11.9 LUFS as generated, -6.1 dB")  # brought to the run's demo loudness
    assert cards[1]["settings"].endswith("-41.5 LUFS as generated, +20.0 dB (max gain limit)")
    assert cards[0]["audio"].endswith("path=demos%2Fstep_000060%2Fdemo_0.flac")
    # the browser really decodes the FLAC and the PNG through the route
    browser.wait("[...document.querySelectorAll('.sa3-demo img')].every(i => i.complete && i.naturalWidth > 0)")
    browser.wait("[...document.querySelectorAll('.sa3-demo audio')].every(a => a.duration > 1)")

    browser.eval("(s => { s.value = '0'; s.dispatchEvent(new Event('input')); })"
                 "(document.querySelector('.sa3-slider'))")
    assert browser.eval("[...document.querySelectorAll('.sa3-demo')].map(c => c.dataset.step)") == ["20", "20"]
    assert browser.eval("document.querySelector('[data-action=use-step]').disabled") is False
    href = browser.eval("document.querySelector('[data-action=download-step]').getAttribute('href')")
    assert "step%3D000020.safetensors" in href and href.endswith("&download=1")  # that step's file, not the newest
    status, headers, body = get(site, href.split("/api", 1)[-1] if "/api/" in href else href)
    assert status == 200 and "attachment" in headers.get("Content-Disposition", "") and body[8:9] == b"{"

    # play-through: when the last demo of step 20 ends, step 40's first demo plays
    browser.wait("[...document.querySelectorAll('.sa3-demo audio')].every(a => a.duration > 1)")
    browser.eval("(a => { a.currentTime = a.duration - 0.05; return a.play(); })"
                 "([...document.querySelectorAll('.sa3-demo audio')].pop())")
    browser.wait("document.querySelector('.sa3-slider').value === '1' && "
                 "!document.querySelector('.sa3-demo audio').paused", timeout=5000)
    assert browser.eval("document.querySelector('.sa3-demo').dataset.step") == "40"
    browser.eval("document.querySelectorAll('audio').forEach(a => a.pause())")
    assert browser.call("errors") == []


def control_posts(site, run_id, action):
    return [p for m, p in site.requests if m == "POST" and p == f"/api/sa3/runs/{run_id}/{action}"]


def test_pause_continue_and_save_buttons_call_the_run_routes(site, browser):
    live = site.runs["live"]
    control = site.manager.worker.controls[live]
    open_panel(browser, site, run=live)

    browser.click("[data-action=pause]")
    wait_until(lambda: control.paused, what="the pause to reach the run")
    wait_until(lambda: len(control_posts(site, live, "pause")) == 1, what="POST pause")
    wait_until(lambda: site.manager.registry.get(live)["status"] == "paused", what="status paused")
    browser.wait(f"document.querySelector('.sa3-run[data-run-id=\"{live}\"]').dataset.status === 'paused'")
    browser.wait("document.querySelector('.sa3-controls [data-action=resume]')?.textContent === 'Continue'")

    browser.click(".sa3-controls [data-action=resume]")
    wait_until(lambda: not control.paused, what="the run to continue")
    wait_until(lambda: len(control_posts(site, live, "resume")) == 1, what="POST resume")
    browser.wait(f"document.querySelector('.sa3-run[data-run-id=\"{live}\"]').dataset.status === 'training'")

    browser.click("[data-action=save]")
    wait_until(lambda: len(control_posts(site, live, "save")) == 1, what="POST save")
    checkpoint = f"checkpoints/live-strings-step={LIVE_HISTORY:06d}.safetensors"
    wait_until(lambda: (site.manager.registry.run_dir(live) / checkpoint).exists(), what="the saved checkpoint")
    browser.wait(f"document.querySelector('[data-action=use]').textContent === 'Use step {LIVE_HISTORY}'")
    assert browser.call("errors") == []


def test_resume_stop_and_confirmed_delete_call_the_run_routes(site, browser):
    registry = site.manager.registry
    interrupted, failed = site.runs["interrupted"], site.runs["failed"]
    open_panel(browser, site, run=interrupted)
    assert browser.eval("document.querySelector('[data-action=stop]').disabled") is True

    browser.click("[data-action=restart]")
    wait_until(lambda: site.manager.worker.is_running(interrupted), what="the resumed run to start")
    wait_until(lambda: len(control_posts(site, interrupted, "restart")) == 1, what="POST restart")
    browser.wait(f"document.querySelector('.sa3-run[data-run-id=\"{interrupted}\"]').dataset.status === 'training'")

    browser.click("[data-action=stop]")
    wait_until(lambda: len(control_posts(site, interrupted, "stop")) == 1, what="POST stop")
    wait_until(lambda: registry.get(interrupted)["status"] == "stopped", what="status stopped")
    browser.wait(f"document.querySelector('.sa3-run[data-run-id=\"{interrupted}\"]').dataset.status === 'stopped'")

    select(browser, failed)
    browser.click("[data-action=delete]")
    assert browser.eval("!document.querySelector('.sa3-confirm').hidden "
                        "&& document.activeElement.dataset.action === 'cancel-delete'")
    browser.click("[data-action=cancel-delete]")
    assert control_posts(site, failed, "delete") == [] and registry.run_dir(failed).is_dir()
    browser.click("[data-action=delete]")
    browser.click("[data-action=confirm-delete]")
    browser.wait(f"!document.querySelector('.sa3-run[data-run-id=\"{failed}\"]')")
    wait_until(lambda: len(control_posts(site, failed, "delete")) == 1, what="POST delete")
    assert not (site.root / failed).exists() and failed not in [r["id"] for r in registry.list()]
    assert browser.call("errors") == []


def test_page_opened_mid_run_shows_history_and_live_events_appear_without_reload(site, browser):
    live = site.runs["live"]
    registry = site.manager.registry
    step = registry.get(live)["step"]
    open_panel(browser, site, width=1100, run=live)
    site.wait_for_sockets(1)
    assert series(browser, "loss")[0]["steps"] == list(range(1, step + 1))
    reads = len([p for _, p in site.requests if "/events" in p])

    feed = site.manager.feed(live)
    for event in step_events(step + 1, step + 10, 200, seed=5):
        feed.put(event)
    browser.wait(f"document.querySelector('[data-chart=loss]').sa3Series[0].steps.length === {step + 10}")
    browser.wait(f"document.querySelector('.sa3-run[data-run-id=\"{live}\"] [data-field=step]').textContent "
                 f"=== '{step + 10} / 200'")
    demo = write_demo(registry.run_dir(live), step + 10, 0, DEMO_SETTINGS[0])
    feed.put({"type": "demo", **demo})
    browser.wait(f"document.querySelector('.sa3-demo')?.dataset.step === '{step + 10}'")
    # a checkpoint and its validation score: the orange curve and the best checkpoint follow without a reload
    rel = f"checkpoints/live-strings-step={step + 10:06d}.safetensors"
    feed.put({"type": "checkpoint", "step": step + 10, "path": rel, "state_path": rel.replace(".safetensors", ".state.pt")})
    feed.put({"type": "validation", "step": step + 10, "loss": 0.0123, "levels": [[0.5, 0.0123]], "items": 1})
    browser.wait("!document.querySelector('.sa3-best').hidden")
    assert f"Lowest validation loss 0.0123 at step {step + 10}" in browser.eval(
        "document.querySelector('.sa3-best').textContent")
    assert series(browser, "loss")[-1]["name"] == "validation"
    assert len([p for _, p in site.requests if "/events" in p]) == reads, "live events must not poll the route"

    # a run submitted while the page is open (from a node) shows up from its first event
    new = site.manager.submit(RunConfig(dataset="datasets/other", name="fresh-run", steps=50))
    browser.wait(f"document.querySelector('.sa3-run[data-run-id=\"{new}\"]')?.dataset.status === 'training'")
    site.manager.control(new, "stop")
    assert browser.call("errors") == []


def test_panel_catches_up_from_the_events_route_after_a_websocket_reconnect(site, browser):
    live = site.runs["live"]
    registry = site.manager.registry
    open_panel(browser, site, run=live)
    site.wait_for_sockets(1)
    step = registry.get(live)["step"]
    site.accept_sockets = False
    site.drop_sockets()
    feed = site.manager.feed(live)
    for event in step_events(step + 1, step + 5, 200, seed=5):
        feed.put(event)
    wait_until(lambda: registry.get(live)["step"] == step + 5, what="steps written while disconnected")
    assert len(series(browser, "loss")[0]["steps"]) == step, "nothing arrives while the socket is down"
    site.accept_sockets = True
    browser.wait(f"document.querySelector('[data-chart=loss]').sa3Series[0].steps.length === {step + 5}",
                 timeout=8000)
    steps = series(browser, "loss")[0]["steps"]
    assert steps == list(range(1, step + 6)), "caught up once, without duplicates"
    assert [e for e in browser.call("errors") if "WebSocket connection" not in e] == []  # refused on purpose


def test_the_run_id_is_shown_and_copied_for_the_run_id_field_of_the_status_and_control_nodes(site, browser):
    done = site.runs["done"]
    open_panel(browser, site, run=done)
    browser.wait(f"document.querySelector('.sa3-run-id')?.textContent === '{done}'")
    browser.click("[data-action=copy-id]")
    browser.wait(f"document.querySelector('.sa3-message').textContent.includes('{done}')")
    assert "run_id" in browser.eval("document.querySelector('[data-action=copy-id]').title")


def test_queued_and_interrupted_runs_say_what_they_are_and_messages_stay_with_their_run(site, browser):
    live, done = site.runs["live"], site.runs["done"]
    open_panel(browser, site, run=live)
    site.wait_for_sockets(1)
    assert "sa3.step" in browser.eval("window.typesAtRegister")  # listened for before any setup(): none is unknown
    row = f".sa3-run[data-run-id=\"{live}\"]"
    browser.wait(f"document.querySelector('{row} [data-field=rate]').textContent.endsWith('steps/s') && "
                 f"/\\d/.test(document.querySelector('{row} [data-field=rate]').textContent)")
    feed = site.manager.feed(live)
    feed.put({"type": "status", "status": "queued"})  # waiting for the device: its last speed no longer applies
    browser.wait(f"document.querySelector('{row}').dataset.status === 'queued'")
    assert browser.eval(f"document.querySelector('{row} [data-field=rate]').textContent") == "– steps/s"
    assert browser.eval(f"document.querySelector('{row} [data-field=eta]').textContent") == "ETA –"
    feed.put({"type": "status", "status": "interrupted"})
    browser.wait(f"document.querySelector('{row} [data-field=interrupted]') !== null")
    note = browser.eval(f"document.querySelector('{row} [data-field=interrupted]').textContent")
    saved = site.manager.registry.latest_checkpoint(live)
    assert note == (f"Stopped unexpectedly (a restart or crash) at step {site.manager.registry.get(live)['step']}; "
                    f"Resume continues from the checkpoint of step {saved['step']}." if saved else
                    "Stopped unexpectedly (a restart or crash) before its first checkpoint; Resume starts it again.")
    browser.click("[data-action=copy-id]")
    browser.wait(f"document.querySelector('.sa3-message').textContent.includes('{live}')")
    browser.click(f".sa3-run[data-run-id=\"{done}\"] .sa3-run-select")
    browser.wait("document.querySelector('.sa3-message').textContent === ''")  # it was about the other run
    feed.put({"type": "status", "status": "training"})
    assert browser.call("errors") == []


def test_the_text_a_node_returns_is_shown_on_the_node_and_not_saved_with_the_workflow(site, browser):
    """ComfyUI's frontend keeps a node's returned text in the history only: our extension puts it on the node, and
    an empty text (a generation without warnings) takes it off."""
    open_panel(browser, site)
    shown = browser.eval(r"""(async () => {
      const { showText, RESULT_WIDGET } = await import('/extensions/sa3_lora_studio/sa3_node_text.js');
      const ext = app.extensions.find((e) => e.name === 'sa3_lora_studio.node_text');
      function NodeType() {}
      const calls = [];
      NodeType.prototype.onExecuted = function (m) { calls.push(m); };
      await ext.beforeRegisterNodeDef(NodeType, {name: 'SA3RunStatus'});
      function Other() {}
      await ext.beforeRegisterNodeDef(Other, {name: 'KSampler'});
      const node = Object.assign(new NodeType(), {widgets: [], size: [200, 80],
        addWidget(type, name, value, cb, options) { const w = {type, name, value, options}; this.widgets.push(w); return w; },
        setSize(size) { this.size = size; }, computeSize() { return [200, 80]; }});
      const settle = async (want) => {  // the first call imports ComfyUI's widget module (absent here)
        for (let i = 0; i < 100 && node.widgets.find((x) => x.name === RESULT_WIDGET)?.value !== want; i++) {
          await new Promise((r) => setTimeout(r, 20));
        }
      };
      node.onExecuted({text: ['kept: done step 3/3', 'lowest validation loss 0.01 at step 2']});
      await settle('kept: done step 3/3\nlowest validation loss 0.01 at step 2');
      const first = node.widgets.find((x) => x.name === RESULT_WIDGET)?.value;
      const grown = [...node.size];
      node.onExecuted({text: ['kept: training step 4/9']});
      await settle('kept: training step 4/9');
      node.onExecuted({text: ['kept: done step 3/3', 'lowest validation loss 0.01 at step 2']});
      await settle('kept: done step 3/3\nlowest validation loss 0.01 at step 2');
      const again = [...node.size];
      node.onExecuted({text: ['kept: training step 4/9']});
      await settle('kept: training step 4/9');
      const w = node.widgets.find((x) => x.name === RESULT_WIDGET);
      const shownCount = node.widgets.length;
      let removed = 0;
      w.onRemove = () => { removed++; };
      node.onExecuted({});  // a message without text (another output) leaves the box alone
      const kept = node.widgets.length;
      node.onExecuted({text: []});  // a generation without warnings after one with: the box goes
      const sizeAfter = [...node.size];
      return {first, grown, again, value: w.value, count: shownCount, serialize: w.serialize, calls: calls.length,
              other: Other.prototype.onExecuted === undefined, typeof: typeof showText,
              kept, cleared: node.widgets.length, removed, sizeKept: sizeAfter.join() === again.join()};
    })()""")
    assert shown.pop("grown") == shown.pop("again") == [360, 80 + 2 * 15]  # room for 2 lines; runs again: no growth
    assert shown == {"first": "kept: done step 3/3\nlowest validation loss 0.01 at step 2",
                     "value": "kept: training step 4/9", "count": 1, "serialize": False, "calls": 6,
                     "other": True, "typeof": "function", "kept": 1, "cleared": 0, "removed": 1, "sizeKept": True}


SHOWN_THOUGH_HIDDEN = ("[...document.querySelectorAll('.sa3-panel [hidden]')]"
                      ".filter((el) => getComputedStyle(el).display !== 'none').map((el) => el.className)")


def test_hidden_parts_take_no_space_and_keep_nothing_of_the_run_shown_before(site, browser):
    """Rows styled as flex boxes stay out of sight when hidden (the best row, the step slider), and a run without
    validation keeps no link to another run's best checkpoint."""
    runs = site.runs
    open_panel(browser, site, run=runs["done"])
    browser.wait("!document.querySelector('.sa3-best').hidden")
    listed = browser.eval("[...document.querySelectorAll('.sa3-run')].map((li) => li.dataset.runId)")
    others = [run for run in listed if run != runs["done"]]  # (other tests may have deleted some)
    assert others
    for run in [*others, runs["done"], *others]:
        browser.click(f".sa3-run[data-run-id=\"{run}\"] .sa3-run-select")
        browser.wait(f"document.querySelector('.sa3-run.sa3-selected')?.dataset.runId === '{run}'")
        assert browser.eval(SHOWN_THOUGH_HIDDEN) == [], run
    best = browser.eval("(() => { const r = document.querySelector('.sa3-best'); return {hidden: r.hidden, "
                        "text: r.textContent, links: [...r.querySelectorAll('a[href]')].length}; })()")
    assert best["hidden"] and best["links"] == 0 and "Lowest validation loss" not in best["text"]


def test_use_checkpoint_adds_a_configured_sa3_load_lora_node_or_copies_the_name(site, browser):
    done = site.runs["done"]
    name = "synth-pads-step=000060.safetensors"
    open_panel(browser, site, run=done)
    browser.eval(f"window.loraChoices = ['other.safetensors', 'sa3_runs/{done}/checkpoints/{name}']")
    browser.click("[data-action=use]")
    browser.wait("window.app.graph.nodes.length === 1")
    node = browser.eval("({type: app.graph.nodes[0].type, lora: app.graph.nodes[0].widgets[0].value})")
    assert node == {"type": "SA3LoadLoRA", "lora": f"sa3_runs/{done}/checkpoints/{name}"}
    assert "Added an SA3 Load LoRA node" in browser.eval("document.querySelector('.sa3-message').textContent")

    # a checkpoint saved after the page loaded is not in the combo yet: the run's own entry, as the server lists it,
    # never another run's of the same name (runs named alike have files named alike)
    browser.eval(f"window.loraChoices = ['other.safetensors', 'sa3 runs/another-run/{name}']")
    browser.click("[data-action=use]")
    browser.wait("window.app.graph.nodes.length === 2")
    added = browser.eval("({lora: app.graph.nodes[1].widgets[0].value, values: app.graph.nodes[1].widgets[0].options.values})")
    assert added == {"lora": f"sa3 runs/{done}/{name}",
                     "values": [f"sa3 runs/{done}/{name}", "other.safetensors", f"sa3 runs/another-run/{name}"]}
    assert added["lora"].startswith(RUN_PREFIX)  # the server's own spelling (nodes/lora_nodes.py)

    browser.eval("window.LiteGraph.createNode = () => null")  # node type missing: fall back to the file name
    browser.click("[data-action=use]")
    browser.wait(f"document.querySelector('.sa3-message').textContent.includes({json.dumps(name)})")
    assert browser.eval("app.graph.nodes.length") == 2


CONTRAST = """(() => {
  const rgb = (c) => c.match(/[\\d.]+/g).map(Number);
  const lum = ([r, g, b]) => [r, g, b].map(v => v / 255).map(v => v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4)
    .reduce((s, v, i) => s + v * [0.2126, 0.7152, 0.0722][i], 0);
  const background = (el) => {
    for (; el; el = el.parentElement) {
      const c = rgb(getComputedStyle(el).backgroundColor);
      if (c.length < 4 || c[3] > 0) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const out = [];
  for (const sel of ['.sa3-run-name', '.sa3-run-meta span', '.sa3-run-numbers span', '.sa3-status', '.sa3-run-error',
                     '.sa3-button:not(:disabled)', '.sa3-chart-title', '.sa3-legend-item', '.sa3-demo-prompt',
                     '.sa3-demo-settings', '.sa3-slider-label', '.sa3-controls h3', 'text.sa3-axis']) {
    for (const el of document.querySelectorAll(sel)) {
      const style = getComputedStyle(el);
      const fg = rgb(el instanceof SVGElement ? style.fill : style.color).slice(0, 3);
      const [a, b] = [lum(fg), lum(background(el.closest('svg') || el))].sort((x, y) => y - x);
      out.push({sel, ratio: (a + 0.05) / (b + 0.05)});
    }
  }
  return out;
})()"""


@pytest.mark.parametrize("theme", ["dark", "light"])
def test_text_is_readable_and_controls_are_labelled_and_focusable_in_both_themes(site, browser, theme):
    open_panel(browser, site, width=1100, theme=theme, run=site.runs["done"])
    browser.wait("document.querySelectorAll('.sa3-demo').length > 0")
    ratios = browser.eval(CONTRAST)
    assert {r["sel"] for r in ratios} >= {".sa3-run-name", ".sa3-status", "text.sa3-axis", ".sa3-demo-settings"}
    low = [r for r in ratios if r["ratio"] < 4.5]
    assert not low, f"{theme}: contrast below 4.5:1 for {low[:5]}"
    unlabelled = browser.eval("""[...document.querySelectorAll(`.sa3-panel button, .sa3-panel input,
        .sa3-panel a[href], .sa3-panel audio, .sa3-panel [tabindex]`)].filter(e => !(e.getAttribute('aria-label')
        || e.textContent.trim() || (e.id && document.querySelector(`label[for="${e.id}"]`)) || e.closest('label')))
        .map(e => e.outerHTML.slice(0, 80))""")
    assert unlabelled == []
    not_focusable = browser.eval("""[...document.querySelectorAll(`.sa3-panel button:not(:disabled),
        .sa3-panel input, .sa3-panel a[href], .sa3-chart`)].filter(e => e.tabIndex < 0).map(e => e.outerHTML.slice(0, 80))""")
    assert not_focusable == []


def post(site, path, body: bytes | None = None):
    """(status, parsed JSON) of a raw POST with exactly `body` as its bytes."""
    conn = http.client.HTTPConnection("127.0.0.1", site.port, timeout=10)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"} if body is not None else {})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def test_routes_answer_unknown_runs_with_404_and_bad_parameters_with_400(site):
    for path in ("/sa3/runs/nope/events", "/sa3/runs/nope/loss_by_timestep", "/sa3/runs/nope/file?path=a"):
        status, _, body = get(site, path)
        assert status == 404 and "no run" in json.loads(body)["error"], path
    assert post(site, "/sa3/runs/nope/stop")[0] == 404
    done = urllib.parse.quote(site.runs["done"])
    for query, named in (("events?offset=99999999999999999999", "offset"), ("events?offset=-1", "offset"),
                         ("events?offset=abc", "offset"), ("loss_by_timestep?bins=x", "bins"),
                         ("loss_by_timestep?bins=0", "bins")):
        status, _, body = get(site, f"/sa3/runs/{done}/{query}")
        assert status == 400 and named in json.loads(body)["error"], query


@pytest.mark.parametrize("body", [b"[1, 2]", b'"yes"', b"null", b"\xff\xfe", b"{not json"])
def test_control_route_refuses_a_body_that_is_not_a_json_object(site, body):
    status, answer = post(site, f"/sa3/runs/{urllib.parse.quote(site.runs['done'])}/delete", body)
    assert status == 400 and "JSON object" in answer["error"]
    assert site.manager.registry.run_dir(site.runs["done"]).is_dir()


def test_delete_needs_confirm_to_be_true_itself_and_a_run_whose_folder_went_missing_still_lists(site):
    registry = site.manager.registry
    run = registry.create(RunConfig(dataset="datasets/gone", name="gone"))
    registry.update(run, status="stopped")
    for confirm in ("false", "true", 1):
        status, answer = post(site, f"/sa3/runs/{run}/delete", json.dumps({"confirm": confirm}).encode())
        assert status == 400 and "confirm=true" in answer["error"]
    shutil.rmtree(registry.run_dir(run))
    status, _, body = get(site, "/sa3/runs")
    assert status == 200 and run in [r["id"] for r in json.loads(body)["runs"]]
    assert post(site, f"/sa3/runs/{run}/delete", b'{"confirm": true}') == (200, {"ok": True, "run": {
        "id": run, "deleted": True}})
    assert run not in [r["id"] for r in registry.list()]


def test_deleting_a_training_run_stops_it_and_the_panel_drops_it_when_its_files_are_gone(site, browser):
    registry = site.manager.registry
    doomed = site.manager.submit(RunConfig(dataset="datasets/tiny-synth", name="doomed", steps=50))
    site.manager.feed(doomed).put({"type": "step", "step": 1, "loss": 0.5, "lr": 1e-4, "grad_norm": 1.0,
                                   "samples": [[0.5, 0.5]]})
    wait_until(lambda: registry.get(doomed)["step"] == 1, what="the doomed run's first step")
    open_panel(browser, site, run=doomed)
    browser.click("[data-action=delete]")
    browser.click("[data-action=confirm-delete]")
    wait_until(lambda: len(control_posts(site, doomed, "delete")) == 1, what="POST delete")
    browser.wait(f"!document.querySelector('.sa3-run[data-run-id=\"{doomed}\"]')")
    wait_until(lambda: not (site.root / doomed).exists(), what="the run folder to go")
    # the thread removes the folder as its last act and is marked ended just after: wait for that too
    wait_until(lambda: not site.manager.worker.is_running(doomed), what="the doomed run's thread to end")
    assert doomed not in [r["id"] for r in registry.list()]
    assert browser.call("errors") == []


def test_a_runs_newest_warning_shows_in_its_row_live_and_after_a_reload(site, browser):
    live = site.runs["live"]
    open_panel(browser, site)
    message = "step 31: the gradient norm was inf, the update was skipped (fp16 overflow? try bf16 or fp32)"
    site.manager.feed(live).put({"type": "warning", "message": message})
    row = f"document.querySelector('.sa3-run[data-run-id=\"{live}\"] [data-field=warning]')"
    browser.wait(f"{row}?.textContent.includes('update was skipped')")
    open_panel(browser, site, run=live)  # a fresh page reads it from the run's events
    browser.wait(f"{row}?.textContent.includes('update was skipped')")
    for status in ("queued", "training"):  # a restart: the warning belonged to the attempt before it
        site.manager.feed(live).put({"type": "status", "status": status})
    site.manager.feed(live).put({"type": "status", "status": "loading", "message": "resumed from step 31"})
    browser.wait(f"!{row}")
    open_panel(browser, site, run=live)
    browser.wait(f"document.querySelector('.sa3-run[data-run-id=\"{live}\"]') && !{row}")
    # the run's log keeps every message, newest first, the warning among them
    browser.wait("document.querySelector('.sa3-log')?.dataset.count === '2'")
    browser.eval("document.querySelector('.sa3-log').open = true")
    lines = browser.eval("[...document.querySelectorAll('.sa3-log-list li')].map(li => [li.dataset.kind, "
                         "li.querySelector('.sa3-log-text').textContent])")
    assert lines == [["status", "resumed from step 31"], ["warning", message]]
    assert browser.eval("document.querySelector('.sa3-log summary').textContent") == "Log (2 messages: 1 warning)"
    # a new message goes in on top and the lines already shown stay the same nodes (a screen reader of the live
    # list announces the new one, not the whole log again)
    browser.eval("window.sa3OldestLine = document.querySelector('.sa3-log-list li:last-child')")
    site.manager.feed(live).put({"type": "error", "message": "disk full"})
    browser.wait("document.querySelector('.sa3-log')?.dataset.count === '3'")
    assert browser.eval("document.querySelector('.sa3-log-list li:last-child') === window.sa3OldestLine") is True
    assert browser.eval("[...document.querySelectorAll('.sa3-log-list li')].map(li => li.dataset.kind)") == [
        "error", "status", "warning"]
    assert browser.eval("document.querySelector('.sa3-log summary').textContent") == \
        "Log (3 messages: 1 warning, 1 error)"
    assert browser.call("errors") == []


def test_train_more_extends_a_finished_run_and_a_bad_change_is_refused_by_name(site, browser):
    registry = site.manager.registry
    finished = write_recorded_run(registry, "finished-keys", 40, 40, "done", demo_every=0)
    status, answer = post(site, f"/sa3/runs/{finished}/restart", json.dumps({"changes": {"rank": 4}}).encode())
    assert status == 400 and "rank cannot change" in answer["error"]
    status, answer = post(site, f"/sa3/runs/{finished}/stop", json.dumps({"more_steps": 5}).encode())
    assert status == 400 and "only with restart" in answer["error"]
    assert registry.get(finished)["status"] == "done" and registry.config(finished).steps == 40

    open_panel(browser, site, run=finished)
    assert browser.eval("document.querySelector('[data-action=restart]').disabled") is True  # nothing to resume
    browser.eval("(i => { i.value = '25'; })(document.querySelector('.sa3-more input'))")
    browser.click("[data-action=more]")
    wait_until(lambda: len(control_posts(site, finished, "restart")) == 1, what="POST restart")
    wait_until(lambda: site.manager.worker.is_running(finished), what="the extended run to start")
    assert registry.config(finished).steps == 65 and registry.get(finished)["total_steps"] == 65
    browser.wait(f"document.querySelector('.sa3-run[data-run-id=\"{finished}\"]').dataset.status === 'training'")
    browser.wait("document.querySelector('.sa3-message').textContent.includes('Train 25 more steps')")
    assert browser.eval("document.querySelector('[data-action=more]').disabled") is True  # training now
    site.manager.control(finished, "stop")
    wait_until(lambda: registry.get(finished)["status"] == "stopped", what="status stopped")
    assert browser.call("errors") == []


def test_dataset_clips_show_above_the_demos_and_never_start_the_play_through(site, browser):
    registry = site.manager.registry
    run = write_recorded_run(registry, "with-clips", 40, 40, "done")
    log = EventLog(registry.run_dir(run) / "events.jsonl", run)
    for i, (prompt, file) in enumerate([("dusty drums", "kits/dusty.flac"), ("tape hiss pad", "pads/hiss.wav")]):
        log.emit("reference", **write_reference(registry.run_dir(run), i, {"prompt": prompt, "file": file}))
    open_panel(browser, site, run=run)
    browser.wait("!document.querySelector('.sa3-references').hidden")
    clips = browser.eval("[...document.querySelectorAll('.sa3-reference')].map(c => ({title: c.querySelector('h4')"
                         ".textContent, prompt: c.querySelector('.sa3-demo-prompt').textContent, detail: "
                         "c.querySelector('.sa3-demo-settings').textContent, label: c.querySelector('audio')"
                         ".getAttribute('aria-label')}))")
    assert [(c["title"], c["prompt"]) for c in clips] == [("Clip 0", "dusty drums"), ("Clip 1", "tape hiss pad")]
    assert clips[0]["detail"].startswith("kits/dusty.flac · ") and "Dataset clip 0 (dusty.flac)" in clips[0]["label"]
    shown_step = browser.eval("document.querySelector('.sa3-demo:not(.sa3-reference)').dataset.step")
    browser.eval("document.querySelector('.sa3-references').open = true")
    browser.wait("[...document.querySelectorAll('.sa3-reference audio')].every(a => a.duration > 0)")
    browser.eval("(a => { a.currentTime = a.duration - 0.05; return a.play(); })"
                 "(document.querySelector('.sa3-reference audio'))")
    browser.wait("document.querySelector('.sa3-reference audio').ended", timeout=5000)
    time.sleep(0.3)
    assert browser.eval("[...document.querySelectorAll('.sa3-demo:not(.sa3-reference) audio')].every(a => a.paused)")
    assert browser.eval("document.querySelector('.sa3-demo:not(.sa3-reference)').dataset.step") == shown_step
    status, headers, _ = get(site, file_route(run, "demos/reference/ref_1.flac"))
    assert status == 200
    assert browser.call("errors") == []


def test_the_settings_card_shows_the_runs_config_and_follows_a_resume_with_other_settings(site, browser):
    registry = site.manager.registry
    run = write_recorded_run(registry, "settings-run", 40, 40, "done", adapter_type="bora", rank=8)
    open_panel(browser, site, run=run)
    browser.wait("!document.querySelector('.sa3-settings').hidden")
    field = "document.querySelector('.sa3-settings dd[data-field={}]').textContent"
    assert browser.eval(field.format("adapter")) == "bora, rank 8, alpha 8"
    assert browser.eval(field.format("steps")) == "40, batch 1, 30 s crops"
    assert browser.eval(field.format("optimiser")).startswith("lr 0.0001, betas 0.9/0.95, weight decay 0.01")
    assert browser.eval(field.format("cadence")) == "checkpoint every 20, demos every 20, demos at -18 LUFS"
    assert browser.eval(field.format("validation")) == "off"
    browser.click(".sa3-settings summary")  # the card opens
    browser.click("[data-action=copy-settings]")
    browser.wait("!document.querySelector('.sa3-settings-json').hidden")
    shown = json.loads(browser.eval("document.querySelector('.sa3-settings-json').textContent"))
    assert RunConfig.from_dict(shown) == registry.config(run)  # the JSON is a run config as it stands

    status, _ = post(site, f"/sa3/runs/{run}/restart", json.dumps({"more_steps": 10, "changes": {"lr": 5e-5}}).encode())
    assert status == 200
    browser.wait(f"{field.format('steps')} === '50, batch 1, 30 s crops'")
    assert browser.eval(field.format("optimiser")).startswith("lr 0.00005")
    site.manager.control(run, "stop")
    wait_until(lambda: registry.get(run)["status"] == "stopped", what="status stopped")
    open_panel(browser, site, run=site.runs["done"])  # a run that holds files out
    browser.wait(f"{field.format('validation')} === '2 files held out, scored with each checkpoint'")
    assert browser.call("errors") == []


def test_control_route_statuses_follow_the_kind_of_refusal(site):
    done = urllib.parse.quote(site.runs["done"])
    status, answer = post(site, f"/sa3/runs/{done}/pause")  # a finished run: its state refuses
    assert status == 409 and "has finished" in answer["error"] and "more steps" in answer["error"]
    assert post(site, f"/sa3/runs/{done}/fly")[0] == 400  # an unknown action
    status, _, _ = get(site, file_route(site.runs["done"], "../runs.json"))
    assert status == 403
    for query in ("", "?path="):
        status, _, body = get(site, f"/sa3/runs/{done}/file{query}")
        assert status == 400 and "?path=" in json.loads(body)["error"]
    assert post(site, "/sa3/runs/nope/pause")[0] == 404
    status, answer = post(site, f"/sa3/runs/{done}/restart", json.dumps({"more_steps": 10**23}).encode())
    assert status == 400 and "more_steps" in answer["error"] and "100,000,000" in answer["error"]
    with pytest.raises(ValueError, match="steps: 100000001 is more than 100,000,000 steps"):
        RunConfig(dataset="-", steps=100_000_001)


@pytest.mark.parametrize("route", ["loss_by_timestep?bins=5", "metrics.csv"])
def test_a_route_reading_a_long_runs_whole_history_leaves_the_server_answering_meanwhile(site, monkeypatch, route):
    """Those routes parse every event of a run (100 000 steps: some 40 MB, seconds of work): on ComfyUI's event
    loop they would stall every other request and the websocket; here the reading is held until /sa3/runs answers."""
    import threading

    from sa3_lora_studio.nodes import routes

    reading, release, real = threading.Event(), threading.Event(), routes.read_all_events

    def slow_read(path):
        reading.set()
        assert release.wait(30), "the test never let the read finish"
        return real(path)
    monkeypatch.setattr(routes, "read_all_events", slow_read)
    answers = []
    slow = threading.Thread(target=lambda: answers.append(get(site, f"/sa3/runs/{site.runs['done']}/{route}")))
    slow.start()
    try:
        assert reading.wait(10)
        conn = http.client.HTTPConnection("127.0.0.1", site.port, timeout=5)
        conn.request("GET", "/sa3/runs")
        assert conn.getresponse().status == 200 and not answers  # answered while the history is still being read
    finally:
        release.set()
        slow.join(30)
    assert answers and answers[0][0] == 200


def test_a_bad_process_setting_is_answered_as_json_naming_it_by_every_route():
    """SA3_RUNS_PER_DEVICE=0 stops the runs from starting: each route says so, not aiohttp's bare 500 page."""
    import asyncio

    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    from sa3_lora_studio.nodes.routes import route_table
    from sa3_lora_studio.nodes.training_nodes import manager_options

    def get_manager():
        return manager_options({"SA3_RUNS_PER_DEVICE": "0"})

    async def ask() -> list[tuple[int, dict]]:
        app = web.Application()
        for method, path, handler in route_table(get_manager):
            app.router.add_route(method, path, handler)
        async with TestClient(TestServer(app)) as client:
            answers = []
            for method, path in (("GET", "/sa3/runs"), ("GET", "/sa3/runs/x/events"), ("POST", "/sa3/runs/x/stop")):
                response = await client.request(method, path)
                answers.append((response.status, await response.json()))
            return answers
    for status, answer in asyncio.run(ask()):
        assert status == 500 and answer["error"].startswith("SA3_RUNS_PER_DEVICE='0' (an environment variable of SA3 "
                                                            "LoRA Studio): use a whole number >= 1; set it right and "
                                                            "restart ComfyUI")


def test_a_run_whose_config_is_damaged_is_still_shown_with_the_reason(site):
    registry = site.manager.registry
    run = registry.create(RunConfig(dataset="datasets/x", name="damaged config"))
    registry.update(run, status="stopped")
    (registry.run_dir(run) / "config.json").write_text("{not json")
    status, _, body = get(site, f"/sa3/runs/{run}")
    answer = json.loads(body)
    assert status == 200 and answer["run"]["id"] == run and answer["config"] is None
    assert "config.json is unreadable" in answer["config_error"]
    assert get(site, "/sa3/runs/nope")[0] == 404


def test_loss_by_timestep_can_answer_a_chart_sized_sample_of_each_bin(site):
    """A long run's bins hold every sample (18 MB for 100 000 steps); ?points=N gives N evenly spaced ones per bin,
    the last always, with the full curve's smoothed values at them."""
    done = site.runs["done"]
    full = json.loads(get(site, f"/sa3/runs/{done}/loss_by_timestep?bins=2")[2])["bins"]
    status, _, body = get(site, f"/sa3/runs/{done}/loss_by_timestep?bins=2&points=5")
    assert status == 200
    for whole, sample in zip(full, json.loads(body)["bins"]):
        assert len(whole["loss"]) > 5 and len(sample["loss"]) == 5
        picked = [round(i * (len(whole["loss"]) - 1) / 4) for i in range(5)]
        for key in ("steps", "loss", "smoothed"):
            assert sample[key] == [whole[key][i] for i in picked], key
        assert sample["steps"][-1] == whole["steps"][-1] and (sample["lo"], sample["hi"]) == (whole["lo"], whole["hi"])
    assert json.loads(get(site, f"/sa3/runs/{done}/loss_by_timestep?bins=2&points=0")[2])["bins"] == full
    for bad in ("1", "-2", "x"):
        status, _, body = get(site, f"/sa3/runs/{done}/loss_by_timestep?points={bad}")
        assert status == 400 and "points" in json.loads(body)["error"], bad
