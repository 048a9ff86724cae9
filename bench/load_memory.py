"""Peak RAM while loading a checkpoint, against the model's size in the chosen dtype (target: at most ~1.3x).

Writes a random-weight checkpoint of a real family's size (default small-music, fp32 on disk, ~2.3 GB) to a temp
folder, then loads it in a fresh process per dtype and reads the kernel's peak RSS (VmHWM).

    python bench/load_memory.py [--family small-music] [--dtypes fp32 bf16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_random_checkpoint(family: str, folder: Path) -> None:
    import torch
    from sa3_lora_studio.sa3.config import family_defaults, read_config
    from sa3_lora_studio.sa3.model import SA3Modules
    from safetensors.torch import save_file

    raw = family_defaults(family)
    cfg = read_config(raw)
    modules = SA3Modules(cfg)  # default init is fine: only sizes matter here
    state = {k: v.contiguous() for k, v in modules.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "model_config.json").write_text(json.dumps(raw))
    del modules, state
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def child(folder: str, dtype: str) -> None:
    import sa3_lora_studio.sa3.model as m
    import torch

    base = vm_hwm_mb()
    model = m.load_model(folder, dtype=dtype)
    size = sum(t.numel() * t.element_size() for t in model.modules.state_dict().values()) / 2**20
    print(json.dumps({"base_mb": base, "peak_mb": vm_hwm_mb(), "model_mb": size, "torch": torch.__version__}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="small-music")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--child", nargs=2, metavar=("FOLDER", "DTYPE"))
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return
    folder = Path(tempfile.mkdtemp(prefix="sa3-load-"))
    try:
        write_random_checkpoint(args.family, folder)
        for dtype in args.dtypes:
            out = subprocess.run([sys.executable, __file__, "--child", str(folder), dtype], capture_output=True,
                                 text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            grown = r["peak_mb"] - r["base_mb"]
            print(f"{args.family} {dtype}: model {r['model_mb']:.0f} MB, peak RSS growth during load {grown:.0f} MB "
                  f"= {grown / r['model_mb']:.2f}x the model (process peak {r['peak_mb']:.0f} MB)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
