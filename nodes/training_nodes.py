"""Training nodes: start a background run, watch it (charts as IMAGE, latest checkpoint), control it.

One `TrainingManager` lives for the ComfyUI process (runs under output/sa3_runs). Training runs in a background
thread, so the queue stays free; its events go to the browser over ComfyUI's websocket (`sa3.<type>`), and the
routes in `routes.py` serve the panel. ComfyUI's cancel button does not stop training (runs have their own flags).
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from pathlib import Path

import torch

from ..encoding.audio_write import OUTPUT_FORMATS
from .comfy_bridge import CATEGORY, free_comfy_memory, output_dir, send_event, throw_if_interrupted
from .dataset_nodes import text_list

_MANAGER = None
_MANAGER_LOCK = threading.Lock()
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# config fields whose node input has another name; any other `RunConfig.x` / `DemoSpec.x` is the input x
NODE_INPUT_NAMES = {"RunConfig.lr": "learning_rate", "DemoSpec.duration": "seconds", "DemoSpec.seed": "demo_seed"}


def node_error(node: str, error: Exception) -> ValueError:
    """The ValueError a node raises for a RunError: the node's name first, then the message with the config's field
    names as the node's inputs are called (`RunConfig.lr: ...` is `learning_rate: ...` on the node). On SA3 Train
    LoRA, a field that is an input of SA3 Training Options says so."""
    on_options = set()
    if node == "SA3 Train LoRA":
        on_options = set(_input_names(SA3TrainingOptions)) - set(_input_names(SA3TrainLoRA))

    def input_name(m: re.Match) -> str:
        name = NODE_INPUT_NAMES.get(m[0], m[1])
        return f"{name} (on SA3 Training Options)" if name.split("/")[0] in on_options else name

    return ValueError(f"{node}: " + re.sub(r"\b(?:RunConfig|DemoSpec)\.([\w/]+)", input_name, str(error)))


def _input_names(node_class) -> list[str]:
    types = node_class.INPUT_TYPES()
    return [name for group in ("required", "optional") for name in types.get(group, {})]


def continue_from_file(text: str | None) -> str | None:
    """The node's continue_from as a file path (`lora_nodes.lora_file`: a path, a name in ComfyUI's loras folder or
    a run checkpoint as SA3 Load LoRA lists it); None when empty."""
    if text is None or not text.strip():
        return None
    from .lora_nodes import lora_file

    return str(lora_file("SA3 Train LoRA", "continue_from", text, missing_ok=True))  # the run's checks name it


def _forward_event(event: dict) -> None:
    send_event(event["type"], event)


def model_provider(spec: str, variant: str, dtype: str, device: str):
    """Models for runs come from the same cache as SA3 Load Pack, so a run reuses the loaded base model."""
    from ..sa3.model import load_model
    from .comfy_bridge import models_dir
    from .model_nodes import get_or_load

    def loader():
        root = models_dir()
        with torch.inference_mode(False):
            return load_model(spec, dtype=dtype, device=device, variant=variant,
                              models_dir=root / "sa3" if root else None)

    return get_or_load((spec, variant, dtype, str(device)), loader)


def loaded_model(spec: str, variant: str, dtype: str, device: str):
    """The model already in the cache for these settings, or None. A run's ARC demos use the ARC pack when SA3 Load
    Pack has it loaded; otherwise the run loads only its DiT beside the base model for itself (`sa3.sibling`),
    instead of caching a whole second pack for the rest of the session."""
    from .model_nodes import find_loaded

    return find_loaded((spec, variant, dtype, str(device)))


model_provider.loaded = loaded_model


def get_manager(root: str | Path | None = None):
    global _MANAGER
    with _MANAGER_LOCK:
        if _MANAGER is None:
            from ..training.manager import TrainingManager

            base = Path(root) if root else (output_dir() or Path.cwd()) / "sa3_runs"
            _MANAGER = TrainingManager(base, listeners=[_forward_event], model_provider=model_provider,
                                       **manager_options())
        return _MANAGER


class SettingsError(ValueError):
    """A setting of this ComfyUI process (an environment variable) the training runs cannot start with."""


def manager_options(environ=None) -> dict:
    """The training options of a ComfyUI process, from its environment (set them before starting ComfyUI):
    SA3_AUTO_RESUME=1 resumes runs a restart interrupted; SA3_RUNS_PER_DEVICE=N trains N runs at once per device."""
    import os

    environ = os.environ if environ is None else environ
    auto = environ.get("SA3_AUTO_RESUME", "0").strip().lower()
    restart = "; set it right and restart ComfyUI (training runs cannot start until then)"
    if auto not in ("0", "1", "true", "false", "yes", "no", ""):
        raise SettingsError(f"SA3_AUTO_RESUME={auto!r} (an environment variable of SA3 LoRA Studio): use 1 or "
                            f"0{restart}")
    per_device = environ.get("SA3_RUNS_PER_DEVICE", "1").strip() or "1"
    if not per_device.isdigit() or int(per_device) < 1:
        raise SettingsError(f"SA3_RUNS_PER_DEVICE={per_device!r} (an environment variable of SA3 LoRA Studio): "
                            f"use a whole number >= 1{restart}")
    return {"auto_resume": auto in ("1", "true", "yes"), "runs_per_device": int(per_device)}


def reset_manager() -> None:
    """Tests: forget the process-wide manager."""
    global _MANAGER
    with _MANAGER_LOCK:
        _MANAGER = None


def make_room(model, config) -> None:
    """On a GPU, ask ComfyUI to free what the run needs beyond the loaded model (its estimate): ComfyUI keeps its
    own models on the device until its next load wants the memory, which a background run never asks for."""
    from ..training.vram import estimate_training_memory

    if model.device.type == "cpu":
        return
    estimate = estimate_training_memory(model.config, config, getattr(model, "text_encoder_parameters", None))
    free_comfy_memory(estimate["total"] - estimate["weights"] - estimate["text_encoder"], model.device)


def memory_warning(model, config) -> str | None:
    """The VRAM estimate's warning when the run likely does not fit the device (None when it fits or is unknown)."""
    try:
        from ..training.vram import check_fits, estimate_training_memory
    except ImportError:
        return None
    n_text = getattr(model, "text_encoder_parameters", None)
    return check_fits(estimate_training_memory(model.config, config, n_text), model.device, loaded=True)


ADAPTER_TYPE_CHOICES = ["dora-rows", "lora", "dora-cols", "bora", "lora-xs", "dora-rows-xs", "dora-cols-xs", "bora-xs"]


class SA3TrainLoRA:
    @classmethod
    def INPUT_TYPES(cls):
        from ..adapters import PRESETS

        return {"required": {
            "model": ("SA3_MODEL", {"tooltip": "The BASE model of a pack (adapters are trained on base and used on ARC)."}),
            "dataset": ("SA3_DATASET", {"tooltip": "From SA3 Encode Audio Folder or SA3 Load Dataset."}),
            "name": ("STRING", {"default": "my-lora", "tooltip": "Names the run and its checkpoint files."}),
            "adapter_type": (ADAPTER_TYPE_CHOICES, {"default": "dora-rows", "tooltip": "dora-rows is the official "
                             "default; -xs types train far fewer parameters (SVD bases of the base weights)."}),
            "rank": ("INT", {"default": 16, "min": 1, "max": 512, "tooltip": "Adapter capacity: 4-8 for a sound, 16 for a style, 32-64 for a large varied set."}),
            "alpha": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "tooltip": "0 = rank (scale 1)."}),
            "targets": (sorted(PRESETS), {"default": "all", "tooltip": "all: every DiT Linear/Conv1d + the seconds "
                        "conditioner (official); underfit-default: attention + feed-forward of every block."}),
            "steps": ("INT", {"default": 1000, "min": 1, "max": 1000000, "tooltip": "Optimiser steps (~1000 is the official starting point)."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 256, "tooltip": "A creative choice too: bigger "
                           "batches average styles, batch 1 follows single songs."}),
            "crop_seconds": ("FLOAT", {"default": 30.0, "min": 0.5, "max": 380.0, "tooltip": "Training crop length "
                             "(the underrated knob: short crops learn texture, long ones structure)."}),
            "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1e-1, "step": 1e-6, "tooltip": "AdamW learning rate (official 1e-4)."}),
            "checkpoint_every": ("INT", {"default": 200, "min": 1, "max": 100000, "tooltip": "Save the adapter and the training state every N steps (a crash loses at most this many)."}),
            "demo_every": ("INT", {"default": 200, "min": 0, "max": 100000, "tooltip": "0 = no demos."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Controls crops, prompts, noise and t: same seed, same run."}),
            "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip": "Less memory, ~30% slower."}),
            "wait_until_done": ("BOOLEAN", {"default": False, "tooltip": "Block the queue until training ends "
                                "(for headless API use); otherwise return the run id at once."}),
        }, "optional": {
            "prompt_config": ("SA3_PROMPT_CONFIG", {"tooltip": "From SA3 Compose Prompts (default: captions only)."}),
            "trigger_word": ("STRING", {"default": "", "tooltip": "Prepended to every prompt unless the prompt config sets its own."}),
            "demo_prompts": ("STRING", {"default": "", "multiline": True, "tooltip": "One demo prompt per line "
                             "(empty = underfit-like defaults: base CFG 7 and 1, ARC, unconditional)."}),
            "detach_norm": ("BOOLEAN", {"default": False, "tooltip": "DoRA/BoRA types: the weight norms get no "
                            "gradient (DoRA paper 4.3, PEFT's default). Faster steps (BoRA most), same files; the "
                            "official trainer keeps exact gradients (off)."}),
            "demo_format": (list(OUTPUT_FORMATS), {"default": "flac", "tooltip": "Demo audio files: flac or wav (lossless), mp3 "
                            "or opus (small, for long runs with many demos)."}),
            "reset_step": ("BOOLEAN", {"default": False, "tooltip": "With continue_from: count steps from 0 "
                           "instead of continuing the file's step count."}),
            # Socket-only inputs go last: ComfyUI frontend 1.58 mis-assigns saved widget values (shifted by one from
            # here on) when a forceInput input sits between widgets on a node with a seed control widget.
            "continue_from": ("STRING", {"forceInput": True, "tooltip": "A LoRA file to continue (its type, rank, "
                              "alpha and targets are used; its step count goes on unless reset_step): a path (e.g. "
                              "SA3 Run Status's lora_path), a file name in ComfyUI's loras folder, or a run's "
                              "checkpoint as SA3 Load LoRA lists it."}),
            "demos": ("SA3_DEMOS", {"tooltip": "From SA3 Training Demo nodes (chained): demos with their own model "
                      "(base/ARC), CFG, steps, seed, length and strength; demo_prompts lines are added after them."}),
            "options": ("SA3_TRAIN_OPTIONS", {"tooltip": "From SA3 Training Options: layer include/exclude, "
                        "warm-up, weight decay, betas, clipping, dropout, timestep sampler, inpainting mix, ..."}),
        }}

    RETURN_TYPES = ("SA3_RUN", "STRING")
    RETURN_NAMES = ("run", "run_id")
    FUNCTION = "train"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    DESCRIPTION = "Starts LoRA training in the background (ComfyUI stays usable); watch it in the SA3 Training panel."

    @classmethod
    def IS_CHANGED(cls, name="", **_inputs):
        """The runs this node could match and where they are: ComfyUI serves a node's cached result while this stays
        the same, so the same graph queued after a stop resumes, after a delete starts anew, and otherwise says
        what the run is doing, instead of repeating the first message. Widget values only reach here (links do
        not): the runs are matched by name, or all of them when the name comes from a link."""
        try:
            runs = get_manager().registry.list()
        except Exception:  # no runs folder yet, or unreadable: let the node run and say what is wrong
            return float("nan")
        return repr(sorted((r.get("id"), r.get("status"), r.get("step"), r.get("total_steps")) for r in runs
                           if not isinstance(name, str) or not name or r.get("name") == name))

    def train(self, model, dataset, name, adapter_type, rank, alpha, targets, steps, batch_size, crop_seconds,
              learning_rate, checkpoint_every, demo_every, seed, gradient_checkpointing, wait_until_done,
              prompt_config=None, continue_from=None, trigger_word="", demo_prompts="", detach_norm=False,
              demo_format="flac", demos=None, reset_step=False, options=None):
        from ..training.preflight import check_run_inputs
        from ..training.runs import DemoSpec, RunConfig, RunError
        from .model_nodes import register_model, using

        if model.is_arc:
            raise ValueError("SA3 Train LoRA: model is an ARC (post-trained) model; connect an SA3 Load Pack with "
                             "variant 'base' (adapters are trained on base and then used on ARC)")
        spec = model.pack or model.source
        dtype = DTYPE_NAMES.get(model.dtype, "fp32")
        register_model((spec, "base", dtype, str(model.device)), model)
        prompt_lines = [p.strip() for p in demo_prompts.splitlines() if p.strip()]
        demos = tuple(demos or ()) + tuple(DemoSpec(p, False, 7.0, seed=i) for i, p in enumerate(prompt_lines))
        try:
            config = RunConfig(dataset=str(dataset), model=spec, name=name, adapter_type=adapter_type, rank=rank,
                               alpha=alpha or None, targets=targets, steps=steps, batch_size=batch_size,
                               crop_seconds=crop_seconds, lr=learning_rate, precision=dtype,
                               gradient_checkpointing=gradient_checkpointing, detach_norm=detach_norm,
                               demo_format=demo_format,
                               checkpoint_every=checkpoint_every, demo_every=demo_every, demos=demos, seed=seed,
                               continue_from=continue_from_file(continue_from), reset_step=reset_step,
                               trigger_word=trigger_word, device=str(model.device), prompt_config=prompt_config or {},
                               **(options or {}))
            manager = get_manager()
            same = manager.same_settings_run(config)  # the same graph queued again: that run goes on
            own_checkpoint = same is not None and manager.registry.latest_checkpoint(same["id"]) is not None
            # a bad dataset or LoRA file fails here, not later (a run going on from its checkpoint reads no LoRA file)
            input_warnings = check_run_inputs(config, model, own_checkpoint)
        except RunError as e:
            raise node_error("SA3 Train LoRA", e) from None
        with using(model):  # ComfyUI frees its own models if the run needs the room (this one stays)
            make_room(model, config)
        warning = memory_warning(model, config)
        from ..training.manager import device_key

        said_before = 0  # where this attempt's events start in its run's events file (its warnings go on the node)
        if same is not None:  # the same graph queued again after a restart: that run, not a second one from step 0
            with contextlib.suppress(OSError):
                said_before = manager.events_path(same["id"]).stat().st_size
            try:
                run_id, text = self.reuse(manager, same)
            except RunError as e:
                raise node_error("SA3 Train LoRA", e) from None
        else:
            ahead = manager.active_runs_on(config)
            run_id = manager.submit(config)
            text = (f"run {run_id} queued behind {len(ahead)} run(s) on {device_key(config)}" if ahead
                    else f"run {run_id} started")
        warnings = [w for w in [*input_warnings, warning] if w]
        text += "".join(f"\nwarning: {w}" for w in warnings)
        if wait_until_done:  # ComfyUI's cancel ends the wait (the run trains on; stop it with SA3 Run Control)
            while not manager.worker.join(run_id, 0.5):
                throw_if_interrupted()
            try:
                record = manager.registry.get(run_id)
            except RunError:  # deleted from the panel or a route meanwhile
                raise ValueError(f"SA3 Train LoRA: run {run_id} was deleted while this node waited for it to "
                                 "finish (queue the graph again for a new run)") from None
            from ..training.events import read_events

            said = [e["message"] for e in read_events(manager.events_path(run_id), said_before)[0]
                    if e.get("type") == "warning"]
            text = f"run {run_id}: {record['status']} at step {record['step']}" + "".join(
                f"\nwarning: {w}" for w in dict.fromkeys([*warnings, *said]))  # an API caller sees no events
            if record["status"] == "failed":
                raise RuntimeError(f"SA3 Train LoRA: {record.get('error')}")
        return {"ui": {"text": [text]}, "result": (run_id, run_id)}


    @staticmethod
    def reuse(manager, record: dict) -> tuple[str, str]:
        """(run id, message) for a run that has exactly this node's settings: resumed when a restart or a stop cut
        it off, else left as it is."""
        run_id, status = record["id"], record["status"]
        if status in ("interrupted", "stopped", "failed"):
            config = manager.registry.config(run_id)
            ahead = [r for r in manager.active_runs_on(config) if r["id"] != run_id]
            manager.control(run_id, "restart")
            when = f"queued behind {len(ahead)} run(s) to resume" if ahead else "resumed"
            return run_id, (f"run {run_id} has these settings and was {status} at step {record['step']}: {when} "
                            "from its last checkpoint (change name or seed for a new run)")
        if status == "done":
            return run_id, (f"run {run_id} already finished with these settings (change name or seed for a new run; "
                            "SA3 Run Control's restart with more_steps trains it further)")
        return run_id, f"run {run_id} has these settings and is {status}: not started again"


def _run_default(name: str):
    """A RunConfig field's default (one source for the node widgets and the schema)."""
    from dataclasses import MISSING, fields

    from ..training.runs import RunConfig

    field = next(f for f in fields(RunConfig) if f.name == name)
    return field.default if field.default is not MISSING else field.default_factory()


class SA3TrainingOptions:
    """Advanced run settings (the RunConfig fields SA3 Train LoRA does not show) for its `options` input."""

    @classmethod
    def INPUT_TYPES(cls):
        from ..training.runs import CROP_FROM, TIMESTEP_SAMPLERS

        d = _run_default
        betas, inpaint = d("betas"), d("inpaint_probabilities")
        return {"required": {
            "include": ("STRING", {"default": "", "multiline": True, "tooltip": "Layer name patterns (one per line "
                        "or comma-separated, [0-3] ranges allowed) added to the targets preset's include list: with "
                        "'all', only layers whose name contains one of them are adapted. Empty = the preset's."}),
            "exclude": ("STRING", {"default": "", "multiline": True, "tooltip": "Leave out layers whose name "
                        "contains one of these, e.g. seconds_total (the official docs' suggestion) or "
                        "transformer.layers.[0-3]."}),
            "warmup_steps": ("INT", {"default": d("warmup_steps"), "min": 0, "max": 100000, "tooltip":
                             "Steps over which the learning rate rises linearly to its value (0 = none, official)."}),
            "weight_decay": ("FLOAT", {"default": d("weight_decay"), "min": 0.0, "max": 1.0, "step": 0.001,
                             "tooltip": "AdamW weight decay of the low-rank tensors (DoRA/BoRA magnitudes never "
                             "decay)."}),
            "beta1": ("FLOAT", {"default": betas[0], "min": 0.0, "max": 0.9999, "step": 0.001, "tooltip": "AdamW's "
                      "first-moment decay (official 0.9)."}),
            "beta2": ("FLOAT", {"default": betas[1], "min": 0.0, "max": 0.9999, "step": 0.001, "tooltip": "AdamW's "
                      "second-moment decay (official 0.95)."}),
            "grad_clip": ("FLOAT", {"default": d("grad_clip"), "min": 0.0, "max": 1000.0, "step": 0.1, "tooltip":
                          "Clip the gradient norm to this (0 = no clipping)."}),
            "dropout": ("FLOAT", {"default": d("dropout"), "min": 0.0, "max": 0.99, "step": 0.01, "tooltip":
                        "LoRA dropout on the adapter's input during training (stored in the file's lora_config)."}),
            "crop_from": (list(CROP_FROM), {"default": d("crop_from"), "tooltip": "Where the training crop of a "
                          "file longer than crop_seconds begins: random (official) or its start (to learn intros)."}),
            "timestep_sampler": (list(TIMESTEP_SAMPLERS), {"default": d("timestep_sampler"), "tooltip": "How noise "
                                 "levels are drawn: the official truncated logit-normal (flipped, length-shifted), "
                                 "logit-normal, or uniform."}),
            "ot_coupling": ("BOOLEAN", {"default": d("ot_coupling"), "tooltip": "Pair noise with data by minibatch "
                            "optimal transport (official; no effect at batch 1)."}),
            "cfg_dropout": ("FLOAT", {"default": d("cfg_dropout"), "min": 0.0, "max": 0.99, "step": 0.01, "tooltip":
                            "Share of steps trained without the prompt (keeps CFG working)."}),
            "inpaint_segments": ("FLOAT", {"default": inpaint[0], "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                 "Weight of steps that inpaint random segments (the three weights are normalised)."}),
            "inpaint_full": ("FLOAT", {"default": inpaint[1], "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                             "Weight of steps that generate the whole crop."}),
            "inpaint_causal": ("FLOAT", {"default": inpaint[2], "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                               "Weight of steps that continue a kept prefix."}),
            "mask_loss_weight": ("FLOAT", {"default": d("mask_loss_weight"), "min": 0.0, "max": 10.0, "step": 0.05,
                                 "tooltip": "Weight of the loss on the kept (context) part of an inpainting step."}),
            "arc_model": ("STRING", {"default": "", "tooltip": "ARC demos: a pack name or model folder for the ARC "
                          "weights (empty = the ARC variant of the trained pack)."}),
            "validation_items": ("INT", {"default": d("validation_items"), "min": 0, "max": 100000, "tooltip":
                                 "Dataset files held out of training and scored at fixed noise levels, fixed noise "
                                 "and prompts: a validation loss that rises while the training loss falls means "
                                 "overfitting, and SA3 Run Status's best_lora is the checkpoint where it was lowest. "
                                 "0 = train on every file, no validation."}),
            "validation_every": ("INT", {"default": d("validation_every"), "min": 0, "max": 100000, "tooltip":
                                 "Steps between validation scores (0 = with each checkpoint, so every checkpoint "
                                 "has one)."}),
            "demo_loudness": ("FLOAT", {"default": d("demo_loudness"), "min": -70.0, "max": 0.0, "step": 0.5,
                              "tooltip": "Loudness (LUFS, EBU R128) every demo and dataset clip is brought to "
                              "(true peak at most -1 dBTP, gain at most +20 dB), so checkpoints are compared by sound "
                              "rather than level; each demo's settings keep its level as generated. 0 = as "
                              "generated."}),
            "keep_states": ("INT", {"default": d("keep_states"), "min": 0, "max": 100000, "tooltip": "Training "
                            "states (.state.pt: adapter + optimiser moments, ~6x a LoRA file) kept, newest first; "
                            "older ones are deleted, their LoRA files stay (usable, continuable, not resumable "
                            "exactly). 0 = keep all."}),
            "tensorboard": ("BOOLEAN", {"default": d("tensorboard"), "tooltip": "Also log loss, learning rate, "
                            "loss per noise level, validation and demos (playable) for TensorBoard in the run's "
                            "tensorboard/ folder: `tensorboard --logdir <ComfyUI output>/sa3_runs` compares runs."}),
        }}

    RETURN_TYPES = ("SA3_TRAIN_OPTIONS",)
    RETURN_NAMES = ("options",)
    FUNCTION = "options"
    CATEGORY = CATEGORY
    DESCRIPTION = "Advanced training settings for SA3 Train LoRA's options input (defaults are the official ones)."

    def options(self, include, exclude, warmup_steps, weight_decay, beta1, beta2, grad_clip, dropout, crop_from,
                timestep_sampler, ot_coupling, cfg_dropout, inpaint_segments, inpaint_full, inpaint_causal,
                mask_loss_weight, arc_model, validation_items=0, validation_every=0, demo_loudness=-18.0,
                keep_states=0, tensorboard=True):
        from ..training.runs import RunConfig, RunError

        weights = (inpaint_segments, inpaint_full, inpaint_causal)
        if not sum(weights) > 0:
            raise ValueError("SA3 Training Options: inpaint_segments, inpaint_full and inpaint_causal are all 0; give "
                             "at least one a weight (the official mix is 0.1, 0.8, 0.1)")
        options = {"include": tuple(text_list(include)), "exclude": tuple(text_list(exclude)),
                   "warmup_steps": warmup_steps,
                   "weight_decay": weight_decay, "betas": (beta1, beta2), "grad_clip": grad_clip, "dropout": dropout,
                   "crop_from": crop_from, "timestep_sampler": timestep_sampler, "ot_coupling": ot_coupling, "cfg_dropout": cfg_dropout,
                   "inpaint_probabilities": tuple(w / sum(weights) for w in weights),
                   "mask_loss_weight": mask_loss_weight, "arc_model": arc_model.strip() or None,
                   "validation_items": validation_items, "validation_every": validation_every,
                   "demo_loudness": demo_loudness or None, "keep_states": keep_states, "tensorboard": tensorboard}
        try:
            RunConfig(dataset="-", **options)  # named errors here, not when the run is queued
        except RunError as e:
            raise node_error("SA3 Training Options", e) from None
        return (options,)


class SA3TrainingDemo:
    """One demo of a training run (`training.runs.DemoSpec`), appended to the chained list."""

    @classmethod
    def INPUT_TYPES(cls):
        from ..training.runs import DEMO_MODES

        return {"required": {
            "prompt": ("STRING", {"default": "", "multiline": True, "tooltip": "What to generate; empty = "
                       "unconditional (or a prompt re-rolled from the dataset, see from_dataset)."}),
            "from_dataset": ("BOOLEAN", {"default": False, "tooltip": "Ignore prompt: each demo step draws a "
                             "dataset item's prompt (seeded), composed as in training."}),
            "sampler_model": (["base", "arc"], {"default": "base", "tooltip": "base: Euler on the trained model; "
                              "arc: ping-pong on the pack's ARC model with the adapter (how it is used later)."}),
            "cfg": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 30.0, "step": 0.1, "tooltip": "-1 = the "
                    "model's default (base 7, ARC 1)."}),
            "steps": ("INT", {"default": 0, "min": 0, "max": 500, "tooltip": "0 = the model's default (base 50, ARC 8)."}),
            "demo_seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Fixed across the run so "
                          "demos compare step to step."}),
            "seconds": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 380.0, "step": 0.5, "tooltip": "0 = the "
                        "training crop length."}),
            "lora_strength": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05, "tooltip": "The "
                              "adapter's strength in this demo (1 = as trained)."}),
        }, "optional": {
            "mode": (list(DEMO_MODES), {"default": "generate", "tooltip": "generate: text-to-audio; inpaint: "
                     "regenerate the middle third of a dataset clip (fixed for the run); continue: its second half. "
                     "With from_dataset, the clip's own prompt."}),
            "lora_skip_first_steps": ("INT", {"default": 0, "min": 0, "max": 100, "tooltip": "Leave the adapter off "
                                      "for the first N sampling steps, as SA3 Load LoRA's skip_first_steps (on ARC, 1 "
                                      "keeps the base model's structure: hear the LoRA as you will use it)."}),
            "demos": ("SA3_DEMOS", {"tooltip": "Earlier demos of the list (chain the nodes)."})}}

    RETURN_TYPES = ("SA3_DEMOS",)
    RETURN_NAMES = ("demos",)
    FUNCTION = "add"
    CATEGORY = CATEGORY
    DESCRIPTION = "Adds a demo to a training run's list (feed the chain into SA3 Train LoRA's demos input)."

    def add(self, prompt, from_dataset, sampler_model, cfg, steps, demo_seed, seconds, lora_strength, demos=None,
            lora_skip_first_steps=0, mode="generate"):
        from ..training.runs import DemoSpec, RunError

        try:
            demo = DemoSpec(None if from_dataset else prompt.strip(), sampler_model == "arc",
                            None if cfg < 0 else cfg, steps or None, demo_seed, seconds or None, lora_strength,
                            lora_skip_first_steps, mode)
        except RunError as e:
            raise node_error("SA3 Training Demo", e) from None
        return (tuple(demos or ()) + (demo,),)


class SA3RunStatus:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"bins": ("INT", {"default": 5, "min": 1, "max": 20, "tooltip": "Noise-level bins of the loss-by-timestep chart."})},
                "optional": {"run": ("SA3_RUN", {"tooltip": "From SA3 Train LoRA."}),
                             "run_id": ("STRING", {"default": "", "tooltip": RUN_ID_TOOLTIP})}}

    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING", "STRING", "STRING")
    RETURN_NAMES = ("loss_chart", "loss_by_noise_level", "latest_lora", "status", "best_lora")
    FUNCTION = "status"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    DESCRIPTION = ("Loss curves as images, the newest checkpoint and the one with the lowest validation loss (feed "
                   "either to SA3 Load LoRA's lora_path).")

    @classmethod
    def IS_CHANGED(cls, bins, run=None, run_id=""):
        return time.time()  # the run moves on between executions

    def status(self, bins, run=None, run_id=""):
        from ..training.events import best_validation, loss_by_timestep_chart, loss_chart, read_all_events

        manager = get_manager()
        run = chosen_run("SA3 Run Status", manager, run, run_id)
        record = manager.registry.get(run)
        events = read_all_events(manager.events_path(run))
        latest = manager.registry.latest_checkpoint(run)
        lora = str(manager.registry.run_dir(run) / latest["path"]) if latest else ""
        images = [torch.from_numpy(chart.copy()).float()[None] / 255 for chart in
                  (loss_chart(events), loss_by_timestep_chart(events, bins))]
        text = f"{record['name']}: {record['status']} step {record['step']}/{record['total_steps']}"
        best = best_validation(events)
        best_lora = lora  # a run without validation: the newest is the best it can tell
        if best is not None:
            best_lora = str(manager.registry.run_dir(run) / best["path"])
            text += f"\nlowest validation loss {best['loss']:.4g} at step {best['step']}"
        if record.get("error"):
            text += f"\nerror: {record['error']}"
        return {"ui": {"text": [text]}, "result": (images[0], images[1], lora, text, best_lora)}


class SA3RunControl:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"action": (["stop", "pause", "resume", "save", "restart"], {"tooltip": "restart resumes "
                                        "an interrupted, stopped, failed or finished run from its last checkpoint."})},
                "optional": {
                    "run": ("SA3_RUN", {"tooltip": "From SA3 Train LoRA."}),
                    "run_id": ("STRING", {"default": "", "tooltip": RUN_ID_TOOLTIP}),
                    "more_steps": ("INT", {"default": 0, "min": 0, "max": 1000000, "tooltip": "With restart: train "
                                   "this many steps beyond the run's total (a finished run goes on; 0 = its own "
                                   "total)."}),
                    "learning_rate": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1e-1, "step": 1e-6, "tooltip":
                                      "With restart: a new learning rate from here on (0 = keep the run's)."})}}

    RETURN_TYPES = ("SA3_RUN", "STRING")
    RETURN_NAMES = ("run", "status")
    FUNCTION = "control"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    @classmethod
    def IS_CHANGED(cls, action, **settings):
        return time.time()

    def control(self, action, run=None, run_id="", more_steps=0, learning_rate=0.0):
        from ..training.runs import RunError

        manager = get_manager()
        run = chosen_run("SA3 Run Control", manager, run, run_id)
        changes = {"lr": learning_rate} if learning_rate else {}
        try:  # the manager refuses settings with any action but restart
            record = manager.control(run, action, changes=changes, more_steps=more_steps)
        except RunError as e:
            raise node_error("SA3 Run Control", e) from None
        asked = {"stop": "stop asked: it saves and stops after its current step",
                 "pause": "pause asked: it pauses after its current step",
                 "save": "save asked: a checkpoint follows its current step",
                 "resume": "resume asked", "restart": "restarted"}[action]
        text = f"{record.get('name') or run}: {asked} (now {record['status']} at step {record['step']})"
        return {"ui": {"text": [text]}, "result": (run, f"{record['id']}: {record['status']}")}


RUN_ID_TOOLTIP = ("A run's id (the SA3 Training panel shows it; Copy id there), for a run this graph did not start: "
                  "one from before a restart, or from another workflow. Used when run is not connected.")


def chosen_run(node: str, manager, run: str | None, run_id: str) -> str:
    """The run a status/control node acts on: the connected run, else the run_id widget's; named errors otherwise."""
    from ..training.runs import RunError

    chosen = run or (run_id or "").strip()
    if not chosen:
        raise ValueError(f"{node}: connect run (from SA3 Train LoRA) or give a run_id (the SA3 Training panel "
                         "shows each run's id)")
    try:
        manager.registry.get(chosen)
    except RunError as e:
        raise node_error(node, e) from None
    return chosen


NODE_CLASS_MAPPINGS = {"SA3TrainLoRA": SA3TrainLoRA, "SA3TrainingOptions": SA3TrainingOptions,
                       "SA3TrainingDemo": SA3TrainingDemo, "SA3RunStatus": SA3RunStatus, "SA3RunControl": SA3RunControl}
NODE_DISPLAY_NAME_MAPPINGS = {"SA3TrainLoRA": "SA3 Train LoRA", "SA3TrainingOptions": "SA3 Training Options",
                              "SA3TrainingDemo": "SA3 Training Demo", "SA3RunStatus": "SA3 Run Status",
                              "SA3RunControl": "SA3 Run Control"}
