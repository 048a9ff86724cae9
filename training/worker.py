"""Background training: a queue of runs executed by worker threads, one at a time per device by default.

Each run has its own `RunControl` (stop / pause / save-now flags). Nothing here touches ComfyUI's global interrupt:
ComfyUI's cancel button must not stop background training, and training must not swallow an interrupt meant for the
prompt being executed in the foreground.
"""

from __future__ import annotations

import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class RunControl:
    """Flags a running trainer checks between steps (each acts within one step)."""

    stop: threading.Event = field(default_factory=threading.Event)
    resume_event: threading.Event = field(default_factory=threading.Event)  # set = running, clear = paused
    save_now: threading.Event = field(default_factory=threading.Event)
    delete_when_done: bool = False  # deleted while running: the manager removes the folder when the job ends

    def __post_init__(self):
        self.resume_event.set()

    def request_stop(self) -> None:
        self.stop.set()
        self.resume_event.set()  # a paused run must wake up to stop (and save)

    def pause(self) -> None:
        self.resume_event.clear()

    def resume(self) -> None:
        self.resume_event.set()

    def take_save(self) -> bool:
        """True once per save-now request (cleared as it is taken)."""
        if not self.save_now.is_set():
            return False
        self.save_now.clear()
        return True

    @property
    def paused(self) -> bool:
        return not self.resume_event.is_set()

    def wait_while_paused(self, on_pause: Callable[[], None] | None = None,
                          on_resume: Callable[[], None] | None = None) -> None:
        if self.resume_event.is_set():
            return
        if on_pause:
            on_pause()
        while not self.resume_event.wait(0.2):
            pass
        if on_resume and not self.stop.is_set():
            on_resume()


class TrainingWorker:
    """Runs queued jobs in background threads: at most `per_device` at once on each device key."""

    def __init__(self, run_job: Callable[[str, RunControl], None], per_device: int = 1):
        self._run_job = run_job
        self._per_device = per_device
        self._lock = threading.Lock()
        self._queues: dict[str, deque[str]] = {}
        self._active: dict[str, set[str]] = {}
        self.controls: dict[str, RunControl] = {}
        self.threads: dict[str, threading.Thread] = {}
        self.finished: dict[str, threading.Event] = {}  # set when the run's job has ended or it left the queue
        self.errors: dict[str, str] = {}

    def submit(self, run_id: str, device_key: str = "default") -> RunControl:
        with self._lock:
            control = self.controls.get(run_id)
            if control is None or run_id not in self.threads or not self.threads[run_id].is_alive():
                control = RunControl()
                self.controls[run_id] = control
            if self.finished.get(run_id) is None or self.finished[run_id].is_set():
                self.finished[run_id] = threading.Event()
            self._queues.setdefault(device_key, deque()).append(run_id)
        self._pump(device_key)
        return control

    def _pump(self, device_key: str) -> None:
        with self._lock:
            active = self._active.setdefault(device_key, set())
            queue = self._queues.setdefault(device_key, deque())
            while queue and len(active) < self._per_device:
                run_id = queue.popleft()
                if self.controls[run_id].stop.is_set():
                    self.finished[run_id].set()  # stopped while still queued
                    continue
                active.add(run_id)
                thread = threading.Thread(target=self._thread_main, args=(run_id, device_key),
                                          name=f"sa3-train-{run_id}", daemon=True)
                self.threads[run_id] = thread
                thread.start()

    def _thread_main(self, run_id: str, device_key: str) -> None:
        try:
            self._run_job(run_id, self.controls[run_id])
        except BaseException:  # the job reports its own failure; keep the worker alive for the next run
            self.errors[run_id] = traceback.format_exc()
        finally:
            with self._lock:
                self._active.get(device_key, set()).discard(run_id)
                self.finished[run_id].set()
            self._pump(device_key)

    def cancel_queued(self, run_id: str) -> bool:
        """Take a run that has not started out of its queue; True when it was queued."""
        with self._lock:
            for queue in self._queues.values():
                if run_id in queue:
                    queue.remove(run_id)
                    self.finished[run_id].set()
                    return True
        return False

    def queued(self) -> list[str]:
        with self._lock:
            return [r for q in self._queues.values() for r in q]

    def is_running(self, run_id: str) -> bool:
        thread = self.threads.get(run_id)
        return bool(thread and thread.is_alive())

    def join(self, run_id: str, timeout: float | None = None) -> bool:
        """Wait until the run's job has ended (a queued run waits for its turn, then for its end); True when it
        has, False on timeout. A run this worker never saw counts as ended."""
        finished = self.finished.get(run_id)
        return True if finished is None else finished.wait(timeout)
