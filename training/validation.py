"""Validation loss: dataset items held out of training, scored at fixed noise levels with fixed noise.

The training loss moves with each step's random t, noise, crop and mask, so its curve cannot say when a run starts
to learn its dataset by heart. A run with `validation_items` > 0 keeps that many items out of its batches (a seeded
choice kept in the run folder by file, `ValidationPlan`: the same after every resume) and scores them every
`validation_every` steps (0: at each checkpoint), and at the start as the baseline: the training objective's
full-generation task at the centres of the loss-by-noise-level bins, each item with its own fixed crop, prompt and
noise, no CFG dropout. Every evaluation sees the same inputs, so the curve moves only with the adapter: a rising
validation loss under a falling training loss is overfitting, and the checkpoint at its lowest point is the one to
keep (`events.best_validation`).

Nothing here draws from the training's random streams or changes the adapter, so a run with validation trains
exactly as one without it on the same items.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..encoding.dataset import item_seconds
from .events import bin_edges


def split_items(n_items: int, count: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices), both sorted: `count` of range(n_items) drawn by rng are held out.
    count 0 holds out nothing (training sees every item, in the order it always did)."""
    if count == 0:
        return list(range(n_items)), []
    if not 0 < count < n_items:
        raise ValueError(f"validation_items: {count} of a dataset of {n_items} items leaves nothing to train on; "
                         f"hold out fewer (at most {n_items - 1}) or 0 for no validation")
    held = sorted(rng.sample(range(n_items), count))
    kept = set(held)
    return [i for i in range(n_items) if i not in kept], held


PLAN_FILE = "validation.json"  # in the run folder: which files are held out, and their crop


@dataclass
class ValidationPlan:
    """What a run holds out, fixed at its first start and kept in its folder: the files by dataset path (files added
    to the dataset later train; a held-out file stays held out) and the crop they are scored at (a resume may change
    crop_seconds or crop_from for training; the scores stay comparable)."""

    files: list[str]
    crop_latents: int
    random_crop: bool

    @classmethod
    def load_or_create(cls, folder, relpaths: list[str], count: int, rng: random.Random, crop_latents: int,
                       random_crop: bool, write: bool = True) -> ValidationPlan | None:
        """The run's plan from folder/PLAN_FILE, else a new one (`split_items` over relpaths, the dataset's files in
        index order) written there when `write`; None when count is 0 and no plan exists."""
        import json
        from pathlib import Path

        from .runs import atomic_write_json

        path = Path(folder) / PLAN_FILE
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(list(data["files"]), int(data["crop_latents"]), bool(data["random_crop"]))
        if count == 0:
            return None
        _, held = split_items(len(relpaths), count, rng)
        plan = cls([relpaths[i] for i in held], crop_latents, random_crop)
        if write:
            atomic_write_json(path, {"files": plan.files, "crop_latents": crop_latents, "random_crop": random_crop})
        return plan

    def indices(self, relpaths: list[str]) -> tuple[list[int], list[int], list[str]]:
        """(training indices, held-out indices, held-out files no longer in the dataset) for the dataset's files."""
        where = {r: i for i, r in enumerate(relpaths)}
        held = sorted(where[f] for f in self.files if f in where)
        kept = set(held)
        return [i for i in range(len(relpaths)) if i not in kept], held, [f for f in self.files if f not in where]


def noise_levels(bins: int = 5) -> list[float]:
    """The t at which validation scores: the centres of `bins` equal-width bins over [0, 1], the bins of the
    loss-by-noise-level chart (`events.loss_by_timestep`), so a level's loss reads against its bin's curve."""
    return [(lo + hi) / 2 for lo, hi in bin_edges(bins)]


@dataclass
class ValidationSet:
    """The held-out items as every evaluation scores them.
    x0, noise: [K, C, T] latents and their fixed noise; padding: [K, T] bool (True = real frames); seconds: K
    durations (s); prompts: K composed prompts; indices: the K dataset indices."""

    x0: torch.Tensor
    noise: torch.Tensor
    padding: torch.Tensor
    seconds: list[float]
    prompts: list[str]
    indices: list[int]


def build_validation_set(dataset, indices: list[int], crop_latents: int, random_crop: bool, prompts: list[str],
                         latent_rate: float, seed_for) -> ValidationSet:
    """dataset: the run's `EncodedDataset`; prompts: one per index (composed once, with a fixed prompt seed);
    seed_for(index, label): a seed per item and purpose (the run's `derive_seed`), so each item keeps its crop and
    noise whichever items are held out with it."""
    latents, masks, seconds, noises = [], [], [], []
    for i in indices:
        z, mask, meta = dataset.item(i, crop_latents, random_crop=random_crop,
                                     rng=random.Random(seed_for(i, "validation-crop")))
        latents.append(torch.from_numpy(z))
        masks.append(torch.from_numpy(mask).bool())
        seconds.append(item_seconds(meta, mask, latent_rate))
        g = torch.Generator().manual_seed(seed_for(i, "validation-noise"))
        noises.append(torch.randn(z.shape, generator=g))
    return ValidationSet(torch.stack(latents), torch.stack(noises), torch.stack(masks), seconds, list(prompts),
                         list(indices))


def score(validation: ValidationSet, loss_fn, batch_size: int, levels: list[float],
          stop_requested=lambda: False) -> dict | None:
    """{"loss": mean over levels, "levels": [[t, mean loss over items], ...]} of the held-out items, or None when
    `stop_requested()` turned true (checked before each forward). loss_fn(rows, t) -> per-item losses [b] for the
    items at `rows` (a slice of the set) all at noise level t: the caller's objective, without gradients."""
    per_level = []
    k = len(validation.indices)
    for t in levels:
        total = 0.0
        for start in range(0, k, max(1, batch_size)):
            if stop_requested():
                return None
            rows = slice(start, min(k, start + max(1, batch_size)))
            with torch.no_grad():
                total += float(loss_fn(rows, t).double().sum())
        per_level.append([round(t, 6), total / k])
    return {"loss": sum(v for _, v in per_level) / len(per_level), "levels": per_level}


__all__ = ["PLAN_FILE", "ValidationPlan", "ValidationSet", "build_validation_set", "noise_levels", "score", "split_items"]
