"""`sa3-lora train --config run.json` and `sa3-lora runs list|resume|stop|delete|show`."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

DEFAULT_RUNS_DIR = "sa3-runs"


def _manager(args, listeners=()):
    from .manager import TrainingManager

    return TrainingManager(args.runs_dir, listeners=list(listeners))


def _print_event(event: dict) -> None:
    kind = event["type"]
    if kind == "step":
        print(f"step {event['step']:>6}  loss {event['loss']:.4f}  lr {event['lr']:.2e}  "
              f"grad {event['grad_norm']:.3f}  {event.get('steps_per_s', 0):.2f} steps/s", flush=True)
    elif kind in ("checkpoint", "demo"):
        print(f"{kind}: {event.get('path') or event.get('audio')}", flush=True)
    elif kind == "status":
        print(f"status: {event['status']}" + (f" ({event['error']})" if event.get("error") else "")
              + (f" — {event['message']}" if event.get("message") else ""), flush=True)
    elif kind in ("error", "warning"):
        print(f"{kind}: {event['message']}", file=sys.stderr, flush=True)


def _follow(manager, run_id: str) -> int:
    """Wait for the run in the foreground; Ctrl-C (SIGINT) or SIGTERM stops it cleanly after saving."""
    def stop(signum, frame):
        print("stopping after the current step (a checkpoint is saved)…", file=sys.stderr, flush=True)
        manager.worker.controls[run_id].request_stop()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not manager.worker.join(run_id, 0.5):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    record = manager.registry.get(run_id)
    print(f"run {run_id}: {record['status']} at step {record['step']}  ({manager.registry.run_dir(run_id)})")
    return 0 if record["status"] in ("done", "stopped") else 1


def _cmd_train(args) -> int:
    from .runs import RunConfig

    data = json.loads(Path(args.config).read_text(encoding="utf-8"))
    for key in ("dataset", "model", "steps", "name"):
        value = getattr(args, key, None)
        if value is not None:
            data[key] = value
    config = RunConfig.from_dict(data)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .distributed import train_distributed

        return train_distributed(config, args.runs_dir)
    manager = _manager(args, [_print_event])
    run_id = manager.submit(config)
    print(f"run {run_id} in {manager.registry.run_dir(run_id)}", flush=True)
    return _follow(manager, run_id)


def _cmd_runs(args) -> int:
    manager = _manager(args, [_print_event] if args.runs_what == "resume" else [])
    if args.runs_what == "list":
        runs = manager.registry.list()
        if args.json:
            print(json.dumps(runs, indent=1))
        for r in runs:
            latest = manager.registry.latest_checkpoint(r["id"])
            print(f"{r['id']:48} {r['status']:11} {r['step']:>6}/{r['total_steps']:<6} {r['adapter_type']}/{r['rank']}"
                  f"  {latest['path'] if latest else '-'}" + (f"  error: {r['error']}" if r.get("error") else ""))
        return 0
    if args.runs_what == "show":
        print(json.dumps({"run": manager.registry.get(args.run_id), "config": manager.registry.config(args.run_id).to_dict(),
                          "latest_checkpoint": manager.registry.latest_checkpoint(args.run_id)}, indent=1))
        return 0
    if args.runs_what == "resume":
        manager.control(args.run_id, "restart")
        return _follow(manager, args.run_id)
    if args.runs_what == "stop":
        folder = manager.registry.run_dir(args.run_id)
        (folder / "stop.request").write_text("stop")  # the trainer (any process) checks for it every step
        print(f"asked {args.run_id} to stop after its current step (it saves a checkpoint first)")
        return 0
    if args.runs_what == "delete":
        manager.control(args.run_id, "delete", confirm=True)  # the command line asks nothing; the UI confirms
        print(f"deleted {args.run_id}")
        return 0
    raise AssertionError(args.runs_what)


def add_train_parsers(sub) -> None:
    p = sub.add_parser("train", help="train a LoRA-family adapter (same config schema as the SA3 Train LoRA node)")
    p.add_argument("--config", required=True, help="run config JSON (RunConfig fields)")
    p.add_argument("--runs-dir", default=DEFAULT_RUNS_DIR)
    p.add_argument("--dataset", default=None, help="override the config's dataset folder")
    p.add_argument("--model", default=None, help="override the config's model")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--name", default=None)
    p.set_defaults(func=_cmd_train)

    r = sub.add_parser("runs", help="list, show, resume or delete training runs")
    r.add_argument("--runs-dir", default=DEFAULT_RUNS_DIR)
    rs = r.add_subparsers(dest="runs_what", metavar="WHAT", required=True)
    x = rs.add_parser("list")
    x.add_argument("--json", action="store_true")
    for name, helptext in (("show", "config and state of a run"), ("resume", "resume from the last checkpoint"),
                           ("stop", "ask a running run (in any process) to save and stop"),
                           ("delete", "remove a run and its files")):
        y = rs.add_parser(name, help=helptext)
        y.add_argument("run_id")
    r.set_defaults(func=_cmd_runs)
