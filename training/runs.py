"""Training runs on disk: one folder per run, an atomically written index, and path confinement for every route.

A run folder reads without our code:
    <root>/<run_id>/config.json             the RunConfig (same schema as the node and `sa3-lora train --config`)
    <root>/<run_id>/events.jsonl            append-only events (step, loss, samples, checkpoint, demo, error)
    <root>/<run_id>/checkpoints/<name>-step=000400.safetensors   the adapter, SA3-native (loads everywhere)
    <root>/<run_id>/checkpoints/<name>-step=000400.state.pt      optimiser, RNG states, data cursor, step
    <root>/<run_id>/demos/step_000400/demo_0.{flac|wav|mp3|opus,png,json}
    <root>/<run_id>/latest.json             the newest checkpoint, written last (temp + fsync + rename)
    <root>/runs.json                        index of runs with their status (atomic)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ..sa3.atomic import READ_ONLY_ERRNOS, atomic_write_json, file_lock, writable_folder_problem
from ..sa3.field_types import check_field_types, check_known_keys

MAX_CROP_SECONDS = 380.0  # sa3-medium's sample window; longer crops only pad
DATASET_RECORD = "dataset.json"  # {"identity", "folder"} of the dataset a run trains on (`EncodedDataset.identity`)
SUBMITTED_CONFIG = "config.submitted.json"  # a run's settings as queued, kept when a restart changes config.json
AMENDED_FROM = "config.before-resume.json"  # the settings before a resume changed them, until it gets going
MAX_STEPS = 100_000_000  # a run's length; beyond it, a typo (a day of steps on a GPU is ~10^5), and JSON readers
# in the browser lose integers past 2^53
STATUSES = ("queued", "loading", "training", "demos", "paused", "interrupted", "done", "failed", "stopped")
ACTIVE = ("queued", "loading", "training", "demos", "paused")
PRECISIONS = ("fp32", "bf16", "fp16")
TIMESTEP_SAMPLERS = ("trunc_logit_normal", "logit_normal", "uniform")
CROP_FROM = ("random", "start")  # where a training crop of a longer file begins
DEMO_MODES = ("generate", "inpaint", "continue")  # DemoSpec.mode
# Other trainers' names (the official scripts, underfit, fal) for our fields: a config key near one is pointed at ours
FIELD_ALIASES = {"learning_rate": "lr", "max_steps": "steps", "num_steps": "steps", "train_steps": "steps",
                 "batch": "batch_size", "lora_rank": "rank", "lora_alpha": "alpha", "lora_type": "adapter_type",
                 "adapter": "adapter_type", "lora_dropout": "dropout", "save_every": "checkpoint_every",
                 "random_seed": "seed", "dataset_dir": "dataset", "model_path": "model",
                 "continue_from_lora": "continue_from", "clip_grad_norm": "grad_clip", "warmup": "warmup_steps"}
# What a resumed run may change (`RunRegistry.amend`): its length, schedule, batches, objective options, cadence and
# demos. Not what the adapter is (model, dataset, type, rank, alpha, targets), its seed, precision or device.
RESUME_SETTINGS = ("steps", "lr", "warmup_steps", "weight_decay", "betas", "grad_clip", "batch_size", "crop_seconds",
                   "crop_from", "gradient_checkpointing", "detach_norm", "timestep_sampler", "ot_coupling",
                   "inpaint_probabilities", "mask_loss_weight", "cfg_dropout", "checkpoint_every", "demo_every", "demos",
                   "demo_format", "demo_loudness", "arc_model", "validation_every", "keep_states", "tensorboard")


PATH_FIELDS = ("dataset", "model", "arc_model", "continue_from")  # stored absolute (`RunConfig.with_absolute_paths`)


class RunError(ValueError):
    """A run's input, state or path is wrong; the message names what and why."""


class RunNotFound(RunError):
    """No such run, or no such file in it (HTTP 404)."""


class RunConflict(RunError):
    """The action does not fit the run's state: not running, already running, trained elsewhere (HTTP 409)."""


class PathOutsideRun(RunError):
    """A path or run id that would leave the runs folder (HTTP 403)."""


def confine(root: Path, relative: str) -> Path:
    """Resolve `relative` inside `root`, refusing absolute paths, `..`, and symlinks that lead outside `root`."""
    if not relative or relative.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", relative) or "\x00" in relative:
        raise PathOutsideRun(f"path {relative!r} is not a relative path inside the run folder")
    parts = Path(relative.replace("\\", "/")).parts
    if any(p == ".." for p in parts):
        raise PathOutsideRun(f"path {relative!r} leaves the run folder")
    root = root.resolve()
    target = (root / relative).resolve()
    if target != root and root not in target.parents:
        raise PathOutsideRun(f"path {relative!r} resolves outside the run folder")
    return target


def slugify(name: str) -> str:
    slug = re.sub(r"[^\w.-]+", "-", name.strip()).strip("-.")  # \w: letters of any script ("音楽" stays)
    return slug[:60] or "run"


@dataclass(frozen=True)
class DemoSpec:
    """One demo rendered every `demo_every` steps. prompt None = re-rolled from the dataset with the run's prompt
    config (an inpaint/continue demo: its clip's own prompt); "" = unconditional. arc=True samples with the ARC
    pack's DiT weights (ping-pong)."""

    prompt: str | None = None
    arc: bool = False
    cfg: float | None = None  # None = model default (base 7, ARC 1)
    steps: int | None = None  # None = model default (base 50, ARC 8)
    seed: int = 0
    duration: float | None = None  # seconds; None = the training crop length
    lora_strength: float = 1.0
    lora_skip_first_steps: int = 0  # the adapter is off for the first N sampling steps (ARC: 1 keeps base structure)
    mode: str = "generate"  # or "inpaint" (a dataset clip's middle third) / "continue" (its second half) regenerated

    def __post_init__(self):
        try:
            check_field_types(self, "DemoSpec")
        except ValueError as e:
            raise RunError(str(e)) from None
        if self.cfg is not None and not self.cfg >= 0:
            raise RunError(f"DemoSpec.cfg: {self.cfg!r} must be >= 0 (or None for the model's default)")
        if self.steps is not None and self.steps < 1:
            raise RunError(f"DemoSpec.steps: {self.steps!r} must be >= 1 (or None for the model's default)")
        if self.duration is not None and not self.duration > 0:
            raise RunError(f"DemoSpec.duration: {self.duration!r} seconds must be > 0 (or None for the crop length)")
        if self.mode not in DEMO_MODES:
            raise RunError(f"DemoSpec.mode: {self.mode!r}: use generate, inpaint (regenerate a dataset clip's middle "
                           "third) or continue (its second half)")
        if self.lora_skip_first_steps < 0:
            raise RunError(f"DemoSpec.lora_skip_first_steps: {self.lora_skip_first_steps!r} must be >= 0")
        if not abs(self.lora_strength) < float("inf"):
            raise RunError(f"DemoSpec.lora_strength: {self.lora_strength!r} must be a finite number")

    @classmethod
    def from_dict(cls, data: dict, where: str = "demo") -> DemoSpec:
        """A DemoSpec from its JSON form; unknown keys are a RunError naming `where` and the known keys."""
        if not isinstance(data, dict):
            raise RunError(f"{where}: expected an object with keys {sorted(f.name for f in fields(cls))}, got {data!r}")
        check_known_keys(cls, data, f"{where}: unknown key(s)", RunError)
        return cls(**data)


def default_demos() -> list[DemoSpec]:
    """Like underfit's default set: base CFG 7 and 1, ARC CFG 1, and one unconditional."""
    return [DemoSpec(None, False, 7.0, seed=1), DemoSpec(None, False, 1.0, seed=2), DemoSpec(None, True, 1.0, seed=3),
            DemoSpec("", False, 7.0, seed=4)]


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs; one schema for the node, `sa3-lora train --config` and the panel."""

    dataset: str
    model: str = "sa3-small-music"  # pack name (base variant is used) or a model folder / checkpoint path
    arc_model: str | None = None  # for ARC demos: pack name ("arc" variant) or path; None = the pack's ARC
    name: str = ""
    models_dir: str | None = None
    prompt_config: dict = field(default_factory=dict)
    adapter_type: str = "dora-rows"
    rank: int = 16
    alpha: float | None = None  # None = rank (scale 1)
    dropout: float = 0.0
    targets: str = "all"  # adapters.PRESETS: "all" (official), "underfit-default", "attention-ff"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    steps: int = 1000
    batch_size: int = 1
    crop_seconds: float = 30.0
    crop_from: str = "random"  # "random" (official) or "start": every crop of a longer file begins at its start
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    warmup_steps: int = 0
    grad_clip: float = 1.0
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    detach_norm: bool = False  # DoRA/BoRA: the norms get no gradient (DoRA paper 4.3, PEFT); faster, not official
    timestep_sampler: str = "trunc_logit_normal"
    ot_coupling: bool = True
    inpaint_probabilities: tuple[float, float, float] = (0.1, 0.8, 0.1)  # segments, full generation, causal
    mask_loss_weight: float = 1.0
    cfg_dropout: float = 0.1
    checkpoint_every: int = 200
    keep_states: int = 0  # training states (.state.pt: adapter + optimiser moments) kept, newest first; 0 = all
    tensorboard: bool = True  # also log for TensorBoard into <run>/tensorboard/ (training/tensorboard.py)
    demo_every: int = 200
    validation_items: int = 0  # dataset items held out of training and scored at fixed noise levels (validation.py)
    validation_every: int = 0  # steps between validation scores; 0 = with each checkpoint
    demos: tuple[DemoSpec, ...] = ()
    demo_format: str = "flac"  # encoding.audio_write.OUTPUT_FORMATS: flac, wav, mp3 or opus
    demo_loudness: float | None = -18.0  # LUFS of every demo and dataset clip (encoding/loudness.py); None: as generated
    seed: int = 0
    continue_from: str | None = None
    reset_step: bool = False
    device: str = "auto"
    trigger_word: str = ""

    def __post_init__(self):
        from ..adapters import ADAPTER_TYPES  # adapters/ owns the list

        def bad(field_name, why):
            raise RunError(f"RunConfig.{field_name}: {why}")

        try:
            check_field_types(self, "RunConfig")
        except ValueError as e:
            raise RunError(str(e)) from None
        if not self.dataset:
            bad("dataset", "give the folder of an encoded dataset")
        from ..adapters import PRESETS, resolve_adapter_type
        from ..adapters.maths import unknown_adapter_type

        if isinstance(self.adapter_type, str) and self.adapter_type != self.adapter_type.strip().lower():
            object.__setattr__(self, "adapter_type", self.adapter_type.strip().lower())  # "DoRA-rows" as written
        if self.adapter_type == "dora":  # the legacy alias: a new adapter of it is dora-rows
            object.__setattr__(self, "adapter_type", resolve_adapter_type("dora"))

        if self.targets not in PRESETS:
            bad("targets", f"{self.targets!r} is not a preset; use one of {sorted(PRESETS)}")
        if self.adapter_type not in ADAPTER_TYPES:
            bad("adapter_type", unknown_adapter_type(self.adapter_type))
        if self.rank < 1:
            bad("rank", "must be >= 1")
        if self.steps < 1 or self.batch_size < 1:
            bad("steps" if self.steps < 1 else "batch_size", "must be >= 1")
        if self.steps > MAX_STEPS:
            bad("steps", f"{self.steps} is more than {MAX_STEPS:,} steps; a run that long would never finish")
        if not 0 < self.crop_seconds <= MAX_CROP_SECONDS:
            bad("crop_seconds", f"{self.crop_seconds} must be > 0 and at most {MAX_CROP_SECONDS} (the longest SA3 "
                "model's window; each model caps it at its own)")
        if not all(isinstance(p, str) and p for p in self.include + self.exclude):
            bad("include" if any(not isinstance(p, str) or not p for p in self.include) else "exclude",
                "layer patterns are non-empty strings")
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                bad("device", f"{self.device!r} is not a device; use auto, cpu, cuda, cuda:1 or mps")
        if self.precision not in PRECISIONS:
            bad("precision", f"use one of {PRECISIONS}")
        if self.crop_from not in CROP_FROM:
            bad("crop_from", f"{self.crop_from!r}: use one of {CROP_FROM}")
        if self.timestep_sampler not in TIMESTEP_SAMPLERS:
            bad("timestep_sampler", f"use one of {TIMESTEP_SAMPLERS}")
        if len(self.inpaint_probabilities) != 3 or abs(sum(self.inpaint_probabilities) - 1) > 1e-6:
            bad("inpaint_probabilities", "three probabilities (segments, full, causal) summing to 1")
        if not 0 <= self.cfg_dropout < 1:
            bad("cfg_dropout", "must be in [0, 1)")
        from ..encoding.audio_write import check_output_format
        from ..encoding.loudness import target_problem

        try:
            check_output_format(self.demo_format, "RunConfig.demo_format")
        except ValueError as e:
            raise RunError(str(e)) from None
        if self.demo_loudness is not None and target_problem(self.demo_loudness):
            bad("demo_loudness", f"{self.demo_loudness} {target_problem(self.demo_loudness)}, or null for the demos "
                                 "as generated")
        if not 0 < self.lr < float("inf"):
            bad("lr", f"{self.lr} must be a finite number > 0")
        if self.alpha is not None and not self.alpha > 0:
            bad("alpha", f"{self.alpha} must be > 0 (or null for alpha = rank)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            bad("betas", f"{self.betas} must be two numbers in [0, 1)")
        for name in ("weight_decay", "grad_clip", "warmup_steps", "mask_loss_weight"):
            if not getattr(self, name) >= 0:
                bad(name, f"{getattr(self, name)} must be >= 0")
        if not 0 <= self.dropout < 1:
            bad("dropout", f"{self.dropout} must be in [0, 1)")
        try:
            from ..encoding import PromptConfig

            PromptConfig.from_dict(self.prompt_config)
        except (TypeError, ValueError) as e:
            bad("prompt_config", str(e))
        if self.checkpoint_every < 1:
            bad("checkpoint_every", f"{self.checkpoint_every} must be >= 1")
        if self.demo_every < 0:
            bad("demo_every", f"{self.demo_every} must be >= 0 (0 = no demos)")
        for name in ("validation_items", "validation_every", "keep_states"):
            if getattr(self, name) < 0:
                bad(name, f"{getattr(self, name)} must be >= 0 (validation_items 0: no validation; validation_every "
                          "0: with each checkpoint; keep_states 0: every checkpoint's state)")

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        check_known_keys(cls, data, "unknown run config field(s)", RunError, FIELD_ALIASES)
        if "dataset" not in data:
            raise RunError("RunConfig.dataset: missing; give the folder of an encoded dataset (`sa3-lora encode "
                           "AUDIO_FOLDER --out DATASET`)")
        data = dict(data)
        for key in ("include", "exclude"):  # one pattern as a plain string, not its characters
            if isinstance(data.get(key), str):
                data[key] = (data[key],)
        for key in ("include", "exclude", "betas", "inpaint_probabilities"):
            if key in data and data[key] is not None:
                if not isinstance(data[key], (list, tuple)):
                    raise RunError(f"RunConfig.{key}: {data[key]!r} must be a list")
                data[key] = tuple(data[key])
        if "demos" in data:
            if not isinstance(data["demos"], list | tuple | type(None)):
                raise RunError(f"RunConfig.demos: {data['demos']!r} must be a list of demo objects "
                               '(e.g. [{"prompt": "warm pad", "cfg": 7}]; [] = the default demos, demo_every 0 = none)')
            data["demos"] = tuple(d if isinstance(d, DemoSpec) else DemoSpec.from_dict(d, f"RunConfig.demos[{i}]")
                                  for i, d in enumerate(data["demos"] or ()))
        return cls(**data)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["demos"] = [asdict(x) for x in self.demos]
        return d

    def with_absolute_paths(self, *bases: Path) -> RunConfig:
        """This config with each relative path field (`PATH_FIELDS`) that names an existing file or folder made
        absolute: relative to the current folder, else to each of `bases` (e.g. the config file's folder). A run
        is resumed from other folders and processes later, so it must not depend on where it was started. Pack
        names and paths that do not exist stay as given (the checks name them)."""
        changes = {}
        for name in PATH_FIELDS:
            value = getattr(self, name)
            if not value or Path(value).expanduser().is_absolute():
                continue
            for base in (Path.cwd(), *bases):
                candidate = Path(base) / Path(value).expanduser()
                if candidate.exists():
                    changes[name] = str(candidate.resolve())
                    break
        return replace(self, **changes) if changes else self

    def crop_latents(self, model_config, capped: bool = True) -> int:
        """The training crop in latent frames for a model (SA3Config): `crop_seconds` at its latent rate, capped at
        its native maximum length (`sample_size`; the model never saw longer windows) unless `capped` is False."""
        crop = max(1, round(self.crop_seconds * model_config.latent_rate))
        return min(crop, model_config.max_latents) if capped and model_config.max_latents else crop

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


MIN_ID_START = 8  # characters of an id's start that may stand for it: its date, YYYYmmdd


def _id_label(run_id: str) -> str:
    """The name part of a run id `YYYYmmdd-HHMMSS-<name>-<4 hex>` (`RunRegistry.create`)."""
    parts = run_id.split("-", 2)
    return parts[2].rsplit("-", 1)[0] if len(parts) == 3 and "-" in parts[2] else run_id


class RunRegistry:
    """Runs under one root folder. Thread-safe; the index `runs.json` is rewritten atomically on every change."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._thread_lock = threading.RLock()
        self._depth = 0  # nesting of _lock() in the thread that holds it: the file lock is taken once

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """The index's lock across threads AND processes (ComfyUI, `sa3-lora train`, torchrun ranks may share one
        runs folder): every read-modify-write of runs.json happens inside it."""
        with self._thread_lock:
            self._depth += 1
            try:
                with contextlib.ExitStack() as held:
                    if self._depth == 1:
                        try:
                            held.enter_context(file_lock(self.root / ".runs.lock"))
                        except OSError as e:  # a read-only runs folder (an archive, another user's): reading it
                            # needs no lock, and writing fails by name; a writable one never goes unlocked
                            if e.errno not in READ_ONLY_ERRNOS or writable_folder_problem(self.root) is None:
                                raise
                    yield
            finally:
                self._depth -= 1

    @property
    def index_path(self) -> Path:
        return self.root / "runs.json"

    def _read_index(self) -> dict[str, dict]:
        """The index; rebuilt from the run folders when it is missing or unreadable (the damaged file is kept
        beside it), so one bad file never hides, or lets the next write drop, every run."""
        try:
            data = json.loads(self.index_path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise ValueError("not a list of runs")
        except FileNotFoundError:
            data = None
        except ValueError:  # JSONDecodeError, UnicodeDecodeError, a wrong shape
            self.index_path.replace(self.index_path.with_name(f"runs.json.damaged-{int(time.time())}"))
            data = None
        runs = {r["id"]: r for r in data or [] if isinstance(r, dict) and isinstance(r.get("id"), str)}
        if data is None:
            runs = self._runs_from_folders()
            if runs:
                self._write_index(runs)
        return runs

    def _runs_from_folders(self, skip: Iterable[str] = ()) -> dict[str, dict]:
        """Index records rebuilt from the run folders (config.json, latest.json, owner.json) but those in `skip`: a
        run still active in a live process (owner.json, kept while a run is active) keeps its status; the others are
        `done` when their newest checkpoint reached the run's steps, else `interrupted` (one action resumes each);
        step = the newest checkpoint's."""
        runs, skip = {}, set(skip)
        for config_path in sorted(self.root.glob("*/config.json")):
            run_id = config_path.parent.name
            if run_id in skip:
                continue
            created = config_path.stat().st_mtime
            try:
                config = RunConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
            except (ValueError, TypeError) as e:  # listed with the reason (e.g. a setting this version refuses)
                runs[run_id] = {"id": run_id, "name": run_id, "status": "failed", "step": 0, "total_steps": 0,
                                "model": "?", "adapter_type": "?", "rank": 0, "created_at": created,
                                "updated_at": time.time(), "error": f"{config_path.name}: {e}"}
                continue
            latest = self.latest_checkpoint(run_id) or {}
            try:
                owner = json.loads((config_path.parent / "owner.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                owner = None
            offset = int(latest.get("step_offset", 0))  # a continued file's steps come before this run's
            if isinstance(owner, dict) and owner_alive(owner) and owner.get("status") in ACTIVE:
                status = owner["status"]  # still active in a live process: neither resumed twice nor refused a stop
            else:
                status = "done" if int(latest.get("step", 0)) - offset >= config.steps else "interrupted"
            runs[run_id] = {"id": run_id, "name": config.name or run_id, "status": status, "owner": owner,
                            "step": int(latest.get("step", 0)), "total_steps": offset + config.steps,
                            "model": config.model,
                            "adapter_type": config.adapter_type, "rank": config.rank, "created_at": created,
                            "updated_at": time.time(), "error": None}
        return runs

    def _write_index(self, runs: dict[str, dict]) -> None:
        atomic_write_json(self.index_path, sorted(runs.values(), key=lambda r: r.get("created_at", 0)))

    def list(self) -> list[dict]:
        """Every run, oldest first. On POSIX, a run whose training process died while this one runs (a crashed
        `sa3-lora train` beside ComfyUI) shows as interrupted here, not only after a restart."""
        with self._lock():
            runs = self._read_index()
            if os.name == "posix" and self._mark_dead_owners(runs):
                self._write_index(runs)
            return sorted(runs.values(), key=lambda r: r.get("created_at", 0))

    def _mark_dead_owners(self, runs: dict[str, dict]) -> list[str]:
        """Active runs whose owner process is gone become `interrupted` (in `runs`), at the step of their last
        checkpoint, where they resume (the steps after it died with the process); their ids."""
        changed = []
        for run in runs.values():
            if run.get("status") in ACTIVE and not owner_alive(run.get("owner")):
                run["status"] = "interrupted"
                saved = self.latest_checkpoint(run["id"])
                run["step"] = int(saved["step"]) if saved else 0
                changed.append(run["id"])
        return changed

    def get(self, run_id: str) -> dict:
        with self._lock():
            runs = self._read_index()
            if run_id not in runs:
                raise RunNotFound(f"no run {run_id!r} in {self.root}")
            return runs[run_id]

    def find(self, text: str, exact: bool = False) -> str:
        """The run id a person means by `text`: the id itself, `latest` (the newest run), the run's name (the id's
        middle part, `20261204-101500-NAME-1a2b`) or the start of one id, at least its date (MIN_ID_START
        characters). exact: the id or the name only (for deleting). RunNotFound names close ids when nothing
        matches; RunError lists the runs when several do."""
        text = text.strip()
        if not text:
            raise RunError("give a run: its id, its name, the start of its id, or latest")
        with self._lock():
            records = sorted(self._read_index().values(), key=lambda r: r.get("created_at", 0))
        ids = [r["id"] for r in records]
        if text in ids:
            return text
        if text == "latest" and not exact:
            if not ids:
                raise RunNotFound(f"no runs yet in {self.root}")
            return ids[-1]
        label = slugify(text).lower()
        matches = [i for i in ids if _id_label(i).lower() == label]  # a name first: a name may look like a date
        if not matches and not exact and len(text) >= MIN_ID_START:
            matches = [i for i in ids if i.startswith(text)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise RunError(f"{text!r} could be any of {len(matches)} runs in {self.root}: " + ", ".join(matches)
                           + "; give the whole id")
        from difflib import get_close_matches

        by_label = {_id_label(i).lower(): i for i in ids}
        close = [by_label[c] for c in get_close_matches(label, list(by_label), n=3, cutoff=0.6)]
        raise RunNotFound(f"no run {text!r} in {self.root}" + (f" (did you mean: {', '.join(close)}?)" if close else "")
                          + ("; give its whole id or its name" if exact else "") + "; `sa3-lora runs list` shows them")

    def create(self, config: RunConfig) -> str:
        with self._lock():
            label = slugify(config.name or Path(config.dataset).name)
            run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{label}-{uuid.uuid4().hex[:4]}"
            folder = self.run_dir(run_id, must_exist=False)
            (folder / "checkpoints").mkdir(parents=True)
            (folder / "demos").mkdir()
            atomic_write_json(folder / "config.json", config.to_dict())
            atomic_write_json(folder / "owner.json", {**process_owner(), "status": "queued"})
            runs = self._read_index()
            now = time.time()
            runs[run_id] = {"id": run_id, "name": config.name or run_id, "status": "queued", "step": 0,
                            "total_steps": config.steps, "model": config.model, "adapter_type": config.adapter_type,
                            "rank": config.rank, "created_at": now, "updated_at": now, "error": None,
                            "owner": process_owner()}  # queued here: no other process takes it for dead
            self._write_index(runs)
            return run_id

    def update(self, run_id: str, **changes) -> dict:
        with self._lock():
            runs = self._read_index()
            if run_id not in runs:
                raise RunNotFound(f"no run {run_id!r}")
            if "status" in changes and changes["status"] not in STATUSES:
                raise RunError(f"status {changes['status']!r} is not one of {STATUSES}")
            if changes.get("status") in ACTIVE:  # who runs it: other processes must not take it for dead
                changes["owner"] = process_owner()
            folder = self.run_dir(run_id, must_exist=False)
            if "status" in changes and folder.is_dir():  # the folder's copy survives a damaged index
                if changes["status"] in ACTIVE:
                    atomic_write_json(folder / "owner.json", {**changes["owner"], "status": changes["status"]})
                else:
                    (folder / "owner.json").unlink(missing_ok=True)
                if runs[run_id].get("status") not in ACTIVE:  # starting again: requests left for a dead process go
                    from .requests import clear_requests

                    clear_requests(self.run_dir(run_id))
            runs[run_id].update(changes, updated_at=time.time())
            self._write_index(runs)
            return runs[run_id]

    def delete(self, run_id: str) -> None:
        import shutil

        with self._lock():
            runs = self._read_index()
            folder = self.run_dir(run_id, must_exist=False)  # a folder removed by hand still leaves the index
            if run_id not in runs and not folder.is_dir():
                raise RunNotFound(f"no run {run_id!r} in {self.root}")
            runs.pop(run_id, None)
            self._write_index(runs)
            shutil.rmtree(folder, ignore_errors=True)

    def run_dir(self, run_id: str, must_exist: bool = True) -> Path:
        try:
            folder = confine(self.root, run_id)
        except PathOutsideRun:  # said of the id, not as a path the user did not think they gave
            raise PathOutsideRun(f"run id {run_id!r} is not a run folder of {self.root} (a run id is a folder name "
                                 "there, and a link to elsewhere is not followed)") from None
        if folder.parent != self.root.resolve():
            raise PathOutsideRun(f"run id {run_id!r} is not a run folder name")
        if must_exist and not folder.is_dir():
            raise RunNotFound(f"no run {run_id!r} in {self.root}")
        return folder

    def run_file(self, run_id: str, relative: str) -> Path:
        """A file inside a run folder, confined (for routes serving demos, images and checkpoints)."""
        path = confine(self.run_dir(run_id), relative)
        if not path.is_file():
            raise RunNotFound(f"{relative!r} does not exist in run {run_id}")
        return path

    def config(self, run_id: str) -> RunConfig:
        path = self.run_dir(run_id) / "config.json"
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(stored, dict):  # a run saved before demos had a loudness keeps its demos as generated
                stored.setdefault("demo_loudness", None)
            return RunConfig.from_dict(stored)
        except FileNotFoundError:
            raise RunNotFound(f"run {run_id}: {path.name} does not exist; the run folder is incomplete") from None
        except (ValueError, TypeError) as e:  # damaged JSON, or fields this version does not know
            raise RunError(f"run {run_id}: {path} is unreadable ({e})") from None

    def trained_steps(self, run_id: str) -> int:
        """Steps this run has trained, by its newest checkpoint (a continued file's own steps not counted)."""
        latest = self.latest_checkpoint(run_id) or {}
        return int(latest.get("step", 0)) - int(latest.get("step_offset", 0))

    def amend(self, run_id: str, changes: dict | None = None, more_steps: int = 0,
              queue: bool = False) -> tuple[RunConfig, dict]:
        """Change the settings of a run that is not training (`RESUME_SETTINGS`) before it resumes, e.g. to train a
        finished run further. changes: RunConfig fields in their JSON form; more_steps: added to its `steps`;
        queue: also mark it queued, in the same hold of the index's lock (two restarts at once, from two windows or
        processes, then amend it once: the second finds it queued and is refused). Returns (the new config,
        {field: (old, new)} of what changed). The training state keeps what it learnt (adapter, optimiser
        moments, step); the trainer applies the new learning rate, betas and weight decay."""
        if changes is not None and not isinstance(changes, dict):
            raise RunError(f"changes: {changes!r} must be an object of run config fields, e.g. {{\"lr\": 5e-05}}")
        changes = dict(changes or {})
        check_known_keys(RunConfig, changes, f"run {run_id}: unknown run config field(s)", RunError, FIELD_ALIASES)
        refused = sorted(set(changes) - set(RESUME_SETTINGS) - {"dataset"})  # the dataset: moved, see below
        if refused:
            raise RunError(f"run {run_id}: {', '.join(refused)} cannot change when a run resumes (they define its "
                           f"adapter or its randomness); these can: {', '.join(RESUME_SETTINGS)}")
        if not isinstance(more_steps, int) or isinstance(more_steps, bool) or not 0 <= more_steps <= MAX_STEPS:
            raise RunError(f"more_steps: {more_steps!r} must be a whole number from 0 to {MAX_STEPS:,}")
        if more_steps and "steps" in changes:
            raise RunError("give steps (the run's new length) or more_steps, not both")
        with self._lock():
            record = self.get(run_id)
            if trained_elsewhere(record):  # queued or training in a live process (this one included)
                then = ("; stop it before resuming it with other settings" if changes or more_steps
                        else ": nothing to resume")
                raise RunConflict(f"run {run_id} is already {record['status']}{then}")
            old = self.config(run_id)
            if "dataset" in changes:
                changes["dataset"] = self._moved_dataset(run_id, old, changes["dataset"])
            if more_steps:
                changes["steps"] = old.steps + more_steps
            try:
                new = RunConfig.from_dict({**old.to_dict(), **changes})
            except TypeError as e:  # a null or a list where a number belongs: check_field_types names most
                raise RunError(f"run {run_id}: {e}") from None
            trained = self.trained_steps(run_id)
            if new.steps < trained:
                raise RunError(f"RunConfig.steps: {new.steps} is below the {trained} steps run {run_id} has "
                               "trained; give more steps to extend it")
            before, after = old.to_dict(), new.to_dict()
            changed = {k: (before[k], after[k]) for k in (*RESUME_SETTINGS, "dataset") if before[k] != after[k]}
            if record.get("status") == "done" and new.steps <= trained:
                raise RunConflict(f"run {run_id} is done ({trained} of {new.steps} steps): nothing to resume; give "
                                  "more steps to train it further")
            if changed:
                submitted = self.run_dir(run_id) / SUBMITTED_CONFIG
                if not submitted.exists():  # the settings it was queued with: the same graph queued again finds it
                    atomic_write_json(submitted, before)
                # undone if the resume fails before training (`undo_amend`): the same command given again then
                # changes them once, not twice (--more-steps would add up)
                atomic_write_json(self.run_dir(run_id) / AMENDED_FROM,
                                  {"config": before, "total_steps": record.get("total_steps")})
                atomic_write_json(self.run_dir(run_id) / "config.json", after)
                total = int(record.get("total_steps", old.steps)) - old.steps + new.steps  # a file's offset kept
                self.update(run_id, total_steps=total)
            if queue:
                self.update(run_id, status="queued", error=None)
            return new, changed

    def _moved_dataset(self, run_id: str, old: RunConfig, new_folder) -> str:
        """The absolute path of `new_folder` when it holds the very dataset the run trained on (moved, renamed, a
        drive mounted elsewhere: `EncodedDataset.identity`); RunError otherwise (another dataset would change what
        the run learns and its data order)."""
        from ..encoding.dataset import DatasetError, load_dataset

        if not isinstance(new_folder, str) or not new_folder.strip():
            raise RunError(f"dataset: {new_folder!r} must be the folder the run's dataset was moved to")
        new_folder = str(Path(new_folder).expanduser().absolute())
        if new_folder == old.dataset:
            return new_folder
        try:
            recorded = json.loads((self.run_dir(run_id) / DATASET_RECORD).read_text(encoding="utf-8"))["identity"]
        except (OSError, ValueError, KeyError, TypeError):
            raise RunError(f"run {run_id}: its dataset cannot change (it has no record of what it trained on, so "
                           f"another folder cannot be checked to hold the same files); move the dataset back to "
                           f"{old.dataset}") from None
        try:
            moved = load_dataset(new_folder)
        except (DatasetError, OSError, ValueError) as e:
            raise RunError(f"dataset: {e}") from None
        if moved.identity() != recorded:
            raise RunError(f"dataset: {new_folder} is not the dataset run {run_id} trained on (other files, or "
                           f"encoded again since); a run resumes on its own dataset only: move that one back to "
                           f"{old.dataset} or give its new folder")
        if missing := moved.files_problem():  # refused before the settings change: a failed resume keeps none
            raise RunError(f"dataset: {missing}")
        return new_folder

    def submitted_config(self, run_id: str) -> RunConfig | None:
        """The settings a run was queued with when `amend` has changed them since; else None (config.json holds
        them)."""
        try:
            return RunConfig.from_dict(json.loads((self.run_dir(run_id) / SUBMITTED_CONFIG).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, RunError):
            return None

    def undo_amend(self, run_id: str) -> bool:
        """Put back the settings a resume changed (`amend`) when that resume failed before it trained (a model or
        dataset that would not load): retrying the same command must not change them twice. True when there was
        something to undo."""
        path = self.run_dir(run_id) / AMENDED_FROM
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        self.restore_config(run_id, RunConfig.from_dict(saved["config"]), saved.get("total_steps"))
        path.unlink(missing_ok=True)
        return True

    def amend_took(self, run_id: str) -> None:
        """The resumed run got going: its changed settings stay."""
        (self.run_dir(run_id) / AMENDED_FROM).unlink(missing_ok=True)

    def restore_config(self, run_id: str, config: RunConfig, total_steps: int | None) -> None:
        """Put back a run's settings as they were before `amend` (a restart that failed after amending)."""
        with self._lock():
            atomic_write_json(self.run_dir(run_id) / "config.json", config.to_dict())
            if total_steps is not None:
                self.update(run_id, total_steps=total_steps)

    def latest_checkpoint(self, run_id: str) -> dict | None:
        try:
            return json.loads((self.run_dir(run_id) / "latest.json").read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, RunError):  # RunError: the run's folder is gone
            return None

    def mark_interrupted_after_restart(self) -> list[str]:
        """On start-up: runs that were active when their process died are `interrupted` (resumable in one action).
        Runs still trained by a live process (`sa3-lora train`, torchrun, another ComfyUI) on this runs folder keep
        their status. Run folders the index does not know (copied in from another machine or a backup) join it,
        as a rebuilt index lists them."""
        with self._lock():
            runs = self._read_index()
            changed = self._mark_dead_owners(runs)
            adopted = self._runs_from_folders(skip=runs)  # run folders copied or moved in while it was down
            runs.update(adopted)
            if changed or adopted:
                try:
                    self._write_index(runs)
                except OSError as e:  # a read-only runs folder: listed as it was left
                    if e.errno not in READ_ONLY_ERRNOS:
                        raise
                    return []
        return changed


def describe_changes(changed: dict) -> str:
    """'resuming with steps 1000 → 1500, lr 0.0001 → 5e-05' from `RunRegistry.amend`'s {field: (old, new)}."""
    def demos(before, after) -> str:
        return f"{len(after)} demo(s) instead of {len(before)}" if len(after) != len(before) else "changed demos"

    parts = [f"{name} {before} → {after}" if name != "demos" else demos(before, after)
             for name, (before, after) in changed.items()]
    return "resuming with " + ", ".join(parts)


def trained_elsewhere(record: dict) -> bool:
    """An active run whose recorded owner process is alive, asked by code that is not running it (the CLI, or a
    TrainingManager whose worker does not have it): another trainer has it (`sa3-lora train`, torchrun, another
    ComfyUI or manager). It can be sent requests (`requests.py`) but must not be restarted or deleted."""
    return record.get("status") in ACTIVE and owner_alive(record.get("owner"))


def _process_start(pid: int) -> str | None:
    """The start time of a process in clock ticks since boot (Linux /proc), None where it cannot be read. Recorded
    with the pid, it tells a live owner from a new process that reused its pid (e.g. after a container restart)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 (starttime); fields after the name start at field 3


def process_owner() -> dict:
    """Identifies the process that trains a run (stored with active runs in the index)."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": _process_start(os.getpid())}


def describe_owner(owner: dict | None) -> str:
    """'process 1234 on host studio' for messages (the index's owner record)."""
    if not owner:
        return "an unknown process"
    return f"process {owner.get('pid', '?')} on host {owner.get('host', '?')}"


def owner_alive(owner: dict | None) -> bool:
    """Whether the process recorded as training a run still exists. Unknown owners count as dead (the old
    behaviour), owners on another host as alive (we cannot look; a shared runs folder must not lose live runs)."""
    if not owner or os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return False
    if owner.get("host") != socket.gethostname():
        return True
    pid = int(owner.get("pid", 0))
    if pid <= 0:
        return False
    if owner.get("started") is not None and Path("/proc/self/stat").exists():
        return _process_start(pid) == owner["started"]
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    except OSError:
        return False
    return True
