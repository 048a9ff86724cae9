"""LoRA-family adapters for SA3: maths, files, targets, and non-mutating application (knows nn.Modules, not SA3)."""

from .apply import (
    MODES,
    SA3_ROOTS,
    AdaptedLayer,
    AdaptedModel,
    AdapterMismatch,
    AdapterUse,
    ApplyReport,
    Root,
    adapter_session,
    as_use,
    load_adapter_cached,
    new_adapter,
    skip_steps_interval,
)
from .files import (
    EXTRA_METADATA_KEYS,
    AdapterFileError,
    LoadedAdapter,
    adapter_from_state,
    infer_rank,
    read_adapter_file,
    weights_fingerprint,
    write_adapter_file,
)
from .maths import ADAPTER_TYPES, resolve_adapter_type
from .targets import PRESETS, select_targets

__all__ = [
    "ADAPTER_TYPES", "EXTRA_METADATA_KEYS", "MODES", "PRESETS", "SA3_ROOTS", "adapter_session", "as_use",
    "load_adapter_cached", "AdaptedLayer", "AdaptedModel", "AdapterFileError",
    "AdapterMismatch", "AdapterUse", "ApplyReport", "LoadedAdapter", "Root", "adapter_from_state", "infer_rank",
    "new_adapter", "read_adapter_file", "resolve_adapter_type", "select_targets", "skip_steps_interval",
    "weights_fingerprint", "write_adapter_file",
]
