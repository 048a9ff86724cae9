"""Run requests across processes: `sa3-lora runs stop|save|pause|continue RUN` leave a file in the run folder, and
the process that trains the run (a worker thread, `sa3-lora train`, or rank 0 under torchrun) takes it at its next
step boundary.

This module is the one implementation of that protocol: the CLI writes requests, `Trainer.step_requests` reads them.
A request is the file `<run folder>/<kind>.request`. Taking it is a single `unlink`, which is atomic: when two
readers race, exactly one of them gets it, so each request acts once. `pause` and `continue` remove each other's
pending file, so the last one asked wins. Inside one process the same requests are `RunControl` flags
(`worker.py`); `apply_requests` turns the files into those flags, so the trainer looks at one state. Requests are
only accepted for active runs, and a run that becomes active again drops any left over (`RunRegistry.update`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..sa3.atomic import atomic_write_json
from .runs import ACTIVE, RunConflict, RunError, RunRegistry
from .worker import RunControl

REQUEST_KINDS = ("stop", "save", "pause", "continue")  # the order they are applied in
_CANCELS = {"pause": "continue", "continue": "pause"}


@dataclass(frozen=True)
class StepRequests:
    """What a run is asked to do at one step boundary (the same on every rank of a distributed run)."""

    stop: bool = False  # save (unless already saved at this step) and end with status `stopped`
    save: bool = False  # write a checkpoint now and go on
    pause: bool = False  # wait at this boundary until continued or stopped


def request_path(folder: str | Path, kind: str) -> Path:
    if kind not in REQUEST_KINDS:
        raise RunError(f"request {kind!r} is not one of {REQUEST_KINDS}")
    return Path(folder) / f"{kind}.request"


def write_request(registry: RunRegistry, run_id: str, kind: str) -> Path:
    """Ask the process training `run_id` to stop / save / pause / continue at its next step boundary.
    Refuses runs that are not active: a request left for a dead process would act on the next resume instead."""
    path = request_path(registry.run_dir(run_id), kind)  # run_dir confines the run id to the registry root
    status = registry.get(run_id)["status"]
    if status not in ACTIVE:
        hint = (f"`sa3-lora runs resume {run_id} --more-steps N` trains it further" if status == "done" else
                f"`sa3-lora runs resume {run_id}` continues it")
        raise RunConflict(f"run {run_id} is {status}, not running; {hint}")
    if kind in _CANCELS:
        path.with_name(f"{_CANCELS[kind]}.request").unlink(missing_ok=True)
    return atomic_write_json(path, {"request": kind, "time": time.time()})


def take_request(folder: str | Path, kind: str) -> bool:
    """True once per written request (the file is removed by whoever takes it)."""
    try:
        request_path(folder, kind).unlink()
    except FileNotFoundError:
        return False
    return True


def apply_requests(folder: str | Path, control: RunControl) -> None:
    """Move the pending request files of a run folder onto the run's in-process flags."""
    actions = {"stop": control.request_stop, "save": control.save_now.set, "pause": control.pause,
               "continue": control.resume}
    for kind in REQUEST_KINDS:
        if take_request(folder, kind):
            actions[kind]()


def clear_requests(folder: str | Path) -> list[str]:
    """Remove requests left over from an earlier process (a run that starts again must not act on them)."""
    return [kind for kind in REQUEST_KINDS if take_request(folder, kind)]


__all__ = ["REQUEST_KINDS", "StepRequests", "write_request", "take_request", "apply_requests", "clear_requests",
           "request_path"]
