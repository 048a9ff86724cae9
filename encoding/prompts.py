"""Prompt composition: one pure function from a file's metadata to the text prompt training sees.

`compose_prompt(metadata, relpath, config, rng_or_seed)` is the only implementation; the trainer, demo prompts,
the preview node and the panel call it. With an int seed the draw depends only on (seed, relpath, config), so
`preview_prompts(dataset, config, seed=s)` shows exactly what a training step given prompt seed s composes for
those files (the trainer derives the seed of step k with `prompt_seed(run_seed, k)`).

One prompt = one source, picked by the balance weights among the sources that have text for this file:
- caption: the `prompt` field (a .txt sidecar or a JSON `prompt`), verbatim;
- tags: `Key: value` parts from chosen metadata keys (key names optional, comma lists optionally split, an
  optional random subset), joined by ", " (or " " with hide_commas);
- path: the relative path, optionally without extension / directories / top folder;
- fixed: a fixed text.
Then, optionally, the comma-separated parts are shuffled, and for trigger_percent % of draws the trigger word is
prepended (never replacing the caption). When no weighted source has text for a file, the first non-empty of
caption, tags, path is used, so no file trains unconditioned by accident (unless fallback=False).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields
from pathlib import PurePosixPath

from ..sa3.field_types import check_field_types, check_known_keys
from .captions import ESCAPED_BYTE, PATH_FIELDS, RESERVED_FIELDS, readable_name
from .metadata_tables import is_placeholder

SOURCES = ("caption", "tags", "path", "fixed")
DEFAULT_TAG_KEYS = ("title", "artist", "album", "genre", "label", "date", "composer", "bpm", "key")
# How keys are shown in `Key: value` parts, matching SA3's tag vocabulary ("BPM: 120", "Year: 1999").
KEY_LABELS = {"bpm": "BPM", "date": "Year", "key": "Key"}


@dataclass(frozen=True)
class PromptConfig:
    """How prompts are composed. Weights are balance percentages (any non-negative numbers; relative)."""

    caption_weight: float = 100.0
    tags_weight: float = 0.0
    path_weight: float = 0.0
    fixed_weight: float = 0.0
    # tags
    tag_keys: tuple[str, ...] | None = DEFAULT_TAG_KEYS  # None = every text field except reserved/path fields
    hide_tag_names: bool = False
    split_commas: bool = False  # "Genre: rock, pop" -> "Genre: rock", "Genre: pop"
    tag_subset_percent: float = 50.0  # % of tag prompts that keep a random non-empty subset of the parts
    hide_commas: bool = False
    # path
    hide_extension: bool = True
    hide_directories: bool = False
    hide_top_folder: bool = False
    # fixed
    fixed_text: str = ""
    # all sources
    shuffle: bool = True  # shuffle comma-separated parts (captions too when shuffle_captions)
    shuffle_captions: bool = False
    trigger: str = ""
    trigger_percent: float = 0.0
    fallback: bool = True

    def __post_init__(self):
        check_field_types(self, "PromptConfig")
        for name in ("caption_weight", "tags_weight", "path_weight", "fixed_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"PromptConfig.{name}={getattr(self, name)} is negative; balances are >= 0")
        for name in ("tag_subset_percent", "trigger_percent"):
            if not 0 <= getattr(self, name) <= 100:
                raise ValueError(f"PromptConfig.{name}={getattr(self, name)} must be a percentage in [0, 100]")
        if self.tag_keys is not None and isinstance(self.tag_keys, (list, str)):
            keys = (self.tag_keys,) if isinstance(self.tag_keys, str) else tuple(self.tag_keys)
            object.__setattr__(self, "tag_keys", keys)

    @property
    def weights(self) -> dict[str, float]:
        return {"caption": self.caption_weight, "tags": self.tags_weight, "path": self.path_weight,
                "fixed": self.fixed_weight}

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["tag_keys"] = list(self.tag_keys) if self.tag_keys is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PromptConfig:
        check_known_keys(cls, d, "PromptConfig: unknown fields")
        d = dict(d)
        if d.get("tag_keys") is not None:
            d["tag_keys"] = tuple(d["tag_keys"])
        return cls(**d)


@dataclass
class ComposedPrompt:
    text: str
    source: str | None  # which source was used (None: nothing available)
    triggered: bool = False
    parts: list[str] = field(default_factory=list)


def prompt_seed(run_seed: int, step: int) -> int:
    """The prompt seed of training step `step` of a run (what `preview_prompts(seed=...)` takes)."""
    return int(run_seed) * 1_000_003 + int(step)


def make_rng(seed: int, relpath: str) -> random.Random:
    # A string seed goes through SHA-512 in CPython: stable across processes, platforms and PYTHONHASHSEED.
    return random.Random(f"sa3-prompt:{int(seed)}:{relpath}")


def _split(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _value_text(value) -> str:
    """A metadata value as prompt text; '' for a placeholder such as "NaN" or "N/A" (a spreadsheet's empty cell)."""
    if isinstance(value, (list, tuple)):
        return ", ".join(t for t in map(_value_text, value) if t)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return "" if is_placeholder(text) else text


def tag_parts(metadata: dict, config: PromptConfig) -> list[str]:
    """The `Key: value` parts the tags source can draw from, in key order."""
    if config.tag_keys is None:
        keys = [k for k in metadata if k not in RESERVED_FIELDS and k not in PATH_FIELDS and k != "prompt"]
    else:
        keys = list(config.tag_keys)
    parts = []
    for key in keys:
        if key not in metadata or isinstance(metadata[key], dict):
            continue
        text = _value_text(metadata[key])
        if not text:
            continue
        values = _split(text) if config.split_commas else [text]
        label = KEY_LABELS.get(key, key.replace("_", " ").title())
        parts += [v if config.hide_tag_names else f"{label}: {v}" for v in values]
    return parts


def path_text(relpath: str, config: PromptConfig) -> str:
    """The path source: relpath ('/'-separated; a Windows one with '\\' too) with the configured parts hidden, and
    name bytes that were not UTF-8 read as people would (`readable_name`), not as `\\xNN`."""
    windows = "/" not in relpath and "\\" in relpath and not ESCAPED_BYTE.search(relpath)
    p = PurePosixPath(*(readable_name(part) for part in relpath.split("\\" if windows else "/") if part))
    name = p.stem if config.hide_extension else p.name
    dirs = list(p.parts[:-1])
    if config.hide_top_folder and dirs:
        dirs = dirs[1:]
    if config.hide_directories:
        dirs = []
    return "/".join([*dirs, name])


def compose(metadata: dict, relpath: str, config: PromptConfig, rng_or_seed: int | random.Random) -> ComposedPrompt:
    """compose_prompt with the details (which source, whether the trigger was added). Same draws."""
    rng = make_rng(rng_or_seed, relpath) if isinstance(rng_or_seed, int) else rng_or_seed
    caption = _value_text(metadata.get("prompt", "")) if metadata.get("prompt") is not None else ""
    tags = tag_parts(metadata, config)
    candidates = {"caption": caption, "tags": tags, "path": path_text(relpath, config), "fixed": config.fixed_text.strip()}
    available = [s for s in SOURCES if candidates[s] and config.weights[s] > 0]
    # The draws below happen in a fixed order whatever the outcome, so one seed gives one sequence.
    u_source, u_trigger = rng.random(), rng.random()
    source = None
    if available:
        total = sum(config.weights[s] for s in available)
        acc = 0.0
        for s in available:
            acc += config.weights[s] / total
            if u_source < acc:
                source = s
                break
        source = source or available[-1]
    elif config.fallback:
        source = next((s for s in ("caption", "tags", "path") if candidates[s]), None)

    parts: list[str] = []
    comma_style = True
    if source == "tags":
        parts = list(tags)
        if len(parts) > 1 and rng.random() * 100 < config.tag_subset_percent:
            parts = rng.sample(parts, rng.randint(1, len(parts)))  # keeps a random subset, in random order
        elif config.shuffle:
            rng.shuffle(parts)
        comma_style = not config.hide_commas
    elif source is not None:
        text = candidates[source]
        parts = _split(text) if (source == "caption" and config.shuffle and config.shuffle_captions) else [text]
        if len(parts) > 1:
            rng.shuffle(parts)
    joiner = ", " if comma_style else " "
    text = joiner.join(parts)
    triggered = bool(config.trigger.strip()) and u_trigger * 100 < config.trigger_percent
    if triggered:
        text = f"{config.trigger.strip()}{joiner if parts and comma_style else ' '}{text}".strip()
    return ComposedPrompt(text, source, triggered, parts)


def compose_prompt(metadata: dict, relpath: str, config: PromptConfig, rng_or_seed: int | random.Random) -> str:
    """The training prompt for one file. metadata: the file's metadata dict (its dataset .json); relpath: its
    '/'-separated path relative to the dataset root; rng_or_seed: a prompt seed (see `prompt_seed`) or a
    random.Random to draw from. Pure: the same inputs give the same prompt."""
    return compose(metadata, relpath, config, rng_or_seed).text


def preview_prompts(dataset, config: PromptConfig, seed: int, n: int = 8) -> list[dict]:
    """n sample prompts: row i is file i (cycling through the dataset; the seed moves on by one per full pass)
    composed with prompt seed `seed + pass`. dataset: an EncodedDataset (or a list of (relpath, metadata)).
    Returns [{'relpath', 'prompt', 'source', 'triggered', 'seed'}]."""
    items = dataset.prompt_items() if hasattr(dataset, "prompt_items") else list(dataset)
    rows = []
    if not items:
        return rows
    for i in range(n):
        relpath, metadata = items[i % len(items)]
        s = seed + i // len(items)
        c = compose(metadata, relpath, config, s)
        rows.append({"relpath": relpath, "prompt": c.text, "source": c.source, "triggered": c.triggered, "seed": s})
    return rows


def batch_prompts(items, indices, config: PromptConfig, run_seed: int, step: int) -> list[str]:
    """The prompts of one training batch: items[i] = (relpath, metadata) for i in indices, composed with the
    prompt seed of `step`. The trainer's dataloader calls this; `preview_prompts(items, config,
    prompt_seed(run_seed, step))` shows the same text for the same files."""
    seed = prompt_seed(run_seed, step)
    return [compose_prompt(items[i][1], items[i][0], config, seed) for i in indices]
