"""Checks a run's inputs before it is registered, and opens them for the trainer: one set of messages for the node,
`sa3-lora train` and the trainer itself, each naming the RunConfig field at fault."""

from __future__ import annotations

from pathlib import Path

from ..adapters import read_adapter_file
from ..encoding.dataset import DatasetError, load_dataset
from .runs import RunConfig, RunError


def open_dataset(config: RunConfig, latent_dim: int | None = None):
    """The run's EncodedDataset; RunError when it cannot be opened, has no encoded file, or holds latents of another
    width than the model's `latent_dim` (when given)."""
    try:
        dataset = load_dataset(config.dataset)
    except (DatasetError, OSError, ValueError) as e:
        raise RunError(f"RunConfig.dataset: {e}") from None
    if len(dataset) == 0:
        raise RunError(f"RunConfig.dataset: {config.dataset} has no encoded files; encode a folder of audio into it "
                       "first (SA3 Encode Audio Folder or `sa3-lora encode`)")
    if latent_dim is not None and dataset.latent_dim != latent_dim:
        raise RunError(f"RunConfig.dataset: {config.dataset} has {dataset.latent_dim}-dim latents but the model "
                       f"expects {latent_dim}; encode it with this model's autoencoder")
    return dataset


def open_continue_from(config: RunConfig):
    """The adapter file to continue (`LoadedAdapter`), or None; RunError naming `continue_from` when unreadable."""
    if not config.continue_from:
        return None
    try:
        return read_adapter_file(config.continue_from)
    except Exception as e:  # a missing file, a truncated header, a file that is not an adapter
        raise RunError(f"RunConfig.continue_from: {Path(config.continue_from).name}: {e}") from None


def check_run_inputs(config: RunConfig, latent_dim: int | None = None) -> None:
    """Everything a run reads besides the model, checked before it is registered (nothing is queued on bad input)."""
    open_dataset(config, latent_dim)
    open_continue_from(config)


__all__ = ["check_run_inputs", "open_continue_from", "open_dataset"]
