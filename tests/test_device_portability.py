"""Apple's MPS backend has no float64: no op of the engine's device-side work (text-to-audio with both samplers,
audio-to-audio, inpainting, encoding a folder, and training runs of each adapter family with base and ARC demos)
may produce a float64 tensor. Checked on the CPU with a dispatch mode that sees every aten op's outputs (there is
no Mac here; a float64 op would raise on MPS at that line)."""

import collections
import traceback

import pytest
import torch
from sa3_lora_studio.sa3.generate import generate
from sa3_lora_studio.training.events import EventLog
from sa3_lora_studio.training.runs import RunConfig
from sa3_lora_studio.training.trainer import Trainer
from sa3_lora_studio.training.worker import RunControl
from torch.utils._python_dispatch import TorchDispatchMode


class Float64Ops(TorchDispatchMode):
    """Records (op, innermost line of this pack) for every op that returns a float64 tensor."""

    def __init__(self):
        super().__init__()
        self.found = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if any(isinstance(o, torch.Tensor) and o.dtype == torch.float64 for o in outs):
            ours = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack() if "sa3_lora_studio" in f.filename
                    or "/sa3/" in f.filename or "/adapters/" in f.filename or "/training/" in f.filename]
            self.found[(str(func), ours[-1] if ours else "?")] += 1
        return out


def test_generation_in_every_mode_makes_no_float64_tensor(tiny):
    seconds = tiny.config.sample_size / tiny.sample_rate
    with Float64Ops() as ops:
        wave, rate = generate(tiny, ["dusty beat", "a much longer prompt about a bell"], duration=seconds, seed=1,
                              steps=2, cfg_scale=3.0)
        generate(tiny, "pad", duration=seconds, seed=2, steps=2, sampler="pingpong")
        generate(tiny, "pad", duration=seconds, seed=3, steps=2, init_audio=(wave[:1], rate), init_noise_level=0.6)
        generate(tiny, "pad", duration=seconds, seed=4, steps=2, inpaint_audio=(wave[:1], rate),
                 inpaint_regions=[(seconds / 4, seconds / 2)])
    assert not ops.found, dict(ops.found)


@pytest.mark.parametrize("adapter_type", ["dora-rows", "bora", "lora-xs"])
def test_a_training_run_with_base_and_arc_demos_makes_no_float64_tensor(tmp_path, tiny, dataset, fixtures_dir,
                                                                         adapter_type):
    config = RunConfig.from_dict(dict(
        dataset=str(dataset), model=str(fixtures_dir / "tiny-small"), adapter_type=adapter_type, rank=4, steps=2,
        batch_size=2, crop_seconds=0.017, checkpoint_every=2, demo_every=2, seed=7, lr=1e-3,
        demos=[{"prompt": "bell", "steps": 2}, {"prompt": "drone", "arc": True, "steps": 2}]))
    trainer = Trainer(config, tmp_path, "run", EventLog(tmp_path / "events.jsonl", "run"),
                      model_provider=lambda *spec: tiny)
    with Float64Ops() as ops:
        trainer.setup()
        assert trainer.train(RunControl()) == "done"
    assert not ops.found, dict(ops.found)
    assert len(list(tmp_path.rglob("*.flac"))) >= 4  # the demos ran (base and ARC, steps 0 and 2)
