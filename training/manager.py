"""The training manager: a run registry plus a background worker, and the control actions routes and nodes call.

Inside ComfyUI one manager lives for the process (`nodes/training_nodes.py` creates it under the output folder);
the CLI makes its own. Listeners receive every event (ComfyUI forwards them to the browser over its websocket).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from .events import EventLog, notify
from .requests import write_request
from .runs import ACTIVE, RunConfig, RunConflict, RunError, RunRegistry, describe_changes, describe_owner, trained_elsewhere
from .worker import RunControl, TrainingWorker

ACTIONS = ("stop", "pause", "resume", "save", "restart", "delete")
_REQUEST_FOR = {"stop": "stop", "pause": "pause", "resume": "continue", "save": "save"}  # cross-process requests


def device_key(config: RunConfig) -> str:
    """The queue a run waits in: its device as the trainer resolves it ("auto", "cuda" and "cuda:0" are one card)."""
    from .trainer import pick_device

    try:
        return str(pick_device(config.device))
    except RuntimeError:  # a device name torch does not know: the trainer reports it when the run starts
        return config.device


class TrainingManager:
    def __init__(self, root: str | Path, listeners: list[Callable[[dict], None]] | None = None,
                 runs_per_device: int = 1, model_provider=None, auto_resume: bool = False):
        self.registry = RunRegistry(root)
        self.listeners = list(listeners or [])
        self.model_provider = model_provider  # (spec, variant, dtype, device) -> SA3Model; shares loaded models
        self._delete_lock = threading.Lock()
        self.worker = TrainingWorker(self._job, per_device=runs_per_device)
        interrupted = self.registry.mark_interrupted_after_restart()
        if auto_resume:
            for run_id in interrupted:
                try:
                    self.control(run_id, "restart")
                except (RunError, OSError) as e:  # one unreadable run must not keep the others (or ComfyUI) down
                    self.event_log(run_id).emit("warning", message=f"not resumed automatically: {e}")

    def events_path(self, run_id: str) -> Path:
        return self.registry.run_dir(run_id) / "events.jsonl"

    def event_log(self, run_id: str) -> EventLog:
        return EventLog(self.events_path(run_id), run_id, self.listeners)

    def submit(self, config: RunConfig) -> str:
        run_id = self.registry.create(config.with_absolute_paths())
        self.event_log(run_id).emit("status", status="queued")
        self.worker.submit(run_id, device_key=device_key(config))
        return run_id

    def same_settings_run(self, config: RunConfig) -> dict | None:
        """The newest run whose stored config equals `config` (paths made absolute as `submit` stores them), or was
        queued with it before a restart changed its settings (more steps, another learning rate), or None."""
        wanted = config.with_absolute_paths().to_dict()
        for record in reversed(self.registry.list()):
            if wanted.get("name") and record.get("name") != wanted["name"]:
                continue  # the index says so: no need to read that run's config
            try:
                submitted = self.registry.submitted_config(record["id"])
                if wanted in (self.registry.config(record["id"]).to_dict(), submitted and submitted.to_dict()):
                    return record
            except (RunError, OSError):  # a run whose config cannot be read is no match
                continue
        return None

    def active_runs_on(self, config: RunConfig) -> list[dict]:
        """Runs queued or training on the device `config` would train on (a new run waits for them)."""
        key = device_key(config)
        out = []
        for record in self.registry.list():
            if record.get("status") not in ACTIVE:
                continue
            try:
                if device_key(self.registry.config(record["id"])) == key:
                    out.append(record)
            except (RunError, OSError):
                continue
        return out

    def _job(self, run_id: str, control: RunControl) -> None:
        try:
            self._run_job(run_id, control)
        finally:
            if control.delete_when_done:  # deleted while it trained: the folder goes once nothing writes to it
                self._delete(run_id)


    def _run_job(self, run_id: str, control: RunControl) -> None:
        from .trainer import run_training

        run_training(self.registry, run_id, control, self.event_log(run_id), model_provider=self.model_provider)

    def control(self, run_id: str, action: str, confirm: bool = False, changes: dict | None = None,
                more_steps: int = 0) -> dict:
        """stop | pause | resume (continue a paused run) | save (checkpoint now) | restart (resume an interrupted,
        stopped, failed or finished run from its last checkpoint; `changes` and `more_steps` amend its settings
        first, `RunRegistry.amend`: e.g. more_steps=500 trains a finished run 500 steps further) | delete (needs
        confirm=True). Never blocks: a running run deleted stops at its next step boundary and its folder goes when
        its thread ends."""
        if action not in ACTIONS:
            raise RunError(f"action {action!r} is not one of {ACTIONS}")
        if (changes or more_steps) and action != "restart":
            raise RunError(f"settings change only with restart, not {action}: more steps and new settings apply to "
                           "restart")
        record = self.registry.get(run_id)
        control = self.worker.controls.get(run_id)
        if control is not None and control.delete_when_done and action != "delete":
            raise RunConflict(f"run {run_id} is being deleted: it stops at its next step, then its folder goes")
        started = self.worker.is_running(run_id)
        queued = not started and run_id in self.worker.queued()
        if not (started or queued) and trained_elsewhere(record):
            if action in ("delete", "restart"):
                owner = describe_owner(record["owner"])
                raise RunConflict(f"run {run_id} is being trained by another process ({owner}); stop it first "
                               f"(its checkpoint is kept), then {action}")
            write_request(self.registry, run_id, _REQUEST_FOR[action])  # taken at that process's next step
            return {**self.registry.get(run_id), "requested": action}
        if action == "delete" and confirm is not True:  # checked before anything changes
            raise RunError("delete needs confirm=true (it removes the run's checkpoints and demos)")
        if queued and action in ("stop", "delete") and not self.worker.cancel_queued(run_id):
            started, queued = True, False  # it started in between: treat it as running
        if queued and action in ("stop", "delete"):
            if action == "delete":
                return self._delete(run_id)
            self.registry.update(run_id, status="stopped")
            self.event_log(run_id).emit("status", status="stopped", message="stopped before it started")
            return self.registry.get(run_id)
        if action == "delete":
            if started:  # the panel drops it on the listeners' "deleted" event
                control.delete_when_done = True
                control.request_stop()
                if self.worker.join(run_id, 0):  # it ended meanwhile: its job may have checked the flag before
                    return self._delete(run_id)
                return {"id": run_id, "deleted": False, "deleting": True}
            return self._delete(run_id)
        if action == "restart":
            if started or queued:
                raise RunConflict(f"run {run_id} is already {record['status']}")
            config, changed = self.registry.amend(run_id, changes, more_steps, queue=True)  # a second: refused
            try:
                total = self.registry.get(run_id).get("total_steps")
                extra = {"message": describe_changes(changed), "changed": sorted(changed)} if changed else {}
                self.event_log(run_id).emit("status", status="queued", total_steps=total, **extra)
                self.worker.submit(run_id, device_key=device_key(config))
            except BaseException:  # not queued after all: never left "queued" with no worker to take it, nor with
                self.registry.undo_amend(run_id)  # settings a retry would amend a second time
                self.registry.update(run_id, status=record["status"])
                raise
            return self.registry.get(run_id)
        if not control or not (started or queued):
            if record["status"] == "done":
                raise RunConflict(f"run {run_id} has finished (step {record.get('step')}); to train it further, "
                                  "restart it with more steps (more_steps)")
            raise RunConflict(f"run {run_id} is not running (status {record['status']}); use restart to resume it")
        if action == "save" and queued:
            raise RunConflict(f"run {run_id} is queued and has not trained yet: nothing to save")
        if action == "stop":
            control.request_stop()
        elif action == "pause":
            control.pause()  # a queued run starts paused
        elif action == "resume":
            control.resume()
        elif action == "save":
            control.save_now.set()
        return self.registry.get(run_id)

    def _delete(self, run_id: str) -> dict:
        """Remove the run (once: a second caller racing the first finds it gone) and tell the listeners."""
        with self._delete_lock:
            try:
                self.registry.delete(run_id)
            except RunError:
                return {"id": run_id, "deleted": True}  # already gone
        notify(self.listeners, {"type": "deleted", "run": run_id, "time": round(time.time(), 3)})  # its file is gone
        return {"id": run_id, "deleted": True}

    def wait(self, run_id: str, timeout: float | None = None) -> dict:
        self.worker.join(run_id, timeout)
        return self.registry.get(run_id)
