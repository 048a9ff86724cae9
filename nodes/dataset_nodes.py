"""Dataset nodes: encode a folder of audio, load an encoded dataset, compose prompts (with a preview)."""

from __future__ import annotations

from pathlib import Path

from .comfy_bridge import CATEGORY, output_dir
from .model_nodes import using


def text_list(text: str) -> list[str]:
    """Items of a text widget: one per line or comma-separated, stripped, empty ones dropped."""
    return [p.strip() for p in text.replace("\n", ",").split(",") if p.strip()]


def dataset_dir_for(name: str) -> Path:
    root = output_dir() or Path.cwd()
    safe = Path(name).name or "dataset"
    return root / "sa3_datasets" / safe


def audio_folder(folder: str) -> Path:
    """The folder an Encode node reads: absolute as given; relative, the first that exists of: inside ComfyUI's
    input folder (its --input-directory; a leading "input/" is that folder too), then the working folder."""
    if not folder.strip():
        raise ValueError("SA3 Encode Audio Folder: give the folder of your audio (a folder inside ComfyUI's input "
                         "folder, or an absolute path)")
    path = Path(folder.strip()).expanduser()
    if path.is_absolute():
        return path
    from .comfy_bridge import input_dir

    base = input_dir()
    candidates = []
    if base is not None:
        candidates.append(base / path)
        if path.parts[:1] == ("input",):
            candidates.append(base.joinpath(*path.parts[1:]))
    candidates.append(Path.cwd() / path)
    return next((c for c in candidates if c.is_dir()), candidates[0])


class SA3EncodeAudioFolder:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("SA3_MODEL", {"tooltip": "Its SAME autoencoder encodes the audio (SAME-S and SAME-L latents are "
                                               "interchangeable)."}),
            "folder": ("STRING", {"default": "", "tooltip": "Folder of audio files (WAV, FLAC, AIFF, MP3, OGG, Opus, "
                                  "M4A…), searched recursively: an absolute path, or a folder inside ComfyUI's input "
                                  "folder. Captions: song.json / song.txt sidecars, metadata.csv rows, tags, paths."}),
            "dataset_name": ("STRING", {"default": "my-dataset", "tooltip": "Written to output/sa3_datasets/<name>."}),
            "include": ("STRING", {"default": "", "multiline": True, "tooltip": "Only files matching these globs "
                                   "(comma or newline separated); empty = all."}),
            "exclude": ("STRING", {"default": "", "multiline": True, "tooltip": "Leave out files matching these globs."}),
            "dtype": (["float32", "float16"], {"default": "float32", "tooltip": "Latent storage precision."}),
            "force": ("BOOLEAN", {"default": False, "tooltip": "Re-encode everything (otherwise only new or changed "
                                  "files are encoded)."}),
        }, "optional": {
            "prune": ("BOOLEAN", {"default": False, "tooltip": "Remove the encoded files that include/exclude now "
                                  "leave out, or a dataset encoded from another folder (refused otherwise: encoded "
                                  "latents can be hours of work). Files deleted from the folder always leave."}),
        }}

    RETURN_TYPES = ("SA3_DATASET", "STRING")
    RETURN_NAMES = ("dataset", "report")
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True  # Load Pack -> Encode alone is a graph ComfyUI runs: encode now, train later; the report shows
    DESCRIPTION = "Encodes every audio file of a folder to latents for training; bad files are skipped and listed."

    @classmethod
    def IS_CHANGED(cls, model, folder, dataset_name, include, exclude, dtype, force, prune=False):
        # The inputs alone do not say whether files were added or captions edited since the last run: the folder's
        # files do (a stat walk), and whether the dataset is still there
        from ..encoding.dataset import folder_signature

        out = dataset_dir_for(dataset_name)
        if not (out / "dataset.json").is_file() or not folder.strip():
            return float("nan")  # no dataset (yet, or deleted since), or no folder (the node says): run
        return folder_signature(audio_folder(folder), skip=(out,))

    def encode(self, model, folder, dataset_name, include, exclude, dtype, force, prune=False):
        import torch

        from ..encoding import encode_folder, load_dataset
        from .comfy_bridge import fractional_progress, throw_if_interrupted

        src = audio_folder(folder)
        if not src.is_dir():
            raise ValueError(f"SA3 Encode Audio Folder: {folder!r} is not a folder (looked for {src}; a relative "
                             "folder is looked for in ComfyUI's input folder, then where ComfyUI runs)")
        out = dataset_dir_for(dataset_name)
        bar = {}

        def move_bar(event, done: float):  # the bar is made at the first event, which knows how many files
            if "bar" not in bar:
                bar["bar"] = fractional_progress(event["n"])
            if bar["bar"]:
                bar["bar"](done)

        def progress(event):
            move_bar(event, event["i"])

        def within_file(event):  # a long file part-way: an hour of audio is some 400 chunks of a real pack
            move_bar(event, event["i"] - 1 + event["done"] / max(event["total"], 1))

        cancelled = []  # ComfyUI's interrupt, raised again once the finished work is saved (not an error dialog)

        def should_stop():
            try:
                throw_if_interrupted()
            except Exception as e:
                cancelled.append(e)
                return True
            return False

        with torch.inference_mode(False), using(model):
            report = encode_folder(src, out, encoder=model, include=text_list(include), exclude=text_list(exclude),
                                   dtype=dtype, force=force, prune=prune, progress=progress, should_stop=should_stop,
                                   file_progress=within_file)
        if report.interrupted:
            if cancelled:
                raise cancelled[0]
            raise RuntimeError(f"SA3 Encode Audio Folder: interrupted; queue it again to continue.\n{report.summary()}")
        summary = report.summary()
        return {"ui": {"text": [summary]}, "result": (str(load_dataset(out).root), summary)}


class SA3LoadDataset:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {"default": "", "tooltip": "An encoded dataset folder (ours, the "
                                                 "official pre_encode_dataset.py output, or underfit's)."})}}

    RETURN_TYPES = ("SA3_DATASET", "STRING")
    RETURN_NAMES = ("dataset", "report")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, path):
        from ..encoding import DatasetError, load_dataset

        p = Path(path).expanduser()
        if not p.is_absolute() and not p.exists():
            p = dataset_dir_for(path)
        try:
            ds = load_dataset(p)
        except DatasetError as e:  # the message names the folder and what to do; the node's name says where
            raise DatasetError(f"SA3 Load Dataset: {e}") from None
        report = (f"{ds.root}: {len(ds)} files, {ds.total_seconds / 60:.1f} min, latent dim {ds.latent_dim}, "
                  f"{len(ds.skipped)} skipped")
        return (str(ds.root), report)


class SA3ComposePrompts:
    @classmethod
    def INPUT_TYPES(cls):
        pct = {"min": 0.0, "max": 100.0, "step": 1.0}
        return {"required": {
            "caption_weight": ("FLOAT", {"default": 100.0, **pct, "tooltip": "Balance: captions (.txt / JSON prompt)."}),
            "tags_weight": ("FLOAT", {"default": 0.0, **pct, "tooltip": "Balance: 'Key: value' tags (genre, bpm, key…)."}),
            "path_weight": ("FLOAT", {"default": 0.0, **pct, "tooltip": "Balance: the file's relative path."}),
            "fixed_weight": ("FLOAT", {"default": 0.0, **pct, "tooltip": "Balance: the fixed text below."}),
            "fixed_text": ("STRING", {"default": "", "multiline": True, "tooltip": "Text used for the fixed share of prompts."}),
            "tag_keys": ("STRING", {"default": "", "tooltip": "Tag keys to use, comma separated (empty = defaults)."}),
            "hide_tag_names": ("BOOLEAN", {"default": False, "tooltip": "'rock' instead of 'Genre: rock'."}),
            "split_commas": ("BOOLEAN", {"default": False, "tooltip": "'Genre: rock, pop' becomes two tags."}),
            "hide_extension": ("BOOLEAN", {"default": True, "tooltip": "Path prompts without .wav/.flac…"}),
            "hide_directories": ("BOOLEAN", {"default": False, "tooltip": "Path prompts use the file name only."}),
            "shuffle": ("BOOLEAN", {"default": True, "tooltip": "Shuffle comma-separated parts of tag prompts."}),
            "trigger": ("STRING", {"default": "", "tooltip": "Trigger word prepended (never replacing the caption)."}),
            "trigger_percent": ("FLOAT", {"default": 100.0, **pct, "tooltip": "Share of prompts that get the trigger word."}),
            "preview_seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "The preview shows what "
                                    "training step <seed> sees with run seed 0 (prompt_seed(run_seed, step))."}),
            # added later: after the first widgets, so workflows saved before them keep their values
            "hide_commas": ("BOOLEAN", {"default": False, "tooltip": "Tag prompts joined by spaces instead of "
                            "commas ('rock 120 bpm' instead of 'rock, 120 bpm')."}),
            "hide_top_folder": ("BOOLEAN", {"default": False, "tooltip": "Path prompts without their first folder "
                                "(e.g. the collection's name that every file shares)."}),
            "tag_subset_percent": ("FLOAT", {"default": 50.0, **pct, "tooltip": "Share of tag prompts that keep "
                                   "only a random part of the tags (so the adapter also answers short prompts)."}),
            "shuffle_captions": ("BOOLEAN", {"default": False, "tooltip": "With shuffle: shuffle the comma-"
                                 "separated parts of captions too (for captions that are lists of tags)."}),
            "fallback": ("BOOLEAN", {"default": True, "tooltip": "A file that has none of the weighted sources "
                         "(say no caption while only captions are weighted) uses its caption, tags or path, in that "
                         "order, so no file trains unconditioned by accident; off = an empty prompt for it."}),
        }, "optional": {"dataset": ("SA3_DATASET", {"tooltip": "Connect to preview real prompts from this dataset."})}}

    RETURN_TYPES = ("SA3_PROMPT_CONFIG", "STRING")
    RETURN_NAMES = ("prompt_config", "preview")
    FUNCTION = "compose"
    CATEGORY = CATEGORY
    DESCRIPTION = "How training prompts are built from captions, tags, paths and fixed text; previews real prompts."

    def compose(self, caption_weight, tags_weight, path_weight, fixed_weight, fixed_text, tag_keys, hide_tag_names,
                split_commas, hide_extension, hide_directories, shuffle, trigger, trigger_percent, preview_seed,
                hide_commas=False, hide_top_folder=False, tag_subset_percent=50.0, shuffle_captions=False,
                fallback=True, dataset=None):
        from ..encoding import PromptConfig, load_dataset, preview_prompts

        fields = dict(caption_weight=caption_weight, tags_weight=tags_weight, path_weight=path_weight,
                      fixed_weight=fixed_weight, fixed_text=fixed_text, hide_tag_names=hide_tag_names,
                      split_commas=split_commas, hide_extension=hide_extension, hide_directories=hide_directories,
                      shuffle=shuffle, trigger=trigger, trigger_percent=trigger_percent if trigger else 0.0,
                      hide_commas=hide_commas, hide_top_folder=hide_top_folder, tag_subset_percent=tag_subset_percent,
                      shuffle_captions=shuffle_captions, fallback=fallback)
        if tag_keys.strip():
            fields["tag_keys"] = tuple(k.strip() for k in tag_keys.split(",") if k.strip())
        try:
            config = PromptConfig(**fields)
        except ValueError as e:
            raise ValueError(f"SA3 Compose Prompts: {e}") from None
        preview = ""
        if dataset:
            rows = preview_prompts(load_dataset(dataset), config, preview_seed, n=8)
            preview = "\n".join(f"{r['relpath']}: {r['prompt']}" for r in rows)
        return {"ui": {"text": [preview]}, "result": (config.to_dict(), preview)}


NODE_CLASS_MAPPINGS = {"SA3EncodeAudioFolder": SA3EncodeAudioFolder, "SA3LoadDataset": SA3LoadDataset,
                       "SA3ComposePrompts": SA3ComposePrompts}
NODE_DISPLAY_NAME_MAPPINGS = {"SA3EncodeAudioFolder": "SA3 Encode Audio Folder", "SA3LoadDataset": "SA3 Load Dataset",
                              "SA3ComposePrompts": "SA3 Compose Prompts"}
