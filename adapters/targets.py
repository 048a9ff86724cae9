"""Which layers an adapter targets: every nn.Linear / nn.Conv1d under a root, filtered by include / exclude
substring lists with the official bracket-range syntax (`"layers.[0-11]"` -> `layers.0` ... `layers.11`), plus
named presets. Names are relative to the root given (for SA3: the DiT wrapper, `model.transformer.layers.3...`,
and the conditioner, `conditioners.seconds_total.embedder.embedding.1`)."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence

from torch import nn

TARGET_TYPES = (nn.Linear, nn.Conv1d)
_RANGE = re.compile(r"\[(\d+)-(\d+)\]")
MAX_RANGE = 4096  # indices one bracket range may span

# underfit's dashboard default: it excludes the conditioning MLPs and the in/out projections, which leaves attention
# and feed-forward of every block (plus the conditioner's seconds_total Linear, which no pattern excludes).
PRESETS: dict[str, dict[str, list[str] | None]] = {
    "all": {"include": None, "exclude": None},
    "underfit-default": {"include": None, "exclude": [
        "to_timestep_embed", "to_cond_embed", "to_global_embed", "to_local_embed", "global_cond_embedder",
        "project_in", "project_out", "preprocess_conv", "postprocess_conv"]},
    "attention-ff": {"include": ["self_attn", "cross_attn", ".ff."], "exclude": None},
}


def expand_pattern(pattern: str) -> list[str]:
    """Bracket ranges to literal strings: "layers.[0-2].ff" -> ["layers.0.ff", "layers.1.ff", "layers.2.ff"].
    Several ranges give their product; a descending range counts down, as in the reference."""
    parts = _RANGE.split(pattern)
    if len(parts) == 1:
        return [pattern]
    literals, bounds = parts[0::3], list(zip(parts[1::3], parts[2::3]))
    pools = []
    for a, b in bounds:
        a, b = int(a), int(b)
        if abs(b - a) >= MAX_RANGE:  # layer indices: a typo like [0-99999999] would fill the memory
            raise ValueError(f"pattern {pattern!r}: the range [{a}-{b}] spans more than {MAX_RANGE} indices; "
                             "layer numbers are small (SA3 has at most 24 blocks)")
        pools.append([str(n) for n in range(a, b + (1 if b >= a else -1), 1 if b >= a else -1)])
    out = []
    for combo in itertools.product(*pools):
        out.append("".join(lit + num for lit, num in itertools.zip_longest(literals, combo, fillvalue="")))
    return out


def matches_any(name: str, patterns: Iterable[str] | None) -> bool:
    """True if any (expanded, stripped) pattern is a substring of name."""
    return any(p in name for pattern in (patterns or ()) for p in expand_pattern(pattern.strip()))


def parse_layer_filter(text: str | None) -> list[str]:
    """The runtime layer filter: comma-separated, stripped, lower-cased substrings (matching layers are disabled)."""
    return [p.strip().lower() for p in (text or "").split(",") if p.strip()]


def filter_matches(name: str, pattern: str) -> bool:
    """Whether a layer_filter pattern (brackets expanded) switches off the layer `name`: a substring of it, as the
    official filter takes it ("layers.1" is blocks 1 and 10-19; "layers.1." is block 1)."""
    return any(p in name for p in expand_pattern(pattern))


def runs_into_a_number(name: str, pattern: str) -> bool:
    """Whether a pattern ending in a digit matches `name` where a longer number goes on ("layers.1" in
    "layers.12."), which the user rarely means."""
    for p in expand_pattern(pattern):
        at = name.find(p)
        while p[-1:].isdigit() and at >= 0:
            if name[at + len(p):at + len(p) + 1].isdigit():
                return True
            at = name.find(p, at + 1)
    return False


def is_target(name: str, module: nn.Module, include: Sequence[str] | None, exclude: Sequence[str] | None) -> bool:
    """The reference rule: a Linear/Conv1d, matching include (if given) and no exclude pattern."""
    if not isinstance(module, TARGET_TYPES):
        return False
    if include is not None and not matches_any(name, include):
        return False
    return not (exclude is not None and matches_any(name, exclude))


def select_targets(root: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                   preset: str | None = None) -> list[str]:
    """Names (relative to root, in module order) of the layers an adapter with these patterns adapts.
    A preset supplies include/exclude lists; explicit lists are added to the preset's."""
    include, exclude = resolve_patterns(include, exclude, preset)
    return [name for name, m in root.named_modules() if name and is_target(name, m, include, exclude)]


def resolve_patterns(include: Sequence[str] | None, exclude: Sequence[str] | None,
                     preset: str | None) -> tuple[list[str] | None, list[str] | None]:
    """The effective (include, exclude) lists: a named preset's plus the explicit ones (what a file records)."""
    if preset is None:
        return (list(include) if include is not None else None), (list(exclude) if exclude is not None else None)
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is unknown; use one of {sorted(PRESETS)}")
    return _join(PRESETS[preset]["include"], include), _join(PRESETS[preset]["exclude"], exclude)


def _join(a: Sequence[str] | None, b: Sequence[str] | None) -> list[str] | None:
    return None if a is None and b is None else [*(a or ()), *(b or ())]
