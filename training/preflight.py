"""Checks a run's inputs before it is registered, and opens them for the trainer: one set of messages for the node,
`sa3-lora train` and the trainer itself, each naming the RunConfig field at fault."""

from __future__ import annotations

import re
from pathlib import Path

from ..adapters import read_adapter_file
from ..encoding.dataset import DatasetError, encoder_identity, load_dataset
from .runs import RunConfig, RunError


def open_dataset(config: RunConfig, model=None):
    """The run's EncodedDataset; RunError when it cannot be opened, has no encoded file, or (when the model is given)
    holds latents another autoencoder made: another width, latent rate or sample rate than the model's, or (when
    its autoencoder is loaded) other weights. model: a loaded model, or its config (`sa3.config.ModelConfig`)."""
    try:
        dataset = load_dataset(config.dataset)
    except (DatasetError, OSError, ValueError) as e:
        moved = "" if Path(config.dataset).exists() else (
            ". If it moved, a stopped run resumes on it in its new folder: sa3-lora runs resume RUN --set "
            "dataset=NEW_FOLDER")
        raise RunError(f"RunConfig.dataset: {e}{moved}") from None
    if len(dataset) == 0:
        raise RunError(f"RunConfig.dataset: {config.dataset} has no encoded files; encode a folder of audio into it "
                       "first (SA3 Encode Audio Folder or `sa3-lora encode`)")
    if missing := dataset.files_problem():
        raise RunError(f"RunConfig.dataset: {missing}")
    if config.validation_items >= len(dataset):
        raise RunError(f"RunConfig.validation_items: {config.validation_items} held out of {config.dataset}'s "
                       f"{len(dataset)} encoded files leaves nothing to train on; hold out at most {len(dataset) - 1}, "
                       "or 0 for no validation")
    if model is not None:
        mine = {"latent width": model.latent_dim, "samples per latent": model.downsampling_ratio,
                "sample rate": model.sample_rate}
        theirs = {"latent width": dataset.latent_dim, "samples per latent": dataset.downsampling_ratio,
                  "sample rate": dataset.sample_rate}
        differ = [f"{name} {theirs[name]} (the model's: {mine[name]})" for name in mine
                  if theirs[name] is not None and int(theirs[name]) != int(mine[name])]
        recorded = (dataset.manifest.get("encoder") or {}).get("weights")  # datasets before it recorded none
        if not differ and recorded and getattr(model, "autoencoder", None) is not None:
            if recorded != encoder_identity(model)["weights"]:
                name = (dataset.manifest.get("encoder") or {}).get("name", "another model")
                differ = [f"its autoencoder's weights are not this model's (it was encoded with {name})"]
        if differ:
            raise RunError(f"RunConfig.dataset: {config.dataset} was encoded by another autoencoder: "
                           f"{'; '.join(differ)}. Encode the audio again with this model (SA3 Encode Audio Folder "
                           "or `sa3-lora encode --model ...`)")
    return dataset


def dataset_warning(dataset) -> str | None:
    """What a run should say about a dataset it can train on but maybe should not yet: an encode that stopped
    before the end (interrupted, or still running elsewhere) leaves files unencoded. None when it is complete."""
    if dataset.complete:
        return None
    pending = sum(f.get("status") == "pending" for f in dataset.manifest.get("files", []) if isinstance(f, dict))
    left = f"{pending} of its files are not encoded yet" if pending else "its last encode did not finish"
    return (f"dataset {dataset.root} is incomplete: {left}; training uses the {len(dataset)} encoded ones. Run the "
            "encode again (SA3 Encode Audio Folder or `sa3-lora encode`) to add the rest")


def open_continue_from(config: RunConfig):
    """The adapter file to continue (`LoadedAdapter`), or None; RunError naming `continue_from` when unreadable."""
    if not config.continue_from:
        return None
    try:
        return read_adapter_file(config.continue_from)
    except FileNotFoundError:  # the whole path: where it was looked for (a relative one resolved already)
        raise RunError(f"RunConfig.continue_from: {Path(config.continue_from).absolute()}: no such adapter "
                       "file") from None
    except Exception as e:  # a truncated header, a file that is not an adapter
        name = Path(config.continue_from).name
        text = str(e).replace(str(config.continue_from), name)
        raise RunError(f"RunConfig.continue_from: {text if name in text else f'{name}: {text}'}") from None


def _continued_count(adapter, key: str) -> tuple[int, str, list[str]]:
    """(the `key` ("step" or "epoch") a continued file records, where it came from: "metadata" (our header key),
    "lora_config" (underfit's), "file name" (`key=N` in the name, as Lightning and underfit name checkpoints) or
    "none" (0); what was recorded but is no whole number from 0 up, as messages: passed over for the next place)."""
    problems = []
    for where, raw in (("metadata", adapter.metadata.get(key)), ("lora_config", adapter.config.get(key))):
        if raw is None or str(raw).strip() == "":
            continue
        try:
            value = float(raw)
        except (TypeError, ValueError):
            value = float("nan")
        if value.is_integer() and 0 <= value <= 10**12:  # "12.0" is 12
            return int(value), where, problems
        problems.append(f"its {where} gives {key} {raw!r}, which is no whole number from 0 up")
    named = re.findall(rf"(?:^|[^A-Za-z0-9]){key}=(\d+)(?![0-9])", adapter.name or "")  # epoch=0-step=2000
    return (int(named[-1]), "file name", problems) if named else (0, "none", problems)


def continued_step(adapter) -> tuple[int, str | None, str]:
    """(the step a continued file was saved at, a warning or None, where that step came from: "metadata",
    "lora_config", "file name" or "none").

    Where files keep it, in this order (underfit's own): a `step` metadata key (ours), a `step` inside lora_config
    (underfit's), else the `step=N` in the file's name, as Lightning names the official trainer's `.ckpt` (its
    callback keeps only the weights and lora_config) and underfit its files. A recorded step that is no whole number
    from 0 up (a hand-edited or foreign file) is passed over with a warning; nothing found counts from 0."""
    step, where, problems = _continued_count(adapter, "step")
    warning = (f"continue_from: {'; '.join(problems)}; counting from step {step}"
               + (" (the step in its file name)" if where == "file name" else "")) if problems else None
    return step, warning, where


def continued_epoch(adapter) -> tuple[int, str | None]:
    """(the epoch a continued file records, found as its step is, else 0; a warning or None): the epochs our
    checkpoints record count on from it."""
    epoch, _, problems = _continued_count(adapter, "epoch")
    return epoch, (f"continue_from: {'; '.join(problems)}; its epochs count from {epoch}" if problems else None)


def check_trainable(model) -> None:
    """RunError when the model's weights are inference tensors (loaded under torch.inference_mode(), as ComfyUI runs
    nodes): autograd cannot save them for the backward, so the run would fail at its first step."""
    modules = getattr(model, "modules", None)
    if modules is not None and any(p.is_inference() for p in modules.parameters()):
        raise RunError("the model was loaded under torch.inference_mode(); load it outside inference mode (with "
                       "torch.inference_mode(False): load_model(...)) to train on it")


def check_targets(config: RunConfig, model) -> None:
    """RunError naming include/exclude/rank when a new adapter of the run could not be made on the model: no layer
    matches the patterns (a typo), or an -xs rank above a targeted layer's size. A continued file brings its own."""
    if config.continue_from:
        return
    from ..adapters.apply import SA3_ROOTS, check_xs_rank, target_weights
    from ..adapters.targets import resolve_patterns

    include, exclude = resolve_patterns(list(config.include) or None, list(config.exclude) or None, config.targets)
    try:
        weights = target_weights(model.modules, SA3_ROOTS, include, exclude)
    except ValueError as e:
        raise RunError(f"RunConfig.include/exclude: with targets {config.targets!r}, {e}") from None
    check_every_pattern_matches(config, model.modules)
    if config.adapter_type.endswith("-xs"):
        try:
            check_xs_rank(weights, config.rank)
        except ValueError as e:
            raise RunError(f"RunConfig.rank: {e}") from None


def check_every_pattern_matches(config: RunConfig, modules) -> None:
    """RunError naming the first include/exclude pattern of the config that is part of no Linear/Conv1d layer's
    name: such a pattern does nothing (an exclude that leaves nothing out trains every layer it meant to spare),
    which is nearly always a typo or a glob (patterns are substrings, with [0-3] ranges; `*` is literal)."""
    from ..adapters.apply import SA3_ROOTS
    from ..adapters.targets import matches_any, select_targets

    names = [name for root in SA3_ROOTS for name in select_targets(modules.get_submodule(root.path) if root.path
                                                                     else modules)]
    for field, patterns in (("include", config.include), ("exclude", config.exclude)):
        for pattern in patterns:
            if not any(matches_any(name, [pattern]) for name in names):
                hint = ("; patterns are parts of layer names, not globs: leave out the '*' and '?'"
                        if any(c in pattern for c in "*?") else "")
                raise RunError(f"RunConfig.{field}: {pattern!r} is part of no layer's name, so it would do nothing"
                               f"{hint} (layer names look like {names[len(names) // 2]!r})")


def check_continue_fits(config: RunConfig, modules) -> None:
    """RunError naming `continue_from` when its file is unreadable or for another model, by the checks applying it
    makes (`apply.check_adapter_fits`: layer shapes, and enough of its layers in the model); `modules`: the model's
    module tree, its weights possibly on the meta device."""
    adapter = open_continue_from(config)
    if adapter is None:
        return
    from ..adapters.apply import SA3_ROOTS, AdapterMismatch, check_adapter_fits

    try:
        check_adapter_fits(modules, adapter, Path(config.continue_from).name, SA3_ROOTS)
    except AdapterMismatch as e:
        raise RunError(f"RunConfig.continue_from: {e}") from None


def check_model_sources(config: RunConfig, fields: tuple[str, ...] = ("model", "arc_model")):
    """RunError naming `model` or `arc_model` (when ARC demos will use it) when its files cannot be found, without
    loading any weight (the command line's check before a run is registered; a node has its model loaded, and
    checks `arc_model` alone). Returns the model's `CheckpointLocation` (its config says the module tree)."""
    from ..sa3.config import ConfigError
    from ..sa3.loading import CheckpointError
    from ..sa3.model import locate_checkpoint
    from ..sa3.packs import PackError

    arc_demos = config.demo_every > 0 and (not config.demos or any(d.arc for d in config.demos))  # [] = defaults
    located = None
    for name, spec, variant in (("model", config.model, "base"),
                                ("arc_model", config.arc_model if arc_demos else None, "arc")):
        if spec and name in fields:
            try:
                loc = locate_checkpoint(spec, variant=variant, models_dir=config.models_dir)
            except (CheckpointError, ConfigError, PackError, OSError, ValueError) as e:
                raise RunError(f"RunConfig.{name}: {e}") from None
            located = loc if name == "model" else located
    return located


def check_run_inputs(config: RunConfig, model=None, own_checkpoint: bool = False) -> list[str]:
    """Everything a run reads, checked before it is registered (nothing is queued on bad input); model: the loaded
    model when the caller has it (`open_dataset`, `check_trainable`, `check_targets`), else its files are looked
    for (`check_model_sources`). own_checkpoint: the run exists and resumes from its own checkpoint, so its
    continue_from file is never read (it may have moved or changed since). Returns warnings that do not stop the
    run (`dataset_warning`)."""
    from .trainer import device_problem

    problem = device_problem(config.device)
    if problem:
        raise RunError(f"RunConfig.device: {problem}")
    if model is not None:
        check_trainable(model)
        if not own_checkpoint:  # its adapter is in its checkpoint: no new one is made, no file is read
            check_targets(config, model)
            check_continue_fits(config, model.modules)
        check_model_sources(config, ("arc_model",))  # ARC demos' model: not loaded until the first demo
        loc = None
    else:
        loc = check_model_sources(config)
        if loc is not None and not own_checkpoint:  # the module tree on the meta device (no memory, no weights)
            from types import SimpleNamespace

            from ..sa3.model import build_modules

            modules = build_modules(loc.config)
            check_targets(config, SimpleNamespace(modules=modules))
            check_continue_fits(config, modules)
        elif not own_checkpoint:  # no model to fit it to: that it reads
            open_continue_from(config)
    shapes = model if model is not None else getattr(loc, "config", None)  # a config says widths and rates too
    warning = dataset_warning(open_dataset(config, shapes))
    return [warning] if warning else []


__all__ = ["check_continue_fits", "check_model_sources", "check_run_inputs", "check_targets", "check_trainable",
           "continued_epoch", "continued_step", "dataset_warning", "open_continue_from", "open_dataset"]
