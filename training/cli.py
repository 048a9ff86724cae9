"""`sa3-lora train --config run.json` and `sa3-lora runs list|show|resume|stop|save|pause|continue|delete`.

Control commands work on a run trained by any process (a worker thread in ComfyUI, `sa3-lora train`, torchrun
ranks): they leave a request file in the run folder (`requests.py`) that the trainer takes at its next step."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from pathlib import Path

from .runs import ACTIVE, RESUME_SETTINGS, RunConflict, RunError, describe_changes, trained_elsewhere

DEFAULT_RUNS_DIR = "sa3-runs"


def _manager(args, listeners=()):
    from .manager import TrainingManager

    return TrainingManager(args.runs_dir, listeners=list(listeners))


def _event_printer(args):
    """`_print_event` with the command's --quiet (no step lines) and --log-every N (every Nth step line)."""
    quiet, every = getattr(args, "quiet", False), max(1, getattr(args, "log_every", 1) or 1)

    def print_event(event: dict) -> None:
        if event["type"] == "step" and (quiet or event["step"] % every):
            return
        _print_event(event)
    return print_event


def _print_event(event: dict) -> None:
    kind = event["type"]
    if kind == "step":
        print(f"step {event['step']:>6}  loss {event['loss']:.4f}  lr {event['lr']:.2e}  "
              f"grad {event['grad_norm']:.3f}  {event.get('steps_per_s', 0):.2f} steps/s", flush=True)
    elif kind in ("checkpoint", "demo"):
        print(f"{kind}: {event.get('path') or event.get('audio')}", flush=True)
    elif kind == "validation" and event.get("loss") is not None:
        levels = "  ".join(f"t={t:.1f} {loss:.4f}" for t, loss in event.get("levels", []))
        items = event.get("items")
        print(f"validation at step {event['step']}: loss {event['loss']:.4f}"
              + (f" on {items} held-out file{'s' * (items != 1)}" if items else "")
              + (f"  ({levels})" if levels else ""), flush=True)
    elif kind == "status":
        print(f"status: {event['status']}" + (f" ({event['error']})" if event.get("error") else "")
              + (f" — {event['message']}" if event.get("message") else ""), flush=True)
    elif kind in ("error", "warning"):
        print(f"{kind}: {event['message']}", file=sys.stderr, flush=True)


def _runs_dir_option(manager) -> str:
    """" --runs-dir DIR" for a command to paste, unless the runs folder is the default one here."""
    root = manager.registry.root.resolve()  # absolute: the command may be pasted in another folder
    return "" if root == Path(DEFAULT_RUNS_DIR).resolve() else f" --runs-dir {shlex.quote(str(root))}"


def _follow(manager, run_id: str) -> int:
    """Wait for the run in the foreground; Ctrl-C (SIGINT) or SIGTERM stops it cleanly after saving. Returns 0 when
    it finished or another process stopped it, 128 + the signal's number when a signal here stopped it (the shell's
    convention: `train && generate` does not go on after a Ctrl-C), 1 when it failed."""
    signals = []

    def stop(signum, frame):
        if signals:
            print("still stopping: the checkpoint is being saved…", file=sys.stderr, flush=True)
        else:
            print("stopping after the current step (a checkpoint is saved)…", file=sys.stderr, flush=True)
            manager.worker.controls[run_id].request_stop()
        signals.append(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not manager.worker.join(run_id, 0.5):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    record = manager.registry.get(run_id)
    print(f"run {run_id}: {record['status']} at step {record['step']}  ({manager.registry.run_dir(run_id)})")
    if record["status"] != "done":
        print(f"resume it with: sa3-lora runs{_runs_dir_option(manager)} resume {run_id}", flush=True)
    if record["status"] == "stopped":
        return 128 + signals[0] if signals else 0
    return 0 if record["status"] == "done" else 1


def _cmd_train(args) -> int:
    from ..sa3.atomic import writable_folder_problem
    from .preflight import check_run_inputs
    from .runs import RunConfig

    try:
        data = json.loads(Path(args.config).read_text(encoding="utf-8"))
    except OSError as e:
        raise RunError(f"--config {args.config}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise RunError(f"{args.config}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise RunError(f"{args.config}: a run config is a JSON object of RunConfig fields, not {type(data).__name__}")
    for key in ("dataset", "model", "steps", "name"):
        value = getattr(args, key, None)
        if value is not None:
            data[key] = value
    try:
        config = RunConfig.from_dict(data).with_absolute_paths(Path(args.config).resolve().parent)
    except RunError as e:  # name the file: the field may come from it or from an option above
        raise RunError(f"{args.config}: {e}") from None
    run_id = os.environ.get("SA3_RUN_ID") or None  # set by `sa3-lora runs resume`: continue that run
    problem = writable_folder_problem(args.runs_dir)
    if problem:
        raise RunError(f"--runs-dir {args.runs_dir}: {problem}; give a runs folder you can write to")
    if run_id is None:
        check_run_inputs(config)  # before a run folder is made for it
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .distributed import train_distributed

        return train_distributed(config, args.runs_dir, run_id=run_id, listeners=[_event_printer(args)])
    if run_id is None:
        manager = _manager(args, [_event_printer(args)])
        run_id = manager.submit(config)
        print(f"run {run_id} in {manager.registry.run_dir(run_id)}", flush=True)
        return _follow(manager, run_id)
    return _resume_here(args, run_id, changes={"steps": config.steps})


def _resume_here(args, run_id: str, changes: dict | None = None, more_steps: int = 0) -> int:
    """Resume `run_id` in this process (one device) from its last checkpoint and follow it, its settings amended
    first by `changes` / `more_steps` (`RunRegistry.amend`: e.g. a finished run trained further)."""
    manager = _manager(args, [_event_printer(args)])  # marks runs whose process died as interrupted
    _refuse_if_running(manager.registry, run_id)
    before = int(manager.registry.get(run_id).get("world_size") or 1)
    manager.control(run_id, "restart", changes=changes, more_steps=more_steps)
    manager.registry.update(run_id, world_size=1)  # only once the restart was accepted
    if before > 1:
        from .distributed import world_size_change

        print(f"warning: {world_size_change(before, 1, manager.registry.config(run_id).batch_size)}", flush=True)
    return _follow(manager, run_id)


def _refuse_if_running(registry, run_id: str) -> None:
    """Before touching a run's files from here (call after `mark_interrupted_after_restart`)."""
    record = registry.get(run_id)
    if trained_elsewhere(record):
        raise RunConflict(f"run {run_id} is {record['status']} in another process; stop it first "
                       f"(`sa3-lora runs stop {run_id}`)")


def torchrun_command(runs_dir: str | Path, run_id: str, nproc: int, quiet: bool = False,
                     log_every: int = 1) -> list[str]:
    """The command that resumes a run on `nproc` local processes (torchrun is `python -m torch.distributed.run`;
    `--standalone` picks a free rendezvous port), printing as `add_output_args`' quiet and log_every say."""
    from .runs import RunRegistry

    folder = RunRegistry(runs_dir).run_dir(run_id)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "sa3_lora_studio", "train", "--config", str(folder / "config.json"),
            "--runs-dir", str(Path(runs_dir).resolve()), *(["--quiet"] if quiet else []),
            *(["--log-every", str(log_every)] if log_every != 1 else [])]


def _resume_distributed(args, run_id: str, nproc: int) -> int:
    """Relaunch a run under torchrun the way it ran; its output goes to ours; returns torchrun's exit code.
    Ctrl-C reaches torchrun through the terminal's process group (it forwards it to the ranks, which save and
    stop); a SIGTERM sent to this process is passed on to torchrun."""
    import subprocess

    from .runs import RunRegistry

    _refuse_if_running(RunRegistry(args.runs_dir), run_id)
    command = torchrun_command(args.runs_dir, run_id, nproc, getattr(args, "quiet", False),
                               getattr(args, "log_every", 1))
    print(f"resuming {run_id} on {nproc} processes: {' '.join(command)}", flush=True)
    proc = subprocess.Popen(command, env=dict(os.environ, SA3_RUN_ID=run_id))

    def forward(signum, frame):
        if signum == signal.SIGTERM:
            proc.send_signal(signum)  # SIGINT from a terminal already reached torchrun itself

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _cmd_runs(args) -> int:
    from .requests import write_request
    from .runs import RunRegistry

    if not Path(args.runs_dir).is_dir():  # not made here: a runs folder typed wrong, or this is another directory
        where = Path(args.runs_dir).resolve()
        if where.exists():
            raise RunError(f"--runs-dir {where} is a file, not a folder; give the folder `sa3-lora train` used")
        if args.runs_what == "list":
            print(f"no runs: {where} does not exist (the runs folder is relative to the current directory unless "
                  "--runs-dir says otherwise)", file=sys.stderr)
            return 0
        raise RunError(f"no runs folder at {where}; give the folder `sa3-lora train` used with --runs-dir")
    registry = RunRegistry(args.runs_dir)  # not a TrainingManager: these commands start nothing in this process
    registry.mark_interrupted_after_restart()  # runs whose process died (live ones elsewhere keep their status)
    if getattr(args, "run_id", None) is not None:  # a name, `latest` or the start of an id stands for the run
        if args.runs_what == "delete" and args.run_id.strip() == "latest":
            raise RunError("runs delete takes the run's id or name, not latest: it removes the run without asking")
        args.run_id = registry.find(args.run_id, exact=args.runs_what == "delete")  # deleting asks nothing
    if getattr(args, "run_ids", None):
        args.run_ids = [registry.find(r) for r in args.run_ids]
    if args.runs_what == "list":
        runs = registry.list()
        if args.json:
            print(json.dumps(runs, indent=1))
            return 0
        if not runs:
            print(f"no runs in {Path(args.runs_dir).resolve()}", file=sys.stderr)
        for r in runs:
            if not registry.run_dir(r["id"], must_exist=False).is_dir():  # deleted by hand: listed, to be deleted
                print(f"{r['id']:48} folder missing (`sa3-lora runs delete {r['id']}` removes its record)")
                continue
            latest = registry.latest_checkpoint(r["id"])
            print(f"{r['id']:48} {r['status']:11} {r['step']:>6}/{r['total_steps']:<6} {r['adapter_type']}/{r['rank']}"
                  + (f" ×{r['world_size']}" if r.get("world_size", 1) > 1 else "")
                  + f"  {latest['path'] if latest else '-'}" + (f"  error: {r['error']}" if r.get("error") else ""))
        return 0
    if args.runs_what == "show":
        from .events import best_validation, read_all_events

        events = read_all_events(registry.run_dir(args.run_id) / "events.jsonl")
        print(json.dumps({"run": registry.get(args.run_id), "config": registry.config(args.run_id).to_dict(),
                          "latest_checkpoint": registry.latest_checkpoint(args.run_id),
                          "best_validation": best_validation(events)}, indent=1))
        return 0
    if args.runs_what == "metrics":
        from .events import metrics_csv, read_all_events

        registry.get(args.run_id)  # an unknown run is named, not an empty table
        events = read_all_events(registry.run_dir(args.run_id) / "events.jsonl")
        text = metrics_csv(events)
        if args.out:
            Path(args.out).write_text(text, encoding="utf-8")
            print(f"wrote {text.count(chr(10)) - 1} steps of {args.run_id} to {args.out}", file=sys.stderr)
        else:
            sys.stdout.write(text)
        return 0
    if args.runs_what == "tensorboard":
        from .tensorboard import export_run

        for run_id in args.run_ids:
            if registry.get(run_id)["status"] in ACTIVE:  # its trainer writes that folder: rebuilding would cut it off
                raise RunError(f"run {run_id} is {registry.get(run_id)['status']}: it writes its TensorBoard folder "
                               "itself; rebuild once it has stopped")
        for run_id in args.run_ids:
            print(f"{run_id}: {export_run(registry.run_dir(run_id))}")
        print(f"view with: tensorboard --logdir {registry.root}", file=sys.stderr)
        return 0
    if args.runs_what == "resume":
        nproc = args.nproc if args.nproc is not None else int(registry.get(args.run_id).get("world_size") or 1)
        if nproc < 1:
            raise ValueError("--nproc must be >= 1")
        changes = resume_changes(args)
        if nproc > 1:
            _refuse_if_running(registry, args.run_id)
            _, changed = registry.amend(args.run_id, changes, args.more_steps)
            if changed:
                print(describe_changes(changed), flush=True)
            return _resume_distributed(args, args.run_id, nproc)
        return _resume_here(args, args.run_id, changes, args.more_steps)
    if args.runs_what in ("stop", "save", "pause", "continue"):
        write_request(registry, args.run_id, args.runs_what)  # the training process takes it at its next step
        print(f"asked {args.run_id} to {REQUEST_MESSAGES[args.runs_what]}")
        return 0
    if args.runs_what == "delete":
        # the command line asks nothing (the UI confirms); refused while another live process trains the run
        _manager(args).control(args.run_id, "delete", confirm=True)
        print(f"deleted {args.run_id}")
        return 0
    raise AssertionError(args.runs_what)


def resume_changes(args) -> dict:
    """The settings `runs resume` changes: --steps, --lr and each --set FIELD=VALUE (VALUE read as JSON, else as
    text), for `RunRegistry.amend` (which names what may change)."""
    changes = {}
    for item in args.set or ():
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise RunError(f"--set {item!r}: write FIELD=VALUE, e.g. --set demo_every=100")
        try:
            changes[name.strip()] = json.loads(text)
        except ValueError:
            changes[name.strip()] = text  # a bare word: demo_format=opus
    for flag, field, value in (("--steps", "steps", args.steps), ("--lr", "lr", args.lr)):
        if value is None:
            continue
        if field in changes and changes[field] != value:  # which one was meant cannot be guessed
            raise RunError(f"{flag} {value:g} and --set {field}={changes[field]} disagree: give one of them")
        changes[field] = value
    return changes


RUNS_DIR_HELP = f"the folder holding the runs (default: {DEFAULT_RUNS_DIR} in the current folder)"


def add_output_args(p) -> None:
    """How much a training command prints as it trains."""
    p.add_argument("--quiet", action="store_true", help="no line per step (checkpoints, demos, status, warnings and "
                   "errors still print)")
    p.add_argument("--log-every", type=int, default=1, metavar="N", help="print every Nth step's line (default 1)")


REQUEST_MESSAGES = {"stop": "save and stop after its current step",
                    "save": "write a checkpoint after its current step",
                    "pause": "pause after its current step (`sa3-lora runs continue` goes on)",
                    "continue": "continue"}


def add_train_parsers(sub) -> None:
    p = sub.add_parser("train", help="train a LoRA-family adapter (same config schema as the SA3 Train LoRA node)")
    p.add_argument("--config", required=True, help="run config JSON (RunConfig fields; relative paths in it are "
                   "taken from the current folder, else from the config file's, and stored absolute)")
    p.add_argument("--runs-dir", default=DEFAULT_RUNS_DIR, help=RUNS_DIR_HELP)
    p.add_argument("--dataset", default=None, help="override the config's dataset folder")
    p.add_argument("--model", default=None, help="override the config's model")
    p.add_argument("--steps", type=int, default=None, help="override the config's number of steps")
    p.add_argument("--name", default=None, help="override the config's run name")
    add_output_args(p)
    p.epilog = ("With SA3_RUN_ID=<run id> in the environment the command resumes that run (its own saved config; "
                "only `steps` is taken from --config/--steps). Under torchrun it trains on WORLD_SIZE processes.")
    p.set_defaults(func=_cmd_train)

    r = sub.add_parser("runs", help="list, show, control, resume or delete training runs")
    r.add_argument("--runs-dir", default=DEFAULT_RUNS_DIR, help=RUNS_DIR_HELP)
    rs = r.add_subparsers(dest="runs_what", metavar="WHAT", required=True)
    x = rs.add_parser("list", help="runs with status, step (×N processes) and latest checkpoint")
    x.add_argument("--json", action="store_true", help="the runs as a JSON list (nothing else on stdout)")
    x.add_argument("--runs-dir", default=argparse.SUPPRESS, help=RUNS_DIR_HELP)  # after the subcommand too
    for name, helptext in (
            ("show", "config and state of a run"),
            ("metrics", "a run's metrics as CSV (step, loss, lr, grad norm, loss per noise level, validation loss, "
                        "checkpoints) on stdout or into --out"),
            ("resume", "resume a stopped, interrupted, failed or finished run from its last checkpoint, on as "
                       "many processes as it ran on (a torchrun run is relaunched under torchrun); --more-steps, "
                       "--steps, --lr and --set change its settings first"),
            ("stop", "ask a running run (in any process) to save and stop"),
            ("save", "ask a running run (in any process) to write a checkpoint now and go on"),
            ("pause", "ask a running run (in any process) to pause at its next step"),
            ("continue", "continue a paused run (in any process)"),
            ("delete", "remove a run and its files")):
        y = rs.add_parser(name, help=helptext, description=helptext)
        y.add_argument("run_id", metavar="RUN", help="the run's whole id or its name (delete asks nothing)"
                       if name == "delete" else "the run's id, its name, the start of its id (at least its date), "
                       "or latest")
        y.add_argument("--runs-dir", default=argparse.SUPPRESS, help=RUNS_DIR_HELP)
        if name == "metrics":
            y.add_argument("--out", default=None, help="write the CSV to this file instead of stdout")
        if name == "resume":
            add_output_args(y)
            y.add_argument("--steps", type=int, default=None, help="this run's new number of steps, not counting "
                           "a continued file's own (a finished run trains on to it)")
            y.add_argument("--more-steps", type=int, default=0, help="train this many steps more than the run's "
                           "total (a finished run goes on)")
            y.add_argument("--lr", type=float, default=None, help="a new learning rate from here on")
            y.add_argument("--set", action="append", metavar="FIELD=VALUE",
                           help="change another setting before resuming, e.g. --set demo_every=100 --set "
                                "batch_size=2 (JSON values); allowed: " + ", ".join(RESUME_SETTINGS)
                                + "; and dataset=NEW_FOLDER when the run's dataset moved (the same files only)")
            y.add_argument("--nproc", type=int, default=None,
                           help="number of processes (default: the run's own; 1 = in this process). batch_size "
                                "is per process, so the global batch becomes batch_size × N: another N changes "
                                "the run from here on (the same N continues exactly)")
    t = rs.add_parser("tensorboard", help="rebuild runs' TensorBoard logs (<run>/tensorboard/) from their events, "
                      "for runs trained with tensorboard off or from before it", description="Runs log for TensorBoard "
                      "as they train (RunConfig.tensorboard, on by default): `tensorboard --logdir RUNS_DIR` shows "
                      "them all. This rebuilds a run's TensorBoard folder from its events.jsonl.")
    t.add_argument("run_ids", nargs="+", metavar="RUN", help="ids, names, starts of ids, or latest")
    t.add_argument("--runs-dir", default=argparse.SUPPRESS, help=RUNS_DIR_HELP)
    r.set_defaults(func=_cmd_runs)
