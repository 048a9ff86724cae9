"""Type checks for the dataclass configs that come from JSON (run configs, prompt configs, demo specs).

A JSON file or an API call can put `"lr": "1e-4"` where a float belongs; the dataclass would take it and fail much
later in a comparison. `check_field_types` names the field at construction instead.
"""

from __future__ import annotations

from dataclasses import fields

# annotation (as written, `from __future__ import annotations`) -> accepted types; ints count as floats, bools
# count only as bools
SCALAR_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict": (dict,)}


def _accepted(annotation: str) -> tuple[type, ...] | None:
    """Accepted types of a scalar annotation, `X | None` included; None for anything else (not checked)."""
    kinds = [part.strip() for part in annotation.split("|")]
    kinds = [k for k in kinds if k != "None"]
    if len(kinds) != 1 or kinds[0] not in SCALAR_TYPES:
        return None
    return SCALAR_TYPES[kinds[0]]


def check_field_types(obj, owner: str) -> None:
    """ValueError `owner.field: value is a T; expected A` for the first scalar field holding a wrong type."""
    for f in fields(obj):
        value, accepted = getattr(obj, f.name), _accepted(str(f.type))
        if accepted is None:
            continue
        if value is None:
            # null where a number is required fails later in a comparison: named here. (A null text or flag reads
            # as empty/false, as configs written before this check may hold.)
            if int in accepted and "None" not in (part.strip() for part in str(f.type).split("|")):
                raise ValueError(f"{owner}.{f.name}: null; expected {f.type}")
            continue
        if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted):
            raise ValueError(f"{owner}.{f.name}: {value!r} is a {type(value).__name__}; expected {f.type}")


def check_known_keys(cls, data: dict, message: str, error: type[Exception] = ValueError) -> None:
    """`error(f"{message} {unknown}; known: {known}")` when `data` has keys that are not fields of dataclass `cls`
    (a typo in a JSON config is named, never silently ignored)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise error(f"{message} {unknown}; known: {sorted(known)}")


__all__ = ["check_field_types", "check_known_keys"]
