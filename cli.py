"""`sa3-lora` command line. Each subcommand lives beside the code it drives; this file only wires them up.

Heavy imports (torch, the engine) happen inside the handlers so `sa3-lora --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_info(args) -> int:
    from .sa3.model import load_model
    from .training.trainer import usable_device

    model = load_model(args.source, dtype=args.dtype, device=usable_device(args.device), variant=args.variant,
                       text_encoder=args.text_encoder, models_dir=args.models_dir)
    cfg = model.config
    n_params = sum(p.numel() for p in model.modules.parameters())
    print(json.dumps({
        "source": model.source, "family": cfg.family, "objective": cfg.objective, "arc": cfg.is_arc,
        "config_inferred": cfg.inferred, "sample_rate": cfg.sample_rate, "latent_dim": cfg.latent_dim,
        "downsampling_ratio": cfg.downsampling_ratio, "max_seconds": cfg.sample_size / cfg.sample_rate,
        "dit": {k: cfg.dit[k] for k in ("embed_dim", "depth", "num_heads", "num_memory_tokens") if k in cfg.dit},
        "parameters": n_params, "dtype": str(model.dtype),
        "text_encoder": model.conditioner.conditioners["prompt"].has_text_encoder,
    }, indent=1))
    return 0


def _cmd_download(args) -> int:
    from .sa3.packs import download_pack

    for variant in args.variant:
        folder = download_pack(args.pack, variant, args.models_dir)
        print(f"{args.pack} ({variant}): {folder}")
    return 0


def _cmd_packs(args) -> int:
    from .sa3.packs import PACKS, local_packs, other_model_folders

    have = {(p, v): f for p, v, f in local_packs(args.models_dir)}
    for pack in PACKS.values():
        for variant in ("base", "arc"):
            where = have.get((pack.name, variant))
            print(f"{pack.name:16} {variant:4}  {pack.repo(variant):44} {where or '(not downloaded)'}")
    for name, variant, folder in other_model_folders(args.models_dir):  # e.g. the quickstart's tiny model
        print(f"{name:16} {variant:4}  {'(a model folder: load it by its path)':44} {folder}")
    return 0


def _cmd_svd_bases(args) -> int:
    from pathlib import Path

    import torch

    from .adapters.apply import SA3_ROOTS, target_weights
    from .adapters.targets import resolve_patterns
    from .adapters.xs_bases import bases_file_key, write_svd_bases_file
    from .sa3.model import build_modules, locate_checkpoint

    if args.columns < 1:
        raise ValueError(f"--columns must be at least 1 (the largest -xs rank the file serves), not {args.columns}")
    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        raise ValueError(f"--out {out}: give a file path in an existing folder (e.g. svd_bases.pt)")
    loc = locate_checkpoint(args.source, variant=args.variant, models_dir=args.models_dir)
    include, exclude = resolve_patterns(args.include or None, args.exclude or None, args.preset)
    keys = [bases_file_key(layer) for layer in target_weights(build_modules(loc.config), SA3_ROOTS, include, exclude)]
    print(f"{len(keys)} layers of {loc.path}: an SVD of each (seconds per large layer on a CPU)...", file=sys.stderr)
    write_svd_bases_file(out, ((key, loc.file.read(key, torch.float32)) for key in keys), args.columns)
    print(f"{out}: bases of {len(keys)} layers, up to rank {args.columns}. Use it for -xs adapters trained on this "
          f"model: add \"svd_bases_path\": \"{out.resolve()}\" to the model_config.json of the model you apply them "
          f"to (e.g. its ARC variant); the official loader reads it there too (and train_lora.py --svd_bases_path).")
    return 0


def _cmd_bench(args) -> int:
    from .sa3.bench import run_bench

    return run_bench(args)


def _cmd_quickstart(args) -> int:
    from .quickstart import run_quickstart

    return run_quickstart(args)


def add_model_args(p, device: str = "cpu") -> None:
    """The arguments that say which model to load (`sa3.model.load_model`'s)."""
    p.add_argument("source", help="model folder (Hub layout), ComfyUI checkpoint file, or pack name")
    p.add_argument("--variant", default=None, choices=["base", "arc"], help="pack variant (pack names only)")
    p.add_argument("--text-encoder", default=None, help="T5Gemma folder or ComfyUI t5gemma_b_b_ul2.safetensors")
    p.add_argument("--models-dir", default=None, help=MODELS_DIR_HELP)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights' precision (default fp32)")
    p.add_argument("--device", default=device, help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:1, mps")


MODELS_DIR_HELP = "folder holding <pack>/<variant>/ (default: $SA3_MODELS_DIR, else the Hugging Face cache)"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("sa3-lora-studio")
    except Exception:  # not installed as a package (a ComfyUI custom_nodes copy)
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sa3-lora", description="SA3 LoRA Studio: train and use Stable Audio 3 "
                                     "LoRA-family adapters from the command line.")
    parser.add_argument("--version", action="version", version=f"sa3-lora {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="load a model and print its configuration")
    add_model_args(p)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("download", help="download a pack from the Hugging Face Hub (gated: accept the licence first)")
    p.add_argument("pack", help="sa3-medium | sa3-small-music | sa3-small-sfx")
    p.add_argument("--variant", nargs="+", default=["base", "arc"], choices=["base", "arc"],
                   help="which variants (default both)")
    p.add_argument("--models-dir", default=None, help=MODELS_DIR_HELP)
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser("packs", help="list the packs and which are on disk")
    p.add_argument("--models-dir", default=None, help=MODELS_DIR_HELP)
    p.set_defaults(func=_cmd_packs)

    p = sub.add_parser("svd-bases", help="write a model's -xs SVD bases file (official svd_bases_path format)",
                       description="Compute the SVD bases -xs adapters use from a model's weights (normally the base "
                                   "model they are trained on) and write them in the official format. With the file "
                                   "named as svd_bases_path in another model's model_config.json (e.g. the ARC "
                                   "variant), -xs adapters applied there use these bases, as trained, here and in "
                                   "the official tools.")
    p.add_argument("source", help="model folder (Hub layout), ComfyUI checkpoint file, or pack name")
    p.add_argument("--variant", default=None, choices=["base", "arc"], help="pack variant (pack names only)")
    p.add_argument("--models-dir", default=None, help=MODELS_DIR_HELP)
    p.add_argument("--out", required=True, help="file to write, e.g. svd_bases.pt")
    p.add_argument("--columns", type=int, default=128, help="basis vectors kept per layer: the largest rank served")
    p.add_argument("--preset", default=None, help="layer preset, as for training (default: every adaptable layer)")
    p.add_argument("--include", nargs="*", default=[], metavar="PATTERN", help="only layers matching these")
    p.add_argument("--exclude", nargs="*", default=[], metavar="PATTERN", help="leave out layers matching these")
    p.set_defaults(func=_cmd_svd_bases)

    p = sub.add_parser("bench", help="print speed and memory figures")
    bench_sub = p.add_subparsers(dest="bench_what", metavar="WHAT", required=True)
    b = bench_sub.add_parser("engine", help="DiT forward time and peak memory for a config, length and dtype")
    b.add_argument("--config", default="small-music",
                   help="family name (small-music, small-sfx, medium), model_config.json path, or model folder")
    b.add_argument("--seconds", type=float, default=10.0, help="audio length of the latents (default 10)")
    b.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    b.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights and activations")
    b.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default cpu)")
    b.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    b.add_argument("--repeats", type=int, default=3, help="timed forwards; the best is printed (default 3)")
    b.set_defaults(func=_cmd_bench)

    p = sub.add_parser("quickstart", help="the whole loop on a tiny built-in model (no downloads)")
    p.add_argument("--out", default="quickstart-out", help="folder for the tiny model, dataset, run and outputs")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic dataset, training and generation")
    p.set_defaults(func=_cmd_quickstart)

    for hook in _extension_hooks():
        hook(sub)
    return parser


def _extension_hooks():
    """Subcommands contributed by other parts of the pack (encoding, training, client), if present."""
    from .api_client import add_queue_parser
    from .generate_cli import add_generate_parser
    from .training.cli import add_train_parsers

    hooks = [add_generate_parser, add_queue_parser, add_train_parsers]
    try:
        from .encoding.cli import add_dataset_parser, add_encode_parser

        hooks += [add_encode_parser, add_dataset_parser]
    except ImportError:
        pass
    return hooks


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as e:
        # Our errors carry actionable messages; a traceback would bury them.
        print(f"sa3-lora {args.command}: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        from .sa3.atomic import READ_ONLY_ERRNOS

        if e.errno not in READ_ONLY_ERRNOS:
            raise
        where = Path(e.filename).parent if e.filename else "a folder it writes to"
        print(f"sa3-lora {args.command}: cannot write into {where}: {e.strerror} (a read-only folder or mount: "
              "copy it somewhere writable, or run as a user who may write there)", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `sa3-lora … | head`: the reader left; no traceback, nothing more to write
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["add_model_args", "build_parser", "main"]
