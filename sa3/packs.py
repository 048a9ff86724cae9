"""The three SA3 packs, where their files live, and downloading them from the Hugging Face Hub.

A pack has a base model (adapters are trained on it) and an ARC post-trained model (base-trained adapters are used
on it). On disk, inside ComfyUI: `models/sa3/<pack>/{base,arc}/` each holding the Hub repo's files
(`model_config.json`, `model.safetensors`, `t5gemma-b-b-ul2/`). Standalone: the same layout under `--models-dir`,
or the Hugging Face cache when no models folder is given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TEXT_ENCODER_SUBFOLDER = "t5gemma-b-b-ul2"
VARIANTS = ("base", "arc")


@dataclass(frozen=True)
class Pack:
    name: str  # "sa3-medium"
    family: str  # config family in sa3/configs: "medium" | "small-music" | "small-sfx"
    arc_repo: str
    base_repo: str
    autoencoder_repo: str  # SAME-only repo with the same autoencoder weights
    description: str

    def repo(self, variant: str) -> str:
        return {"base": self.base_repo, "arc": self.arc_repo}[check_variant(variant)]


PACKS = {
    p.name: p
    for p in (
        Pack("sa3-medium", "medium", "stabilityai/stable-audio-3-medium", "stabilityai/stable-audio-3-medium-base",
             "stabilityai/SAME-L", "1.4B DiT + SAME-L, music and sound up to 380 s"),
        Pack("sa3-small-music", "small-music", "stabilityai/stable-audio-3-small-music",
             "stabilityai/stable-audio-3-small-music-base", "stabilityai/SAME-S", "433M DiT + SAME-S, music"),
        Pack("sa3-small-sfx", "small-sfx", "stabilityai/stable-audio-3-small-sfx",
             "stabilityai/stable-audio-3-small-sfx-base", "stabilityai/SAME-S", "433M DiT + SAME-S, sound effects"),
    )
}

HUB_FILES = ["model_config.json", "model.safetensors", f"{TEXT_ENCODER_SUBFOLDER}/*"]


class PackError(ValueError):
    pass


class GatedModelError(PackError):
    """The Hub refused the download (401/403): the licence was not accepted or no token is configured."""


def check_variant(variant: str) -> str:
    v = variant.lower()
    if v in ("arc", "post-trained", "distilled"):
        return "arc"
    if v == "base":
        return "base"
    raise PackError(f"variant={variant!r}; use 'base' (for training, Euler/CFG 7) or 'arc' (8-step ping-pong)")


def get_pack(name: str) -> Pack:
    key = name if name.startswith("sa3-") else f"sa3-{name}"
    if key not in PACKS:
        raise PackError(f"unknown pack {name!r}; known packs: {', '.join(PACKS)}")
    return PACKS[key]


def default_models_dir() -> Path | None:
    """`SA3_MODELS_DIR`, else ComfyUI's `models/sa3` when running inside ComfyUI, else None (Hub cache)."""
    env = os.environ.get("SA3_MODELS_DIR")
    if env:
        return Path(env)
    try:
        import folder_paths  # only inside ComfyUI

        return Path(folder_paths.models_dir) / "sa3"
    except ImportError:
        return None


def pack_folder(name: str, variant: str, models_dir: str | Path | None = None) -> Path | None:
    """Where a pack variant lives locally (may not exist yet). None means 'use the HF cache'."""
    root = Path(models_dir) if models_dir else default_models_dir()
    return root / get_pack(name).name / check_variant(variant) if root else None


def is_complete(folder: Path) -> bool:
    return (folder / "model_config.json").is_file() and (folder / "model.safetensors").is_file()


def find_text_encoder(folder: Path) -> Path | None:
    """A variant's T5Gemma folder; the base and ARC repos ship the same one, so the sibling's is used too."""
    for candidate in (folder / TEXT_ENCODER_SUBFOLDER, folder.parent / "base" / TEXT_ENCODER_SUBFOLDER,
                      folder.parent / "arc" / TEXT_ENCODER_SUBFOLDER):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def local_packs(models_dir: str | Path | None = None) -> list[tuple[str, str, Path]]:
    """(pack, variant, folder) for every complete pack variant already on disk."""
    root = Path(models_dir) if models_dir else default_models_dir()
    found = []
    if root and root.is_dir():
        for pack in PACKS.values():
            for variant in VARIANTS:
                folder = root / pack.name / variant
                if is_complete(folder):
                    found.append((pack.name, variant, folder))
    return found


def other_model_folders(models_dir: str | Path | None = None) -> list[tuple[str, str, Path]]:
    """(name, variant, folder) for complete model folders in the packs' layout (<name>/<base|arc>/) whose name is
    no official pack, e.g. the quickstart's tiny model: loadable by their path."""
    root = Path(models_dir) if models_dir else default_models_dir()
    if not (root and root.is_dir()):
        return []
    return [(d.name, variant, d / variant) for d in sorted(root.iterdir())
            if d.is_dir() and d.name not in PACKS for variant in VARIANTS if is_complete(d / variant)]


def licence_message(repo_id: str) -> str:
    return (f"The Hub refused access to {repo_id}. Stable Audio 3 models are gated: open "
            f"https://huggingface.co/{repo_id}, accept the licence while logged in, then log in here with "
            "`huggingface-cli login` (or set HF_TOKEN) and retry.")


def download_pack(name: str, variant: str, models_dir: str | Path | None = None, token: str | None = None,
                  with_text_encoder: bool = True, progress: bool = True) -> Path:
    """Download (or resume) a pack variant; returns its folder. Files already present are used offline."""
    folder = pack_folder(name, variant, models_dir)
    if folder is not None and is_complete(folder) and (not with_text_encoder or find_text_encoder(folder)):
        return folder
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    repo = get_pack(name).repo(variant)
    patterns = HUB_FILES if with_text_encoder else HUB_FILES[:2]
    if folder is not None and with_text_encoder and find_text_encoder(folder):
        patterns = HUB_FILES[:2]  # the sibling variant already has the text encoder
    try:
        path = snapshot_download(repo, allow_patterns=patterns, local_dir=str(folder) if folder else None,
                                 token=token)
    except (GatedRepoError, RepositoryNotFoundError) as e:
        raise GatedModelError(licence_message(repo)) from e
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise GatedModelError(licence_message(repo)) from e
        raise PackError(f"downloading {repo} failed: {e}. Re-run to resume; finished files are kept.") from e
    return Path(path)


def hub_cache_dir() -> str:
    """Where huggingface_hub keeps downloads ($HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def resolve_pack(name: str, variant: str, models_dir: str | Path | None = None, download: bool = False,
                 token: str | None = None) -> Path:
    """The local folder of a pack variant, downloading it if allowed; otherwise a message saying how to get it."""
    folder = pack_folder(name, variant, models_dir)
    if folder is not None and is_complete(folder):
        return folder
    if folder is None:
        try:  # the Hugging Face cache, offline
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(get_pack(name).repo(variant), allow_patterns=HUB_FILES,
                                          local_files_only=True))
            if is_complete(path):
                return path
        except Exception:
            pass
    if download:
        return download_pack(name, variant, models_dir, token=token)
    where = folder or f"the Hugging Face cache ({hub_cache_dir()})"
    raise PackError(f"{name} ({variant}) is not in {where}. Download it with "
                    f"`sa3-lora download {name} --variant {variant}` (accept the licence at "
                    f"https://huggingface.co/{get_pack(name).repo(variant)} first), or place the Hub repo's files there.")
