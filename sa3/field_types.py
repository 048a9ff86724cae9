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


def _tuple_items(annotation: str) -> tuple[tuple[type, ...], int | None] | None:
    """(accepted item types, length or None for any) of `tuple[X, X]` / `tuple[X, ...]` of one scalar X; None for
    other annotations."""
    text = annotation.split("|")[0].strip()
    if not (text.startswith("tuple[") and text.endswith("]")):
        return None
    parts = [part.strip() for part in text[len("tuple["):-1].split(",")]
    kinds = {part for part in parts if part != "..."}
    if len(kinds) != 1 or next(iter(kinds)) not in SCALAR_TYPES:
        return None
    return SCALAR_TYPES[next(iter(kinds))], (None if "..." in parts else len(parts))


def _an(name: str) -> str:
    return f"an {name}" if name[:1] in "aeiou" else f"a {name}"


def check_field_types(obj, owner: str) -> None:
    """ValueError `owner.field: value is a T; expected A` for the first scalar field (or item of a tuple of
    scalars) holding a wrong type. A whole-number float in an int field becomes that int first: JSON has one number
    type, and `"steps": 1e3` or a spreadsheet's `2.0` mean 1000 and 2."""
    for f in fields(obj):
        value, accepted = getattr(obj, f.name), _accepted(str(f.type))
        if accepted == (int,) and isinstance(value, float) and value.is_integer():
            value = int(value)
            object.__setattr__(obj, f.name, value)  # frozen dataclasses too
        items = _tuple_items(str(f.type))
        if items is not None and isinstance(value, tuple | list):
            kinds, _ = items
            for item in value:
                if not isinstance(item, kinds) or (isinstance(item, bool) and bool not in kinds):
                    raise ValueError(f"{owner}.{f.name}: {list(value)!r} holds {_an(type(item).__name__)} "
                                     f"({item!r}); expected {f.type}")
        if accepted is None:
            continue
        if value is None:
            # null where a number is required fails later in a comparison: named here. (A null text or flag reads
            # as empty/false, as configs written before this check may hold.)
            if int in accepted and "None" not in (part.strip() for part in str(f.type).split("|")):
                raise ValueError(f"{owner}.{f.name}: null; expected {f.type}")
            continue
        if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted):
            raise ValueError(f"{owner}.{f.name}: {value!r} is {_an(type(value).__name__)}; expected {f.type}")


def check_known_keys(cls, data: dict, message: str, error: type[Exception] = ValueError,
                     aliases: dict[str, str] | None = None) -> None:
    """`error(f"{message} {unknown}; known: {known}")` when `data` has keys that are not fields of dataclass `cls`
    (a typo in a JSON config is named, never silently ignored), with the closest field as a hint. aliases: other
    tools' names for fields ({"learning_rate": "lr"}): a key close to one is pointed at its field."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        from difflib import get_close_matches

        targets = {name: name for name in known} | dict(aliases or {})
        hints = [f"{name!r} → {targets[close[0]]!r}?" for name in unknown
                 for close in [get_close_matches(str(name), sorted(targets), n=1, cutoff=0.75)] if close]
        raise error(f"{message} {unknown}" + (f" (did you mean: {', '.join(hints)})" if hints else "")
                    + f"; known: {sorted(known)}")


__all__ = ["check_field_types", "check_known_keys"]
