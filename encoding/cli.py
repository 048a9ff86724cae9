"""`sa3-lora encode` and `sa3-lora dataset` subcommands (the lead hooks them into the top-level parser)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .native_stderr import native_stderr_to

DECODER_LOG = "decoder-messages.log"


def add_encode_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "encode", help="encode a folder of audio to an SA3 latent dataset",
        description="Encode every audio file under FOLDER with the pack's SAME autoencoder into the --out folder. Re-running "
                    "re-encodes only new or changed files, re-reads every caption, and continues an interrupted run. "
                    "Exit code 0 when the dataset was written, even if some files were skipped (they are listed "
                    "with reasons); 1 when no file could be used or it stopped early; 2 on a usage error; 130 when "
                    "interrupted with Ctrl-C (the shell's convention; the files finished so far are kept).")
    p.add_argument("folder", help="folder of audio files (any depth)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pack", help="pack name (sa3-medium, sa3-small-music, sa3-small-sfx)")
    src.add_argument("--model", help="model folder (Hub layout) or ComfyUI checkpoint file")
    p.add_argument("--out", required=True, help="dataset folder to write")
    p.add_argument("--variant", default="base", choices=["base", "arc"], help="pack variant (same autoencoder)")
    p.add_argument("--models-dir", default=None, help="folder holding <pack>/<variant>/")
    p.add_argument("--include", nargs="*", default=[], metavar="GLOB", help="only files matching these")
    p.add_argument("--exclude", nargs="*", default=[], metavar="GLOB", help="leave out files matching these")
    p.add_argument("--exclude-from", default=None, metavar="FILE", help="a file with one relpath/glob per line")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "fp32", "fp16"],
                   help="latent storage precision (fp32/fp16 are the same as float32/float16; default float32)")
    p.add_argument("--force", action="store_true", help="re-encode everything (implies --prune)")
    p.add_argument("--prune", action="store_true",
                   help="allow removing earlier outputs when DIR was encoded from another folder, none of its files "
                        "is in this run, or --include/--exclude now leave some out (refused otherwise: encoded "
                        "latents can be hours of work)")
    p.add_argument("--devices", nargs="*", default=None,
                   help="one worker process per device, e.g. cuda:0 cuda:1, or 'all' for every visible GPU "
                        "(default: one process on --device)")
    p.add_argument("--device", default="auto", help="where the autoencoder runs: auto (CUDA, else MPS, else CPU; the "
                   "default, as for generate), cpu, cuda, cuda:1, mps")
    p.add_argument("--quiet", action="store_true", help="no progress (the summary still prints)")
    p.set_defaults(func=_cmd_encode)
    return p


def add_dataset_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("dataset", help="inspect or import encoded datasets")
    sub = p.add_subparsers(dest="dataset_what", metavar="WHAT", required=True)
    i = sub.add_parser("inspect", help="summary of an encoded dataset (ours, official or underfit)")
    i.add_argument("dir", help="the dataset folder")
    i.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    i.add_argument("--prompts", type=int, default=0, metavar="N", help="also show N sample prompts")
    i.add_argument("--prompt-config", default=None, help="PromptConfig JSON file for --prompts")
    i.add_argument("--seed", type=int, default=0, help="seed of the sample prompts")
    i.set_defaults(func=_cmd_inspect)
    m = sub.add_parser("import", help="adopt an official pre_encode_dataset.py or underfit dataset (no re-encoding)")
    m.add_argument("src", help="the folder pre_encode_dataset.py or underfit wrote")
    m.add_argument("--out", default=None, help="link/copy into this folder instead of writing dataset.json in SRC")
    m.set_defaults(func=_cmd_import)
    return p


class _Bar:
    """A one-line progress bar on stderr (no dependency): per file (`__call__`, encode_folder's progress) and
    within a long file (`within`, its file_progress: an hour of audio is some 400 chunks of a real pack)."""

    LOG_EVERY_SECONDS = 30.0  # a log file gets a line within a file only this long after the one before

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.last_line = time.monotonic()  # when a line last went to a non-terminal

    def __call__(self, ev: dict) -> None:
        if self.quiet:
            return
        tail = ev["status"] if ev["status"] == "encoded" else f"skipped: {ev.get('reason', '')}"
        if not sys.stderr.isatty():  # a log file: one plain line per file, no carriage returns or escapes
            self._log(f"{ev['i']}/{ev['n']} {ev['relpath']} ({tail})")
            return
        self._draw(ev["i"], ev["n"], ev["relpath"], tail, end=ev["i"] == ev["n"])

    def within(self, ev: dict) -> None:
        if self.quiet:
            return
        part = ev["done"] / max(ev["total"], 1)
        resumed = (f", resumed at {100 * ev['resumed'] / max(ev['total'], 1):.0f} %"  # the quick start is explained
                   if ev.get("resumed") else "")
        if not sys.stderr.isatty():  # a long file says how far it is now and then; short ones add no lines
            if ev["done"] < ev["total"] and time.monotonic() - self.last_line >= self.LOG_EVERY_SECONDS:
                self._log(f"{ev['i']}/{ev['n']} {ev['relpath']} ({100 * part:.0f} % encoded{resumed})")
            return
        self._draw(ev["i"] - 1 + part, ev["n"], ev["relpath"], f"{100 * part:.0f} %{resumed}", end=False)

    def _log(self, line: str) -> None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        self.last_line = time.monotonic()

    def _draw(self, done: float, n: int, relpath: str, tail: str, end: bool) -> None:
        filled = int(30 * done / max(n, 1))
        name = relpath if len(relpath) <= 40 else "…" + relpath[-39:]
        shown = int(done) if done == int(done) else int(done) + 1  # the file being encoded counts
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {shown}/{n} {name} ({tail})\x1b[K")
        if end:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _cmd_encode(args) -> int:
    from functools import partial

    from .encode import encode_folder, load_encoder
    from .scan import plan_encode

    source = args.pack or args.model
    variant = args.variant if args.pack else None
    exclude = list(args.exclude)
    if args.exclude_from:
        exclude += [ln.strip() for ln in Path(args.exclude_from).read_text(encoding="utf-8").splitlines()
                    if ln.strip() and not ln.startswith("#")]
    factory = partial(load_encoder, source, variant=variant, models_dir=args.models_dir)
    decoder_log = Path(args.out) / DECODER_LOG
    dtype = {"fp32": "float32", "fp16": "float16"}.get(args.dtype, args.dtype)
    bar = _Bar(args.quiet)
    kw = dict(include=args.include, exclude=exclude, dtype=dtype, force=args.force, prune=args.prune,
              progress=bar, file_progress=bar.within, model_info={"source": source, "variant": variant})
    try:
        kw["planned"] = plan_encode(args.folder, args.out, args.include, exclude,  # before the model loads
                                    prune=args.prune or args.force)
        if args.devices == ["all"]:
            import torch

            args.devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or [args.device]
        from ..training.trainer import usable_device

        devices = [str(usable_device(d)) for d in (args.devices or [args.device])]  # named errors, before any load
        with native_stderr_to(decoder_log) as decoder_messages:
            if len(devices) > 1:
                report = encode_folder(args.folder, args.out, encoder_factory=factory, devices=devices, **kw)
            else:
                report = encode_folder(args.folder, args.out, factory(devices[0]), **kw)
    except KeyboardInterrupt:
        print(f"\nsa3-lora encode: interrupted; the files finished so far are kept in {args.out}. Run the same "
              "command again to continue.", file=sys.stderr)
        return 130
    except OSError as e:  # the dataset folder itself (permissions, a full disk): no traceback, the message says it
        print(f"sa3-lora encode: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    if decoder_messages.bytes and not args.quiet:
        print(f"  decoder messages (libmpg123 and the like, already summed up above): {decoder_log}")
    return 0 if report.complete and report.usable else 1


def _cmd_inspect(args) -> int:
    from .dataset import load_dataset

    ds = load_dataset(args.dir)
    m = ds.manifest
    info = {
        "dir": str(ds.root), "format": m.get("origin", m.get("format")), "complete": ds.complete,
        "encoder": m.get("encoder", {}), "latent_dim": ds.latent_dim, "latent_rate": m.get("latent_rate"),
        "dtype": m.get("dtype"), "totals": m.get("totals", {}),
        "skipped": [{"relpath": f["relpath"], "reason": f.get("reason"), "detail": f.get("detail", "")}
                    for f in ds.skipped],
        "warnings": [{"relpath": e["relpath"], "warning": w} for e in ds.entries for w in e.get("warnings", [])]
        + [w for w in m.get("dataset_warnings", []) if "relpath" in w],  # e.g. a byte-identical copy
        "table_warnings": [w for w in m.get("dataset_warnings", []) if "table" in w],
    }
    if args.prompts:
        from .prompts import PromptConfig, preview_prompts

        cfg = PromptConfig()
        if args.prompt_config:
            cfg = PromptConfig.from_dict(json.loads(Path(args.prompt_config).read_text(encoding="utf-8")))
        info["prompts"] = preview_prompts(ds, cfg, args.seed, args.prompts)
    if args.json:
        print(json.dumps(info, ensure_ascii=False, indent=1))
        return 0
    t = info["totals"]
    enc = info["encoder"]
    print(f"{ds.root}: {len(ds)} files, {ds.total_seconds / 60:.1f} min, "
          f"{'complete' if ds.complete else 'INCOMPLETE (run encode again to finish)'}")
    print(f"  encoder {enc.get('name')} (latent_dim {ds.latent_dim}, ratio {enc.get('downsampling_ratio')}, "
          f"{info['latent_rate'] or '?'} latents/s), dtype {info['dtype'] or '?'}, format {info['format']}")
    if t:
        print(f"  {t.get('encoded', 0)} encoded, {t.get('skipped', 0)} skipped, {t.get('pending', 0)} pending, "
              f"{t.get('excluded', 0)} excluded, {t.get('n_latents', 0)} latent frames")
    for s in info["skipped"]:
        print(f"  skipped {s['relpath']}: {s['reason']}")
    for w in info["table_warnings"]:
        print(f"  warning {w['table']}: {w['warning']}")
    for w in info["warnings"]:
        print(f"  warning {w['relpath']}: {w['warning']}")
    for row in info.get("prompts", []):
        print(f"  [{row['source'] or '-'}] {row['relpath']}: {row['prompt']}")
    return 0


def _cmd_import(args) -> int:
    from .dataset import import_dataset

    ds = import_dataset(args.src, args.out)
    print(f"{ds.root}: imported {len(ds)} files ({ds.total_seconds / 60:.1f} min), "
          f"{len(ds.skipped)} unusable pairs, latent_dim {ds.latent_dim}")
    return 0
