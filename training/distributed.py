"""Multi-process (DDP-style) training: `torchrun --nproc_per_node N -m sa3_lora_studio train --config run.json`.

Batch semantics: `config.batch_size` is the batch of ONE process, so the global batch is `batch_size × world_size`
(more devices = more samples per step, the usual torchrun convention). A run on N processes is the same run as one
process with the global batch: every rank draws the whole global batch exactly as the single-process trainer would
(files, crops, prompts, t, noise, OT pairing, inpaint masks, CFG dropout, all seeded from (run seed, step)), and then
runs the DiT forward/backward on its own contiguous rows only. The loss keeps its single-process form (the mean over
the GLOBAL batch); rows of other ranks enter it as constants, so a rank's gradient is exactly its rows' share of the
global gradient and the SUM over ranks (one all-reduce of the flat gradient, before clipping) is the global-batch
gradient. Clipping, AdamW and the schedule then run identically on every rank, so the adapters stay in lockstep
(they are also broadcast from rank 0 once after setup, in case a rank resumed or initialised differently).

Rank 0 alone writes the registry, events, checkpoints and demos; the other ranks wait for it at the next collective.
All ranks read the same `latest.json` to resume, so the runs folder must be visible to every rank (one machine, or a
shared filesystem). Backends: `nccl` on CUDA (each rank on `cuda:LOCAL_RANK`), `gloo` on CPU.

Control from another shell: `sa3-lora runs save|pause|continue|stop RUN` leave request files in the run folder
(`requests.py`); at every step boundary rank 0 takes them and broadcasts one 3-flag tensor, so all ranks save (rank 0
writes), pause, continue or stop at the same step. A paused rank 0 re-broadcasts "still paused" about twice a second;
the other ranks simply wait in that broadcast. SIGINT/SIGTERM (torchrun forwards them) count only on rank 0 and mean
stop; torchrun kills the ranks ~30 s after forwarding a signal, so with long steps prefer `sa3-lora runs stop`.

Resume a distributed run: `sa3-lora runs resume RUN` (relaunches torchrun with the run's `world_size`, or
`--nproc N`), which is `SA3_RUN_ID=<run id> torchrun ... train --config <run folder>/config.json` (or call
`train_distributed(config, runs_dir, run_id=...)`).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from .events import EventLog
from .requests import StepRequests
from .runs import RunConfig, RunError, RunRegistry
from .trainer import Trainer, failed_at, failure_message
from .worker import RunControl


def world_size_change(before: int, now: int, batch_size: int) -> str:
    """What a run resumed on another number of processes than it trained on should say: its global batch changes."""
    return (f"it trained on {before} process{'es' if before > 1 else ''} (global batch {batch_size * before}) and "
            f"resumes on {now} (global batch {batch_size * now}): its steps from here see "
            f"{'more' if now > before else 'fewer'} samples each, and it no longer follows the run it would have "
            f"been; resume with --nproc {before} to keep it")


def rank_rows(global_batch: int, rank: int, world_size: int) -> slice:
    """Contiguous rows of the global batch processed by `rank` (sizes differ by at most one)."""
    per, extra = divmod(global_batch, world_size)
    start = rank * per + min(rank, extra)
    return slice(start, start + per + (1 if rank < extra else 0))


def _dit_on_rows(dit, rows: slice, x, *args, **kwargs):
    """Run `dit` on `rows` of every batch-first tensor argument; return a full [B, ...] output whose other rows are
    zeros (constants: they carry no gradient, the ranks that own them compute them)."""
    b = x.shape[0]

    def take(a):
        return a[rows] if torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == b else a

    v = dit(take(x), *map(take, args), **{k: take(a) for k, a in kwargs.items()})
    before = v.new_zeros((rows.start, *v.shape[1:]))
    after = v.new_zeros((b - rows.stop, *v.shape[1:]))
    return torch.cat([before, v, after])


class _LocalRowsTree:
    """A module tree (the trainer's adapter view) whose DiT, `tree.model.model`, computes only this rank's rows."""

    def __init__(self, tree, rows: slice):
        self._tree = tree
        self.model = SimpleNamespace(model=partial(_dit_on_rows, tree.model.model, rows))

    def __getattr__(self, name):
        return getattr(self._tree, name)


class _SilentLog(EventLog):
    """Events of ranks > 0 go nowhere (rank 0 writes the run's events)."""

    def __init__(self, run_id: str):
        self.path, self.run_id, self.listeners = Path(os.devnull), run_id, []

    def emit(self, type_: str, **payload) -> dict:
        return {"type": type_, "run": self.run_id, **payload}


class DistributedTrainer(Trainer):
    """A Trainer for one rank. `config.batch_size` must already be the GLOBAL batch (see `train_distributed`)."""

    def __init__(self, *args, rank: int, world_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.rank, self.world_size = rank, world_size
        self.rows = rank_rows(self.config.batch_size, rank, world_size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def validation_batch(self) -> int:
        return max(1, self.rows.stop - self.rows.start)  # this rank's rows: what its training step holds

    def setup(self) -> None:
        super().setup()
        with torch.no_grad():  # identical start on every rank, whatever each one initialised or resumed
            for p in self.params:
                dist.broadcast(p.data, src=0)

    def loss_for_batch(self, batch: dict, step: int):
        # Only the DiT call is split; all random draws stay global. The trainer runs the DiT as
        # `self.view.model.model` (its adapter view; `rectified_flow_loss(tree=...)`), swapped for a row-slicing one.
        view = self.view
        self.view = _LocalRowsTree(view, self.rows)
        try:
            return super().loss_for_batch(batch, step)
        finally:
            self.view = view

    def all_reduce_gradients(self) -> None:
        """Sum the adapter gradients over ranks (each rank's loss is already divided by the global batch).

        Which parameters get a gradient depends on the rows: the DiT skips cross-attention for rows whose context
        was dropped (CFG dropout) and the local conditioning when it is all zero, so a rank may have None where
        another has a gradient. Every rank therefore sends all parameters (zeros for None) plus a "has a gradient"
        flag per parameter, in one collective; a parameter without a gradient on every rank stays None, as in the
        single-process step (AdamW then skips it, weight decay included)."""
        if not self.params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        present = torch.tensor([p.grad is not None for p in self.params], dtype=grads[0].dtype,
                               device=grads[0].device)
        flat = torch.cat([g.reshape(-1) for g in grads] + [present])
        dist.all_reduce(flat)
        *reduced, present = flat.split([g.numel() for g in grads] + [len(grads)])
        for p, g, r, has_grad in zip(self.params, grads, reduced, present.tolist()):
            p.grad = r.view_as(g).clone() if has_grad else None

    checkpoint_on_failure = False

    def train_step(self, step: int) -> dict:
        # Trainer.train_step with the all-reduce between backward and clipping, and the logged loss made global.
        c = self.config
        batch = self.make_batch(step)
        self.optimizer.zero_grad(set_to_none=True)
        with self.stack.activate(), self.adapter_dropout(step):  # backward inside too: checkpointed blocks are
            result, t = self.loss_for_batch(batch, step)  # recomputed with the adapter and its dropout masks
            self.backward(result.loss)
        self.all_reduce_gradients()
        grad_norm, lr, skipped = self.apply_update()  # the same norm on every rank after the all-reduce
        per_item = torch.zeros(c.batch_size, dtype=torch.float64, device=self.device)
        per_item[self.rows] = result.per_item.detach()[self.rows].double()
        dist.all_reduce(per_item)
        per_item = per_item.cpu()
        return {"loss": float(per_item.mean()), "lr": lr, "grad_norm": grad_norm, "skipped": skipped,
                "world_size": self.world_size,
                "delta_norm": self.stack.delta_norm(0) if self.is_main else None,  # only rank 0 logs steps
                "samples": [[round(float(ti), 5), float(li)] for ti, li in zip(t.cpu().tolist(), per_item.tolist())]}

    def save_checkpoint(self) -> dict | None:
        info = super().save_checkpoint() if self.is_main else None
        self.last_saved_step = self.global_step
        dist.barrier()  # nobody runs ahead (or exits) before the checkpoint is on disk
        return info

    def step_requests(self, control: RunControl) -> StepRequests:
        """Rank 0 decides (its signal-driven flags and the request files of `sa3-lora runs stop|save|pause|continue`)
        and broadcasts one small tensor, so every rank saves, pauses, continues or stops at the same boundary."""
        flags = torch.zeros(3, device=self.device)
        if self.is_main:
            asked = super().step_requests(control)
            flags += torch.tensor([asked.stop, asked.save, asked.pause], dtype=flags.dtype, device=flags.device)
        dist.broadcast(flags, src=0)
        stop, save, pause = (bool(x) for x in flags.tolist())
        return StepRequests(stop=stop, save=save, pause=pause)

    def wait_for_requests(self, control: RunControl) -> None:
        # Only rank 0 sleeps (≤ 0.5 s); the others wait inside the next broadcast, which it sends at least twice a
        # second, so a long pause never runs into the process group's timeout.
        if self.is_main:
            super().wait_for_requests(control)


def _device_for(config: RunConfig, local_rank: int) -> torch.device:
    """Each rank's device: CUDA device `local_rank` (torchrun's CUDA_VISIBLE_DEVICES picks the cards, not
    config.device's index), else the CPU (gloo); MPS has no multi-process backend."""
    if (config.device == "auto" or config.device.startswith("cuda")) and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if config.device.startswith("cuda"):
        raise RunError(f"RunConfig.device={config.device!r} but CUDA is not available to this process")
    if config.device.startswith("mps"):
        raise RunError("RunConfig.device='mps': multi-process training runs on CUDA (nccl) or the CPU (gloo); "
                       "train on MPS in one process (sa3-lora train without torchrun)")
    return torch.device("cpu")


def stop_when_orphaned(control: RunControl, finished: threading.Event, poll_seconds: float = 1.0) -> None:
    """Until `finished` is set: stop the run (rank 0 saves first) when this process's parent changes. torchrun's
    agent killed without warning (SIGKILL, an OOM kill) would otherwise leave its ranks training on in their own
    sessions, unseen and unstoppable by Ctrl-C."""
    parent = os.getppid()

    def watch() -> None:
        while not finished.wait(poll_seconds):
            if os.getppid() != parent:
                control.request_stop()
                return

    threading.Thread(target=watch, name="sa3-orphan-watch", daemon=True).start()


def train_distributed(config: RunConfig, runs_dir: str | Path, run_id: str | None = None,
                      listeners: list[Callable[[dict], None]] | None = None) -> int:
    """Entry of every rank under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment).

    config.batch_size is per rank (global batch = batch_size × WORLD_SIZE). run_id (or $SA3_RUN_ID) resumes that
    run from its latest checkpoint (with the run's saved config; only `steps` is taken from `config`, so a
    finished run can be extended); otherwise rank 0 registers a new run. listeners receive rank 0's events (the CLI
    prints them). Returns a process exit code."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device_for(config, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                            timeout=timedelta(minutes=60))  # rank 0's demos and checkpoints may take a while
    control = RunControl()

    def on_signal(signum, frame):
        control.request_stop()  # acted on by rank 0's decision at the next step boundary (saves first)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    finished = threading.Event()
    stop_when_orphaned(control, finished)
    registry = RunRegistry(runs_dir) if rank == 0 else None
    try:
        run_id = run_id or os.environ.get("SA3_RUN_ID") or None
        if rank == 0:
            if run_id is None:
                run_id, before = registry.create(config), world
            else:  # the run's own config (per-rank batch), not the file given; only `steps` is taken from it
                config, _ = registry.amend(run_id, {"steps": config.steps})  # the one resume rule (runs.py)
                before = int(registry.get(run_id).get("world_size") or 1)  # none recorded: one process trained it
            registry.update(run_id, status="loading", error=None, world_size=world)
            print(f"run {run_id} in {registry.run_dir(run_id)} on {world} processes "
                  f"(global batch {config.batch_size * world})", flush=True)
            if before != world:
                print(f"warning: {world_size_change(before, world, config.batch_size)}", flush=True)
        shared = [run_id, config.to_dict()]
        dist.broadcast_object_list(shared, src=0)
        run_id, config = shared[0], RunConfig.from_dict(shared[1])
        folder = RunRegistry(runs_dir).run_dir(run_id)
        global_config = replace(config, batch_size=config.batch_size * world, device=str(device),
                                demo_every=config.demo_every if rank == 0 else 0)
        log = EventLog(folder / "events.jsonl", run_id, listeners) if rank == 0 else _SilentLog(run_id)
        trainer = DistributedTrainer(global_config, folder, run_id, log, registry=registry, rank=rank,
                                     world_size=world)
        try:
            trainer.setup()
            if registry is not None:
                registry.update(run_id, step=trainer.global_step, total_steps=trainer.step_offset + config.steps)
            def set_status(status: str, **extra) -> None:
                if registry is not None:
                    registry.update(run_id, status=status, **extra)
                log.emit("status", status=status, **extra)

            status = trainer.train(control, set_status)  # the single-process loop; hooks make it rank-aware
        except BaseException as e:
            if registry is not None:
                message = failure_message(e, trainer)
                registry.update(run_id, status="failed", error=message, **failed_at(trainer))
                log.emit("error", message=message)
                log.emit("status", status="failed", error=message)
            raise
        finally:
            trainer.release_model()
        if rank == 0:
            print(f"run {run_id}: {status} at step {trainer.global_step}", flush=True)
        return 0
    finally:
        finished.set()
        for s, handler in previous.items():
            signal.signal(s, handler)
        dist.destroy_process_group()


__all__ = ["train_distributed", "DistributedTrainer", "rank_rows"]
