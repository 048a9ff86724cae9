"""Screenshot of the SA3 Training panel for the README (docs/panel.png).

    python tests/web/panel_screenshot.py                      # a recorded tiny run (tests/web/recorded_run.py)
    python tests/web/panel_screenshot.py --runs <runs folder> # a real runs folder, e.g. after a tiny-model run

Serves the real /sa3 routes over the runs folder with the test page (tests/web/index.html) and saves a PNG.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from browser import Browser, missing_requirements  # noqa: E402
from panel_server import REPO, PanelServer  # noqa: E402
from recorded_run import step_events, write_recorded_run  # noqa: E402
from sa3_lora_studio.training.runs import RunConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, help="runs folder to show (default: write a recorded run)")
    parser.add_argument("--run", help="run id to select (default: the panel's choice)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "panel.png")
    parser.add_argument("--width", type=int, default=1240)
    parser.add_argument("--height", type=int, default=820)
    parser.add_argument("--theme", choices=("dark", "light"), default="dark")
    args = parser.parse_args()
    why = missing_requirements()
    if why:
        sys.exit(why)
    root = args.runs or Path(tempfile.mkdtemp(prefix="sa3-panel-"))
    server = PanelServer(root)
    select = args.run
    if args.runs is None:
        registry = server.manager.registry
        write_recorded_run(registry, "drum-loops", 12, 400, "failed", demo_every=0, adapter_type="lora", rank=8,
                           error="CUDA out of memory at step 13: lower batch_size or crop_seconds")
        select = write_recorded_run(registry, "synth-pads", 80, 80, "done")
    server.start()
    if args.runs is None:
        live = server.manager.submit(RunConfig(dataset="datasets/tiny-synth", name="live-strings", steps=400,
                                               adapter_type="bora", rank=32))
        for event in step_events(1, 45, 400, seed=5):
            server.manager.feed(live).put(event)
        time.sleep(1.0)
    browser = Browser()
    try:
        browser.goto(f"{server.url}/?width={args.width}&theme={args.theme}", width=args.width, height=args.height)
        browser.wait("document.querySelector('.sa3-panel')?.dataset.ready === 'true'")
        if select:
            browser.click(f'.sa3-run[data-run-id="{select}"] button')
        browser.wait("document.querySelector('.sa3-panel').dataset.loaded === 'true' "
                     "&& !document.querySelector('.sa3-settings').hidden")
        browser.eval("document.querySelectorAll('.sa3-references, .sa3-settings').forEach(d => { d.open = true; })")
        browser.wait("[...document.querySelectorAll('.sa3-demo img')].every(i => i.complete && i.naturalWidth > 0)")
        time.sleep(0.3)
        browser.call("hover", selector="[data-chart=loss] svg", x=260, y=70)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        browser.call("screenshot", path=str(args.out))
        print(f"wrote {args.out} ({args.out.stat().st_size // 1024} kB)")
    finally:
        browser.close()
        server.stop()


if __name__ == "__main__":
    main()
