"""The LoRA-family trainer: rectified flow on pre-encoded latents, checkpoints that resume exactly, live events.

Reproducibility: every random choice of step s (batch files, crop starts, prompts, t, noise, inpaint masks, CFG
dropout, silence extension) comes from generators seeded by (run seed, s), so a run is a pure function of its config
and a resumed run continues bit-exactly (on CPU) from the adapter, optimiser and scheduler state saved with the
checkpoint. The base model may be shared with generation nodes: the adapter is applied as a view
(`adapters.AdaptedModel`, active only in the training thread), and the base weights are never written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import re
import time
import warnings
from pathlib import Path

import torch

from ..adapters import SA3_ROOTS, AdaptedModel, new_adapter, notices, read_adapter_file, write_adapter_file
from ..adapters.apply import model_xs_bases, trained_on_fingerprint
from ..encoding import PromptConfig, batch_prompts
from ..encoding.dataset import item_seconds
from ..sa3 import schedules
from ..sa3.atomic import fsync_replace
from ..sa3.text import TextEncoderCache
from . import step_rate
from .cpu_heap import keep_heap, release_heap
from .events import EventLog
from .optimizer import adamw, load_adamw_state
from .preflight import check_trainable, continued_epoch, continued_step, dataset_warning, open_continue_from, open_dataset
from .requests import StepRequests, apply_requests
from .runs import DATASET_RECORD, RunConfig, RunError, RunRegistry, atomic_write_json
from .tensorboard import TensorBoardSink, attempt_start_step
from .validation import PLAN_FILE, ValidationPlan, build_validation_set, noise_levels, score
from .worker import RunControl

CREATED_BY = "sa3-lora-studio"
# A run's prompt embeddings kept in host memory: about 680 prompts of SA3's T5 output ([256, 768] fp32 and a
# [256] mask). Shuffled tags compose a new prompt at most steps, so the cache must not grow with the run; one encoded
# again costs a T5 pass over its real tokens only (bench/text_encoder.py), and gives the same bits.
PROMPT_CACHE_BYTES = 512 << 20
SILENCE_EXTENSION_SECONDS = 4.0  # mean of the exponential extension of the valid region (official train_lora)


def model_label(spec: str) -> str:
    """A short name for the model a run trains on, for file metadata and messages: a pack name as given, a folder
    or file by its name, with its parent for a pack's `base`/`arc` folder (`my-pack/base`, not `base`)."""
    path = Path(str(spec))
    if path.name.lower() in ("base", "arc") and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name or str(spec)


def derive_seed(*parts) -> int:
    """A 63-bit seed from the run seed and labels (stable across processes and platforms)."""
    digest = hashlib.sha256(":".join(map(str, ("sa3-train",) + parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def batch_indices(n_items: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Dataset indices of step `step`: epochs of seeded permutations; sampled with replacement when the dataset is
    smaller than a batch."""
    if n_items < batch_size:
        g = torch.Generator().manual_seed(derive_seed(seed, step, "indices"))
        return torch.randint(0, n_items, (batch_size,), generator=g).tolist()
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, k = divmod(pos, n_items)
        perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(derive_seed(seed, epoch, "epoch")))
        out.append(int(perm[k]))
    return out


def pick_device(name: str) -> torch.device:
    """"auto" = CUDA, else Apple MPS, else CPU; any other name as given; with its index ("cuda" -> "cuda:0")."""
    if name != "auto":
        device = torch.device(name)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    # "cuda" != "cuda:0" for torch.device: caches, ComfyUI's loaded models and tensors all name the index
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    elif device.type == "mps" and device.index is None:
        device = torch.device("mps", 0)
    return device


def device_problem(name: str) -> str | None:
    """Why device `name` cannot be used on this machine (a CUDA device without CUDA, MPS without Metal, a GPU index
    beyond the count), or None. "auto" always works."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return f"{name!r} is not a device; use auto, cpu, cuda, cuda:1 or mps"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"{name}: this PyTorch sees no CUDA GPU (a CPU-only build, or no driver); use auto or cpu"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"{name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0"
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        return f"{name}: Apple Metal (MPS) is not available here; use auto or cpu"
    return None


def usable_device(name: str) -> torch.device:
    """`pick_device(name)`, or ValueError naming why this machine cannot use it (`device_problem`)."""
    problem = device_problem(name)
    if problem:
        raise ValueError(f"device {problem}")
    return pick_device(name)


class LossScale:
    """Dynamic loss scaling for fp16 runs (the role of torch's GradScaler, written out so its state is part of the
    run's checkpoint and a resumed run continues bit-exactly): the loss is multiplied by `scale` before the
    backward and the adapter gradients divided by it after; an overflow (non-finite gradient norm) halves the scale
    and skips the update, `growth_interval` good steps in a row double it. Disabled (scale 1, no-op) for fp32 and
    bf16, whose exponent range holds small gradients."""

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_interval: int = 2000):
        self.enabled, self.growth_interval = enabled, growth_interval
        self.scale = init_scale if enabled else 1.0
        self.good_steps = 0
        self.lowered = False  # the last update lowered the scale (an overflow while it was above 1)

    def unscale(self, params: list[torch.Tensor]) -> None:
        """Divide the parameters' gradients by the scale (nothing to do, and no list built, when disabled)."""
        if self.enabled:
            torch._foreach_div_([p.grad for p in params if p.grad is not None], self.scale)

    def update(self, overflow: bool) -> None:
        self.lowered = False
        if not self.enabled:
            return
        if overflow:
            self.lowered = self.scale > 1.0
            self.scale, self.good_steps = max(self.scale / 2, 1.0), 0
        else:
            self.good_steps += 1
            if self.good_steps % self.growth_interval == 0:
                self.scale = min(self.scale * 2, 2.0**24)

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


def checkpoint_name(config: RunConfig, run_id: str, step: int) -> str:
    """`<run name>-step=<S>`: the stem of a checkpoint's two files (`checkpoint_files`)."""
    from .runs import slugify

    return f"{slugify(config.name or run_id)}-step={step:06d}"


ADAPTER_SUFFIX, STATE_SUFFIX = ".safetensors", ".state.pt"


def checkpoint_files(stem: str) -> tuple[str, str]:
    """(adapter file, training-state file) names of the checkpoint `stem`."""
    return stem + ADAPTER_SUFFIX, stem + STATE_SUFFIX


def checkpoint_step(state_path: Path) -> int:
    """S of a `<name>-step=<S>.state.pt` file (-1 for other names: tried last)."""
    match = re.search(r"-step=(\d+)" + re.escape(STATE_SUFFIX) + "$", state_path.name)
    return int(match.group(1)) if match else -1


class Trainer:
    """One run's training state. `setup()` loads everything (and resumes); `train(control)` runs to the end."""

    def __init__(self, config: RunConfig, folder: Path, run_id: str, log: EventLog, model_provider=None,
                 registry: RunRegistry | None = None):
        self.config, self.folder, self.run_id, self.log = config, Path(folder), run_id, log
        self.model_provider, self.registry = model_provider, registry
        self.step = 0
        self.step_offset = 0  # from a continued LoRA file's metadata
        self.epoch_offset = 0  # likewise: the epochs our checkpoints record count on from the file's
        self.last_saved_step: int | None = None
        # prompt -> (embedding [L, D], mask [L]) in host memory, bounded: see TextEncoderCache
        self.prompt_cache = TextEncoderCache(size=2**31, max_bytes=PROMPT_CACHE_BYTES)

    # ------------------------------------------------------------------------------------------------ setup
    def load_model(self, spec: str, variant: str):
        from ..sa3.model import load_model

        if self.model_provider is not None:
            return self.model_provider(spec, variant, self.config.precision, str(self.device))
        return load_model(spec, dtype=self.config.precision, device=self.device, variant=variant,
                          models_dir=self.config.models_dir)

    def release_model(self) -> None:
        """The run no longer uses its model (it ended, failed or stopped): it may be offloaded again."""
        if getattr(self, "_holds_model", False):
            self._holds_model = False
            self.model.residency.release()

    def load_arc_model(self, spec: str):
        """(model, private) for ARC demos: the ARC model already loaded in this process when the model provider has
        it (ComfyUI's model cache; not private), else a sibling of the training model holding only the ARC DiT and
        conditioner (`sa3.sibling.load_sibling`; private: the run drops it after each round of demos)."""
        from ..sa3.sibling import load_sibling

        loaded = getattr(self.model_provider, "loaded", None)
        found = loaded(spec, "arc", self.config.precision, str(self.device)) if loaded is not None else None
        if found is not None:
            return found, False
        sibling = load_sibling(self.model, spec, "arc", models_dir=self.config.models_dir)
        return sibling, sibling is not self.model

    def setup(self) -> None:
        c = self.config
        self.device = pick_device(c.device)
        self.model = self.load_model(c.model, "base")
        self.model.residency.acquire()  # the run trains against these weights until `release_model`: never offloaded
        self._holds_model = True
        check_trainable(self.model)
        if self.model.is_arc:
            self.log.emit("warning", message="training on an ARC (post-trained) model; adapters are meant to be "
                                             "trained on the base model")
        self.dataset = open_dataset(c, self.model)
        record = self.folder / DATASET_RECORD
        if not record.exists():  # what it trains on: a resume after the folder moved may take the same dataset there
            atomic_write_json(record, {"identity": self.dataset.identity(), "folder": str(self.dataset.root)})
        if warning := dataset_warning(self.dataset):
            self.log.emit("warning", message=warning)
        self.items = self.dataset.prompt_items()
        prompt_config = dict(c.prompt_config)
        if c.trigger_word and not prompt_config.get("trigger"):
            prompt_config["trigger"] = c.trigger_word
            prompt_config.setdefault("trigger_percent", 100.0)
        self.prompt_config = PromptConfig.from_dict(prompt_config)
        self.crop_latents = c.crop_latents(self.model.config)
        if self.crop_latents < c.crop_latents(self.model.config, capped=False):
            self.log.emit("warning", message=f"crop_seconds {c.crop_seconds:g} is longer than this model's maximum "
                          f"of {self.crop_latents / self.model.config.latent_rate:.3g} s; training crops are capped there")
        self.shift = schedules.training_shift_from_config(self.model.config.diffusion)
        self.hold_out_items()

        resume = self.find_resume_point()
        if c.continue_from and resume is not None:
            # the run's own checkpoint has the adapter: the file it started from may have moved or been replaced
            adapter = read_adapter_file(self.folder / resume["path"])
            if not Path(c.continue_from).is_file():
                self.log.emit("warning", message=f"continue_from {Path(c.continue_from).name} is gone; resuming "
                              f"from the run's own checkpoint at step {resume['step']}")
        elif c.continue_from:
            adapter = open_continue_from(c)
            notes = []
            if not c.reset_step:
                self.step_offset, step_warning, step_source = continued_step(adapter)
                self.epoch_offset, epoch_warning = continued_epoch(adapter)
                for warning in (step_warning, epoch_warning):
                    if warning:
                        self.log.emit("warning", message=warning)
                notes += {"file name": ["the step in its file name"], "none": ["the file records no step"]}.get(
                    step_source, [])
            defaults = RunConfig(dataset=c.dataset)  # a setting left at its default was not asked for: no notice
            ignored = [f"{name} {mine}" for name, mine, theirs in (("adapter_type", c.adapter_type, adapter.adapter_type),
                                                                   ("rank", c.rank, adapter.rank))
                       if mine != theirs and mine != getattr(defaults, name)]
            if ignored:
                notes.append(f"the file decides: the config's {', '.join(ignored)} does not apply")
            self.log.emit("status", status="loading", message=f"continuing {adapter.adapter_type} rank "
                          f"{adapter.rank} from {Path(c.continue_from).name} at step {self.step_offset}"
                          + (f" ({'; '.join(notes)})" if notes else ""))
        else:
            g = torch.Generator().manual_seed(derive_seed(c.seed, "init"))
            adapter = new_adapter(self.model.modules, c.adapter_type, c.rank, c.effective_alpha, roots=SA3_ROOTS,
                                  include=list(c.include) or None, exclude=list(c.exclude) or None, preset=c.targets,
                                  dropout=c.dropout, generator=g)
        self.adapter = adapter
        xs_source = model_xs_bases(self.model) if adapter.is_xs else None  # svd_bases_path, base beside ARC
        with notices.collected():  # its warnings go out below as the run's events, once (not also as Python's)
            self.stack = AdaptedModel(self.model.modules, [adapter], SA3_ROOTS, trainable=True,
                                      detach_norm=c.detach_norm, xs_bases=xs_source)
        self.base_fingerprint = trained_on_fingerprint(self.model.modules, adapter, SA3_ROOTS, xs_source)
        for note in self.stack.report.notes:  # e.g. where -xs bases come from: said where the run's messages are
            self.log.emit("status", status="loading", message=note)
        for warning in self.stack.report.warnings:
            self.log.emit("warning", message=warning)
        self.has_dropout = self.stack.has_dropout()  # fixed by the adapter's lora_config: not looked up every step
        params = self.stack.parameters()
        named = [(s_name, p) for slot in self.stack.slots(0).values() for s_name, p in slot.named_parameters()]
        decay = [p for n, p in named if not n.startswith("magnitude")]
        no_decay = [p for n, p in named if n.startswith("magnitude")]  # DoRA/BoRA norms: no pull towards zero
        assert len(decay) + len(no_decay) == len(params)
        groups = [{"params": decay, "weight_decay": c.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        self.params = params
        self.param_names = [f"{layer}.{name}" for layer, slot in self.stack.slots(0).items()
                            for name, _ in slot.named_parameters()]  # the order of `params` (slot by slot)
        self.optimizer = adamw(groups, lr=c.lr, betas=tuple(c.betas))
        warmup = max(0, c.warmup_steps)
        self.loss_scale = LossScale(enabled=c.precision == "fp16")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        # The adapted model is a view of the shared tree (training runs the view, never thread routing: a
        # checkpointed block recomputed by autograd's backward threads would not see a per-thread route).
        self.view = self.stack.module
        self.view.model.model.gradient_checkpointing = c.gradient_checkpointing
        if resume is not None:
            self.load_state(resume["state"])
            self.last_saved_step = self.global_step
            self.log.emit("status", status="loading", message=f"resumed from step {self.global_step}")
        if c.tensorboard and self.is_main and isinstance(getattr(self.log, "listeners", None), list):
            # a resumed run replays the steps after its checkpoint, and a run that failed before its first
            # checkpoint starts over: TensorBoard drops the earlier attempt's events from there
            start = attempt_start_step(self.folder, self.global_step, resumed=resume is not None)
            self.log.listeners.append(TensorBoardSink(self.folder, start_step=start))
        if self.registry is not None:  # a continued file sets type and rank, whatever the config said
            self.registry.update(self.run_id, adapter_type=adapter.adapter_type, rank=adapter.rank)
        self.ready = True  # set up, a resumed run's state loaded: global_step is where the run is

    def hold_out_items(self) -> None:
        """Split the dataset into training items and the held-out items of validation (`ValidationPlan`: chosen at
        the run's first start, kept in its folder by file, so files added later train and a resume with another
        crop scores the same crops). Held-out files gone from the dataset are named in a warning."""
        c = self.config
        plan = ValidationPlan.load_or_create(self.folder, [r for r, _ in self.items], c.validation_items,
                                             random.Random(derive_seed(c.seed, "validation")), self.crop_latents,
                                             c.crop_from == "random", write=self.is_main)
        self.validation_plan = plan
        self.validation = None  # the held-out items' crops, noise and prompts, built at the first evaluation
        self.validated_step = None  # the global step last scored (kept in the training state)
        if plan is None:
            self.train_ids, self.validation_ids = list(range(len(self.items))), []
            return
        self.train_ids, self.validation_ids, gone = plan.indices([r for r, _ in self.items])
        if gone:
            self.log.emit("warning", message=f"{len(gone)} held-out file(s) are no longer in the dataset and are "
                          f"not scored: {', '.join(gone[:5])}{' …' if len(gone) > 5 else ''}")
        if not self.train_ids:
            raise RunError(f"RunConfig.validation_items: every file of {c.dataset} is held out for validation; "
                           f"remove {self.folder / PLAN_FILE} to choose again")

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"step": self.step, "step_offset": self.step_offset, "epoch_offset": self.epoch_offset,
                "adapter": [p.detach().clone() for p in self.params], "adapter_names": list(self.param_names),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "loss_scale": self.loss_scale.state_dict(), "validated_step": self.validated_step}

    def load_state(self, state: dict) -> None:
        if len(state["adapter"]) != len(self.params) or state.get("adapter_names", self.param_names) != self.param_names:
            raise RunError("the training state does not match this run's adapter (different targets?)")
        with torch.no_grad():
            for p, saved in zip(self.params, state["adapter"]):
                p.copy_(saved)
        load_adamw_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "loss_scale" in state:  # states written before fp16 loss scaling start from the initial scale
            self.loss_scale.load_state_dict(state["loss_scale"])
        self.step, self.step_offset = int(state["step"]), int(state["step_offset"])
        self.epoch_offset = int(state.get("epoch_offset", 0))  # states written before it was kept: 0
        self.validated_step = state.get("validated_step")  # a stop mid-validation saved without it: scored again
        self.apply_optimizer_settings()

    def apply_optimizer_settings(self) -> None:
        """The config's learning rate, betas and weight decay on the loaded optimiser and schedule (the saved
        state carries those of the run's start; a resumed run may have changed them: `RunRegistry.amend`). The
        same values give the same numbers, so an unchanged resume stays bit-exact."""
        c = self.config
        self.scheduler.base_lrs = [c.lr] * len(self.optimizer.param_groups)
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group in self.optimizer.param_groups:
            group["initial_lr"], group["lr"], group["betas"] = c.lr, c.lr * factor, tuple(c.betas)
        self.optimizer.param_groups[0]["weight_decay"] = c.weight_decay  # `setup`'s first group; the magnitudes' has none
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def prune_states(self) -> None:
        """With `keep_states` N > 0, delete all but the newest N training-state files (each holds the adapter and
        AdamW's two moments in fp32: about 6x the fp16 adapter file, gigabytes over a long run). The adapter files
        stay, so every checkpoint can still be used or continued from; only the pruned ones can no longer be resumed
        exactly. Called after latest.json names the new state, which is always kept."""
        keep = self.config.keep_states
        if keep <= 0:
            return
        states = sorted((self.folder / "checkpoints").glob("*" + STATE_SUFFIX), key=checkpoint_step, reverse=True)
        for old in states[keep:]:
            old.unlink(missing_ok=True)

    def find_resume_point(self) -> dict | None:
        """The newest readable checkpoint of this run: {"step", "path", "state_path", "state"} or None when it has
        none. latest.json names it; when that file or its state is damaged or missing, the newest intact state file
        in checkpoints/ is used instead (a warning names what was skipped). A run with checkpoints of which none
        reads is a RunError naming them: it must not silently start again from step 0."""
        candidates, seen = [], set()
        latest = self.folder / "latest.json"
        try:
            info = json.loads(latest.read_text(encoding="utf-8"))
            candidates.append((info["state_path"], info["path"]))
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError) as e:
            self.log.emit("warning", message=f"{latest.name} is damaged ({e}); using the newest intact checkpoint")
        states = sorted((self.folder / "checkpoints").glob("*" + STATE_SUFFIX), key=checkpoint_step, reverse=True)
        for p in states:
            adapter_name, state_name = checkpoint_files(p.name.removesuffix(STATE_SUFFIX))
            candidates.append((f"checkpoints/{state_name}", f"checkpoints/{adapter_name}"))
        for state_path, adapter_path in candidates:
            if state_path in seen:
                continue
            seen.add(state_path)
            try:
                state = torch.load(self.folder / state_path, map_location="cpu", weights_only=True)
            except Exception as e:  # truncated by a full disk, deleted by hand, ...
                self.log.emit("warning", message=f"skipping {state_path}: unreadable ({type(e).__name__}: {e})")
                continue
            return {"step": int(state["step_offset"]) + int(state["step"]), "path": adapter_path,
                    "state_path": state_path, "state": state}
        if seen:
            raise RunError(f"no readable training state among {sorted(seen)}; the run cannot resume (start a new "
                           "run with continue_from set to one of its .safetensors checkpoints)")
        return None

    @property
    def global_step(self) -> int:
        return self.step_offset + self.step

    def save_checkpoint(self) -> dict:
        """Adapter file (SA3-native, loads everywhere) + training state, then latest.json last (atomic)."""
        c = self.config
        name = checkpoint_name(c, self.run_id, self.global_step)
        ckpt_dir = self.folder / "checkpoints"
        ckpt_dir.mkdir(exist_ok=True)
        adapter = self.stack.export(0)
        adapter_name, state_name = checkpoint_files(name)
        adapter_path = ckpt_dir / adapter_name
        tmp = ckpt_dir / f".{adapter_name}.tmp"
        write_adapter_file(tmp, adapter, base_pack=self.model.pack or model_label(c.model), step=self.global_step,
                           epoch=self.epoch_offset + self.step * c.batch_size // max(1, len(self.train_ids)),
                           trigger_words=[c.trigger_word] if c.trigger_word else [], created_by=CREATED_BY,
                           base_fingerprint=self.base_fingerprint)
        fsync_replace(tmp, adapter_path)
        state_path = ckpt_dir / state_name
        tmp = ckpt_dir / f".{state_name}.tmp"
        torch.save(self.state_dict(), tmp)
        fsync_replace(tmp, state_path)
        info = {"step": self.global_step, "step_offset": self.step_offset, "path": f"checkpoints/{adapter_path.name}",
                "state_path": f"checkpoints/{state_path.name}", "time": time.time()}
        atomic_write_json(self.folder / "latest.json", info)
        self.prune_states()
        self.last_saved_step = self.global_step
        if self.registry is not None:
            self.registry.update(self.run_id, step=self.global_step)
        self.log.emit("checkpoint", step=self.global_step, path=info["path"], state_path=info["state_path"])
        return info

    # ------------------------------------------------------------------------------------------------ data
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen T5's output, once per distinct prompt while it stays in the run's cache (`PROMPT_CACHE_BYTES`,
        least recently used out first; T5 runs per prompt, so one encoded again gives the same bits), stacked on the
        device: (hidden [B, L, text_dim], mask [B, L] bool). The prompt conditioner's own layers (padding embedding,
        `proj_out` where a model has one, which adapters may target) run at each step: `rectified_flow_loss`."""
        prompt_cond = self.model.conditioner.conditioners["prompt"]
        found = {p: self.prompt_cache.get(p) for p in dict.fromkeys(prompts)}
        missing = [p for p, value in found.items() if value is None]
        if missing:
            with torch.no_grad():
                emb, mask = prompt_cond.encode_prompts(missing, self.device)
            for p, e, m in zip(missing, emb, mask):
                found[p] = (e.detach().cpu().clone(), m.detach().cpu().clone())
                self.prompt_cache.put(p, found[p])
        embs, masks = zip(*(found[p] for p in prompts))
        return torch.stack(embs).to(self.device), torch.stack(masks).to(self.device)

    def make_batch(self, step: int) -> dict:
        c = self.config
        indices = [self.train_ids[k] for k in batch_indices(len(self.train_ids), c.batch_size, step, c.seed)]
        latents, masks, seconds = [], [], []
        for j, i in enumerate(indices):
            rng = random.Random(derive_seed(c.seed, step, j, "crop"))
            z, mask, meta = self.dataset.item(i, self.crop_latents, random_crop=c.crop_from == "random", rng=rng)
            latents.append(torch.from_numpy(z))
            masks.append(torch.from_numpy(mask).bool())
            seconds.append(item_seconds(meta, mask, self.model.config.latent_rate))
        prompts = batch_prompts(self.items, indices, self.prompt_config, c.seed, self.global_step_at(step))
        return {"x0": torch.stack(latents), "padding_mask": torch.stack(masks), "seconds": seconds,
                "prompts": prompts, "indices": indices}

    def global_step_at(self, step: int) -> int:
        return self.step_offset + step

    # ------------------------------------------------------------------------------------------------ step
    def loss_for_batch(self, batch: dict, step: int):
        """Draw step `step`'s random sources (all from one generator seeded by run seed and step) and return
        (FlowLoss, t) of `rectified_flow_loss`."""
        c, model, device = self.config, self.model, self.device
        g = torch.Generator().manual_seed(derive_seed(c.seed, step, "noise"))
        x0 = batch["x0"].to(device)
        b, _, n = x0.shape
        padding = batch["padding_mask"].to(device)
        # Silence extension (official train_lora): the valid region grows by Exp(mean 4 s) latents into the padding.
        ext = torch.empty(b).exponential_(1.0, generator=g) * SILENCE_EXTENSION_SECONDS * model.config.latent_rate
        valid = (padding.sum(1) + ext.round().long().to(device)).clamp(max=n)
        augmented = torch.arange(n, device=device)[None] < valid[:, None]
        seq_len = schedules.effective_length(batch["seconds"], model.config.sample_rate, model.downsampling_ratio)
        t = schedules.sample_training_t(b, c.timestep_sampler, generator=g, shift=self.shift, seq_len=seq_len)
        noise = torch.randn(x0.shape, generator=g)
        inpaint = schedules.random_inpaint_mask(augmented.cpu(), g, probabilities=tuple(c.inpaint_probabilities))
        keep = torch.rand(b, generator=g) >= c.cfg_dropout  # CFG dropout of the whole cross-attention context
        prompt = self.encode_prompts(batch["prompts"])
        result, _ = rectified_flow_loss(model, x0, noise.to(device), t.to(device), inpaint.to(device), augmented,
                                        prompt, batch["seconds"], keep.to(device), c.ot_coupling,
                                        c.mask_loss_weight, tree=self.view)
        return result, t

    def validate(self, stop_requested=lambda: False) -> dict | None:
        """Score the held-out items (`validation.py`) with the adapter as it is now: {"loss", "levels"}, or None when
        stopped. The full-generation objective at fixed t, noise, crops and prompts, without gradients, CFG dropout
        or OT pairing, `validation_batch` items per forward, so it needs no more memory than a step."""
        c, device = self.config, self.device
        if self.validation is None:
            prompts = batch_prompts(self.items, self.validation_ids, self.prompt_config, c.seed, 0)
            plan = self.validation_plan
            self.validation = build_validation_set(
                self.dataset, self.validation_ids, plan.crop_latents, plan.random_crop, prompts,
                self.model.config.latent_rate, lambda i, label: derive_seed(c.seed, self.items[i][0], label))
        v = self.validation

        def per_item_loss(rows: slice, t: float) -> torch.Tensor:
            x0 = v.x0[rows].to(device)
            b, _, n = x0.shape
            result, _ = rectified_flow_loss(self.model, x0, v.noise[rows].to(device),
                                            torch.full((b,), t, device=device), torch.zeros(b, 1, n, device=device),
                                            v.padding[rows].to(device), self.encode_prompts(v.prompts[rows]),
                                            v.seconds[rows], None, False, c.mask_loss_weight, tree=self.view)
            return result.per_item.float().cpu()

        return score(v, per_item_loss, self.validation_batch, noise_levels(), stop_requested)

    @property
    def validation_batch(self) -> int:
        """Held-out items per no-grad forward: the items of one training step (DistributedTrainer: of one rank's
        share, since only rank 0 scores), so scoring never needs more memory than training."""
        return self.config.batch_size

    def validate_if_due(self, control: RunControl) -> bool:
        """Score the held-out items at step 0 (the baseline), every `validation_every` steps (0: with each
        checkpoint) and at the last step, before that step's checkpoint is written, so that its state records the
        step as scored and a run resumed there does not score it again. A stop cancels a score in progress (the
        resumed run scores that step): returns True when that happened. A failure saves the last step first, as a
        failing training step does."""
        c = self.config
        if not (self.is_main and self.validation_ids) or self.validated_step == self.global_step:
            return False
        if self.step % (c.validation_every or c.checkpoint_every) and self.step != c.steps:
            return False
        try:
            scored = self.validate(self.stop_asked(control))
        except Exception:
            self.checkpoint_before_failing()
            raise
        if scored is None:
            return True
        self.validated_step = self.global_step
        self.log.emit("validation", step=self.global_step, items=len(self.validation_ids), **scored)
        return False

    checkpoint_on_failure = True  # DistributedTrainer: False (its checkpoint needs every rank, which may be gone)
    _updating = False  # True while the parameters move: a failure then leaves no consistent step to save

    def checkpoint_before_failing(self) -> None:
        """A step failed (a latent file broke mid-run, ...): save the last completed step, if not saved yet, so the
        failure loses nothing; never hides the original error."""
        if not (self.checkpoint_on_failure and self.is_main) or self._updating \
                or self.last_saved_step == self.global_step:
            return
        try:
            self.save_checkpoint()
        except Exception as e:
            self.log.emit("warning", message=f"could not save step {self.global_step} after the failure: {e}")

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward(), times the fp16 loss scale (`LossScale`): fp16 activation gradients would otherwise
        round small values to zero."""
        (loss * self.loss_scale.scale if self.loss_scale.enabled else loss).backward()

    def apply_update(self) -> tuple[float, float, bool]:
        """Unscale (fp16), clip the gradients, step AdamW and the schedule; returns (grad norm before clipping, lr
        used, skipped). A non-finite norm (an fp16 overflow) skips the update and lowers the loss scale; the
        schedule still moves so step s keeps its learning rate."""
        c = self.config
        self.loss_scale.unscale(self.params)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip if c.grad_clip > 0 else float("inf")))
        lr = self.optimizer.param_groups[0]["lr"]
        skipped = not math.isfinite(grad_norm)
        self.loss_scale.update(overflow=skipped)
        self._updating = True
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        with warnings.catch_warnings():  # torch warns of a schedule step without an optimiser step: wanted here
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        self.stack.update()  # the merged/cached forms of the trained layers are stale after the update
        self._updating = False
        return grad_norm, lr, skipped

    @contextlib.contextmanager
    def adapter_dropout(self, step: int):
        """LoRA dropout (the adapter file's `dropout`) on for step `step`'s forward and backward, off for demos and
        generation. Its masks are drawn once per step from a private generator seeded by (run seed, step): a resumed
        run draws the same masks, every DDP rank the same, a recomputed checkpointed block the same, and no global
        random state is touched (other runs and ComfyUI draw from it in other threads)."""
        if not self.has_dropout:
            yield
            return
        self.stack.set_training(True, torch.Generator().manual_seed(derive_seed(self.config.seed, step, "lora-dropout")))
        try:
            yield
        finally:
            self.stack.set_training(False)

    def train_step(self, step: int) -> dict:
        batch = self.make_batch(step)
        with self.adapter_dropout(step):
            result, t = self.loss_for_batch(batch, step)
            self.optimizer.zero_grad(set_to_none=True)
            self.backward(result.loss)
        grad_norm, lr, skipped = self.apply_update()
        per_item = result.per_item.detach().float().cpu().tolist()
        return {"loss": float(result.loss.detach()), "lr": lr, "grad_norm": grad_norm, "skipped": skipped,
                "delta_norm": self.stack.delta_norm(0),
                "samples": [[round(float(ti), 5), li] for ti, li in zip(t.cpu().tolist(), per_item)]}

    # ------------------------------------------------------------------------------------------------ loop
    is_main = True  # the process that writes files and renders demos (rank 0 when distributed)

    def step_requests(self, control: RunControl) -> StepRequests:
        """What the run is asked at this step boundary: its own RunControl (node, panel, signal) plus the request
        files `sa3-lora runs stop|save|pause|continue` leave in the run folder from another process."""
        apply_requests(self.folder, control)
        return StepRequests(stop=control.stop.is_set(), save=control.take_save(), pause=control.paused)

    def stop_asked(self, control: RunControl, poll_seconds: float = 1.0):
        """stop_requested() for demos: this process's stop flag, and about once a second the request files another
        process leaves (`sa3-lora runs stop`), so a stop acts within a sampling step, not after the demos."""
        last = [0.0]

        def asked() -> bool:
            if time.monotonic() - last[0] >= poll_seconds:
                last[0] = time.monotonic()
                apply_requests(self.folder, control)
            return control.stop.is_set()

        return asked

    def wait_for_requests(self, control: RunControl) -> None:
        """While paused: until an in-process flag changes, or ~0.5 s so that request files are polled."""
        control.resume_event.wait(0.5)

    def at_step_boundary(self, control: RunControl, set_status) -> bool:
        """Honour save-now, pause and stop between two steps; True = stop (the caller saves first). A paused run
        keeps polling, so it can be saved, continued or stopped from any process while it waits."""
        paused = False
        while True:
            asked = self.step_requests(control)
            if asked.save and not asked.stop and self.last_saved_step != self.global_step:
                self.save_checkpoint()
            if asked.stop or not asked.pause:
                break
            if not paused:
                set_status("paused", step=self.global_step)  # the list shows where it waits (steps are written every 5)
                paused = True
            self.wait_for_requests(control)
        if paused and not asked.stop:
            set_status("training")
        return asked.stop

    def train(self, control: RunControl, set_status=lambda status, **kw: None) -> str:
        """Train until done or stopped; returns "done" or "stopped". On the CPU, freed step memory stays mapped
        while this runs (`cpu_heap`: no page faults re-touching the activations at every step)."""
        kept = self.device.type == "cpu" and keep_heap()
        try:
            return self._train_loop(control, set_status)
        finally:
            if kept:
                release_heap()

    def _train_loop(self, control: RunControl, set_status) -> str:
        c = self.config
        from .demos import emit_missing_demo_events, run_demos

        set_status("training")
        rate = step_rate.StepRate(self.step)
        demos_done = {int(p.name[5:]) for p in (self.folder / "demos").glob("step_*")
                      if p.is_dir() and p.name[5:].isdigit()}  # not step_*.partial: a crash mid-demos left it
        if self.is_main and demos_done:
            emit_missing_demo_events(self)  # a kill between a step's demo events: the rest are said now
        while True:
            cancelled = self.validate_if_due(control)  # the baseline, or a step whose score a stop cancelled
            dropped = False  # a stop between two demos drops the step's demos (a restart renders them)
            if self.is_main and c.demo_every and self.global_step % c.demo_every == 0 \
                    and self.global_step not in demos_done:
                set_status("demos")
                dropped = run_demos(self, self.global_step, stop_requested=self.stop_asked(control)) is None
                if not dropped:
                    demos_done.add(self.global_step)
                set_status("training")
            if self.step >= c.steps:
                if dropped or cancelled:  # the final step is saved already; "stopped", so that a restart renders
                    set_status("stopped")  # its demos and scores it
                    return "stopped"
                break
            with rate.left_out():  # a pause (or a save asked for) is not training time
                stop = self.at_step_boundary(control, set_status)
            if stop:
                if self.last_saved_step != self.global_step:
                    self.save_checkpoint()
                set_status("stopped")
                return "stopped"
            try:
                metrics = self.train_step(self.step)
            except Exception:
                self.checkpoint_before_failing()
                raise
            self.step += 1
            steps_per_s = rate.after_step(self.step)
            if not math.isfinite(metrics["loss"]):
                hint = "lower the learning rate" + ("" if c.precision == "fp32" else ", or train in fp32")
                raise RunError(f"the loss became {metrics['loss']} at step {self.global_step}; {hint} (the run "
                               "resumes from its last checkpoint)")
            self.log.emit("step", step=self.global_step, steps_per_s=round(steps_per_s, 4), **metrics)
            if metrics["skipped"] and self.loss_scale.lowered:  # finding its level
                self.log.emit("loss_scale", step=self.global_step, scale=self.loss_scale.scale,
                              message=f"step {self.global_step}: fp16 gradients overflowed at this loss scale; the "
                                      f"update was skipped and the scale lowered to {self.loss_scale.scale:g}")
            elif metrics["skipped"]:
                why = "an fp16 overflow? try bf16 or fp32" if c.precision == "fp16" else "a lower learning rate helps"
                self.log.emit("warning", message=f"step {self.global_step}: the gradient norm was "
                              f"{metrics['grad_norm']}, the update was skipped ({why})")
            if self.registry is not None and (self.step % 5 == 0 or self.step == c.steps):
                self.registry.update(self.run_id, step=self.global_step)
            self.validate_if_due(control)
            if self.step % c.checkpoint_every == 0 or self.step == c.steps:
                self.save_checkpoint()
        set_status("done")
        return "done"


def rectified_flow_loss(model, x0, noise, t, inpaint_mask, padding_mask, prompt, seconds, keep=None,
                        ot_coupling: bool = True, mask_loss_weight: float = 1.0, padding_semantics: str = "mask_keys",
                        tree=None):
    """The official training objective for one batch, given its random sources.

    x0: [B, C, T] clean latents; noise: [B, C, T]; t: [B] (already shifted; 1 = noise); inpaint_mask: [B, 1, T]
    (1 = context given to the model, 0 = generated); padding_mask: [B, T] bool (the augmented valid region);
    prompt: the prompt conditioning, [B, L, D] as given, or the frozen T5's (hidden [B, L, text_dim], mask [B, L])
    to run through the tree's prompt conditioner (its padding embedding and any `proj_out`); seconds: B durations;
    keep: [B] bool, False drops the item's whole cross-attention context (CFG dropout). Noise rows are re-paired
    with data by minibatch OT when `ot_coupling`.
    x_t = (1-t)·x0 + t·noise, target = noise - x0, MSE on the generated region plus `mask_loss_weight` × the context
    MSE, padding excluded. The conditioners' own layers run here (with gradients: adapters may adapt them).
    padding_semantics: "mask_keys" (true key masking, what the real models were trained with through flash-attn
    varlen) or "zero_values" (the official CPU fallback's quirk, used by the reference goldens).
    tree: the module tree to run (an adapter view, `AdaptedModel.module`); default the model's own.
    Returns (schedules.FlowLoss, v_pred)."""
    device = x0.device
    if ot_coupling and x0.shape[0] > 1:
        noise = noise[schedules.ot_noise_permutation(x0.cpu(), noise.cpu()).to(device)]
    x_t, target = schedules.flow_pair(x0, noise, t)
    local = torch.cat([inpaint_mask, x0 * inpaint_mask], dim=1)
    seconds_t = torch.as_tensor(seconds, dtype=torch.float32, device=device)
    tree = tree if tree is not None else model.modules
    sec_emb, _ = tree.conditioner.conditioners["seconds_total"](seconds_t, device)
    prompt_emb = tree.conditioner.conditioners["prompt"].project(*prompt)[0] if isinstance(prompt, tuple) else prompt
    cross = torch.cat([prompt_emb.to(sec_emb.dtype), sec_emb], dim=1)
    if keep is not None:
        cross = cross * keep[:, None, None].to(cross.dtype)
    dtype = model.dtype
    autocast = torch.autocast(device.type, dtype=dtype) if device.type == "cuda" and dtype != torch.float32 \
        else _null_context()
    with autocast:
        v = tree.model.model(x_t.to(dtype), t.float(), cross.to(dtype), sec_emb[:, 0].to(dtype), local.to(dtype),
                      padding_mask=padding_mask, padding_semantics=padding_semantics)
    return schedules.masked_flow_loss(v.float(), target, padding_mask, inpaint_mask, mask_loss_weight), v


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def failed_at(trainer) -> dict:
    """{"step": where a failed run is} for the run index: the step its message names; nothing before setup loaded a
    resumed run's state (its step would read 0 over the real one)."""
    return {"step": trainer.global_step} if getattr(trainer, "ready", False) else {}


def failure_message(error: BaseException, trainer: Trainer | None) -> str:
    """The `error` a failed run records: the exception, and for running out of device memory what to change (the
    run resumes from its last checkpoint with the same settings, so it would fail the same way)."""
    from ..sa3.residency import is_out_of_memory

    message = f"{type(error).__name__}: {error}"
    if is_out_of_memory(error):
        from .vram import memory_advice

        where = f" at step {trainer.global_step}" if trainer is not None else ""
        advice = memory_advice(trainer.config if trainer is not None else None)
        message = f"out of device memory{where}: {advice} (the VRAM estimate of SA3 Train LoRA / training.vram). {message}"
    return message


def run_training(registry: RunRegistry, run_id: str, control: RunControl, log: EventLog, model_provider=None) -> str:
    """Entry used by the worker thread and the CLI: loads, resumes if there is a checkpoint, trains, reports."""
    config = registry.config(run_id)

    def set_status(status: str, **extra) -> None:
        registry.update(run_id, status=status, **extra)
        log.emit("status", status=status, **extra)

    set_status("loading")
    trainer = None
    try:
        trainer = Trainer(config, registry.run_dir(run_id), run_id, log, model_provider, registry)
        trainer.setup()
        registry.amend_took(run_id)
        registry.update(run_id, step=trainer.global_step, total_steps=trainer.step_offset + config.steps)
        return trainer.train(control, set_status)
    except BaseException as e:
        message = failure_message(e, trainer)
        if not getattr(trainer, "ready", False) and registry.undo_amend(run_id):
            message += " (the settings this resume changed are back as they were: give them again when you resume)"
        registry.update(run_id, status="failed", error=message, **failed_at(trainer))
        log.emit("error", message=message)
        log.emit("status", status="failed", error=message)
        raise
    finally:
        if trainer is not None:
            trainer.release_model()


__all__ = ["Trainer", "failed_at", "failure_message", "run_training", "rectified_flow_loss", "batch_indices", "derive_seed"]
