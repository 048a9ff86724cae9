"""Generation nodes: text-to-audio, audio-to-audio, inpainting/continuation, and the spectrogram image."""

from __future__ import annotations

import torch

from ..adapters import notices
from ..sa3.generate import (
    ADAPTER_MODES,
    check_regions_inside,
    continuation_region,
    max_output_seconds,
    output_seconds,
    parse_regions,
)
from .comfy_bridge import CATEGORY, progress_callback, say, with_notices
from .model_nodes import CUSTOM, DeviceOutOfMemory, has_text_encoder, no_text_encoder_advice, retry_after_freeing, using

SAMPLERS = ["auto", "euler", "pingpong", "dpmpp", "rk4"]  # rk4: four model calls per step


def audio_output(waveform: torch.Tensor, sample_rate: int) -> dict:
    """ComfyUI's AUDIO: {"waveform": [B, C, N] float CPU, "sample_rate": int}."""
    return {"waveform": waveform.detach().float().cpu().contiguous(), "sample_rate": int(sample_rate)}


def audio_input(audio: dict, name: str) -> tuple[torch.Tensor, int]:
    """AUDIO dict -> (waveform [B, C, N] float, rate), cloned out of inference mode."""
    if not isinstance(audio, dict) or "waveform" not in audio or "sample_rate" not in audio:
        raise ValueError(f"{name}: expected an AUDIO input ({{'waveform', 'sample_rate'}})")
    wav = audio["waveform"]
    if wav.dim() == 2:
        wav = wav[None]
    if wav.numel() == 0:
        raise ValueError(f"{name}: the audio input is empty")
    return wav.detach().clone().float(), int(audio["sample_rate"])


def _common_inputs():
    return {
        "model": ("SA3_MODEL", {"tooltip": "From SA3 Load Pack."}),
        "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "What to generate: genre, instruments, "
                              "mood, BPM, key… Use your LoRA's trigger word if it has one."}),
        "negative_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "What to avoid (only has an effect "
                                       "when CFG > 1, i.e. on base models)."}),
        "duration": ("FLOAT", {"default": 10.0, "min": 0.5, "max": 384.0, "step": 0.5, "tooltip": "Seconds of audio."}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "Same seed + settings = same audio."}),
        "steps": ("INT", {"default": 0, "min": 0, "max": 500, "tooltip": "0 = the model's default (ARC 8, base 50)."}),
        "cfg": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 25.0, "step": 0.1, "tooltip": "Guidance scale; 0 = the "
                          "model's default (ARC 1, base 7)."}),
        "sampler": (SAMPLERS, {"default": "auto", "tooltip": "auto: ping-pong for ARC, Euler for base."}),
        "batch_size": ("INT", {"default": 1, "min": 1, "max": 16, "tooltip": "Variations generated at once (one seed, different noise per item)."}),
    }


def _source_inputs(source_help: str) -> dict:
    """The inputs of the nodes that start from a clip: the common ones, the clip, and a duration that defaults to
    the clip's own length."""
    req = _common_inputs()
    req["duration"] = ("FLOAT", {"default": 0.0, "min": 0.0, "max": 384.0, "step": 0.5, "tooltip": "Seconds of "
                       "audio; 0 = the source's length (continuation needs the length to extend to)."})
    req["audio"] = ("AUDIO", {"tooltip": source_help})
    return req


def _optional_inputs():
    return {
        "lora_memory": (list(ADAPTER_MODES), {"default": "fast", "tooltip": "fast: each LoRA-adapted weight is formed "
                        "once (a copy of those weights while sampling). low: the LoRA path is computed beside the "
                        "model's weights at every step (no copy, a little slower) — for tight VRAM."}),
        "loras": ("SA3_LORA_STACK", {"tooltip": "From SA3 Load LoRA (chain several to stack them)."}),
    }


def _run(node: str, model, prompt, negative_prompt, duration, seed, steps, cfg, sampler, batch_size, loras,
         lora_memory="fast", **extra):
    """Generate for `node` (its name starts every error the engine raises, e.g. a region past a capped end)."""
    try:
        return _generate(model, prompt, negative_prompt, duration, seed, steps, cfg, sampler, batch_size, loras,
                         lora_memory, **extra)
    except ValueError as e:
        raise ValueError(f"{node}: {e}") from None


def _generate(model, prompt, negative_prompt, duration, seed, steps, cfg, sampler, batch_size, loras,
              lora_memory="fast", **extra):
    def generate(memory: str):
        return model.generate(
            prompt, negative_prompt=negative_prompt or None, duration=duration, seed=seed, steps=steps or None,
            cfg_scale=cfg or None, sampler=None if sampler == "auto" else sampler, batch_size=batch_size,
            loras=loras, callback=progress_callback(steps or model.default_steps), adapter_memory=memory, **extra)

    if not has_text_encoder(model):  # the conditioner's own message names Python calls, not the node's inputs
        raise ValueError(f"the model has {no_text_encoder_advice(model.pack or CUSTOM, model.variant or 'base')}")
    advice = (f"SA3 generation: out of memory on {model.device} ({duration:g} s, batch {batch_size}). Try a shorter "
              "duration, batch 1, or a model loaded in bf16")
    with using(model), notices.collected() as found:  # model held while ComfyUI frees memory for a retry
        try:
            waveform, rate = retry_after_freeing(lambda: generate(lora_memory), model.device, advice)
        except DeviceOutOfMemory:
            if not loras or lora_memory != "fast":
                raise
            # the merged LoRA weights are a copy of the adapted layers: the same adapters computed beside the shared
            # weights may fit
            say(f"out of memory on {model.device} with lora_memory 'fast'; generating with 'low'")
            waveform, rate = retry_after_freeing(lambda: generate("low"), model.device, advice)
    return with_notices((audio_output(waveform, rate),), found)


class SA3Generate:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": _common_inputs(), "optional": _optional_inputs()}

    RETURN_TYPES = ("AUDIO",)
    FUNCTION = "generate"
    CATEGORY = CATEGORY
    DESCRIPTION = "Text to audio with Stable Audio 3 (and any stacked LoRAs)."

    def generate(self, model, prompt, negative_prompt, duration, seed, steps, cfg, sampler, batch_size, loras=None,
                 lora_memory="fast"):
        return _run("SA3 Generate", model, prompt, negative_prompt, duration, seed, steps, cfg, sampler, batch_size,
                    loras, lora_memory)


class SA3AudioToAudio:
    @classmethod
    def INPUT_TYPES(cls):
        req = _source_inputs("Source audio (any sample rate and channel count; a batch of clips gives one output "
                             "per clip).")
        req["noise_level"] = ("FLOAT", {"default": 0.8, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip":
                              "How much to change: 1.0 ignores the source, lower keeps more of it."})
        return {"required": req, "optional": _optional_inputs()}

    RETURN_TYPES = ("AUDIO",)
    FUNCTION = "generate"
    CATEGORY = CATEGORY
    DESCRIPTION = "Audio to audio (style transfer / variation): the source is noised to `noise_level` and re-generated."

    def generate(self, model, prompt, negative_prompt, duration, seed, steps, cfg, sampler, batch_size, audio,
                 noise_level, loras=None, lora_memory="fast"):
        init = audio_input(audio, "SA3 Audio to Audio")
        duration = output_seconds(duration, init, max_seconds=max_output_seconds(model))
        return _run("SA3 Audio to Audio", model, prompt, negative_prompt, duration, seed, steps, cfg, sampler,
                    batch_size, loras, lora_memory, init_audio=init, init_noise_level=noise_level)


class SA3Inpaint:
    @classmethod
    def INPUT_TYPES(cls):
        req = _source_inputs("The source clip (a batch of clips gives one output per clip).")
        req["regions"] = ("STRING", {"default": "4.0-8.0", "tooltip": "Seconds to regenerate, e.g. '4.0-8.0, 16-20' "
                                     "or '1:04-1:08' (m:ss). Ignored when continuation is on."})
        req["continuation"] = ("BOOLEAN", {"default": False, "tooltip": "Continue the clip from its end up to "
                                           "`duration` seconds instead of regenerating regions."})
        req["paste_back"] = ("BOOLEAN", {"default": False, "tooltip": "Put the source's own audio back outside the "
                                         "regenerated regions (20 ms crossfades just inside their edges); off = the "
                                         "official behaviour, where the model redraws the whole clip."})
        return {"required": req, "optional": _optional_inputs()}

    RETURN_TYPES = ("AUDIO",)
    FUNCTION = "generate"
    CATEGORY = CATEGORY
    DESCRIPTION = "Inpainting (regenerate regions of a clip) and continuation (extend a clip), guided by the prompt."

    def generate(self, model, prompt, negative_prompt, duration, seed, steps, cfg, sampler, batch_size, audio, regions,
                 continuation, paste_back, loras=None, lora_memory="fast"):
        source = audio_input(audio, "SA3 Inpaint")
        from_source = not duration
        try:
            duration = output_seconds(duration, source, continuation, max_seconds=max_output_seconds(model))
            spans = [continuation_region(source, duration)] if continuation else parse_regions(regions)
            # against the length the model makes: a duration past its maximum is capped there
            longest = max_output_seconds(model)
            check_regions_inside(spans, min(duration, longest), from_source, capped=duration > longest)
        except ValueError as e:
            raise ValueError(f"SA3 Inpaint: {e}") from None
        if not spans:
            raise ValueError("SA3 Inpaint: give at least one region, e.g. '4.0-8.0'")
        return _run("SA3 Inpaint", model, prompt, negative_prompt, duration, seed, steps, cfg, sampler, batch_size,
                    loras, lora_memory, inpaint_audio=source, inpaint_regions=spans, paste_back=paste_back)


class SA3Spectrogram:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"audio": ("AUDIO", {"tooltip": "Any AUDIO (one image per batch item)."}),
                             "width": ("INT", {"default": 600, "min": 64, "max": 4096, "tooltip": "Image width in pixels."}),
                             "height": ("INT", {"default": 120, "min": 32, "max": 2048, "tooltip": "Image height in pixels (left channel on top, right below)."})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "draw"
    CATEGORY = CATEGORY
    DESCRIPTION = "Tinted stereo spectrogram (red = bass, green = mids, blue = highs; left channel on top, mirrored)."

    def draw(self, audio, width, height):
        from ..sa3.spectrogram import tinted_spectrogram

        wav, rate = audio_input(audio, "SA3 Spectrogram")
        images = [torch.from_numpy(tinted_spectrogram(w, rate, width, height).copy()).float() / 255 for w in wav]
        return (torch.stack(images),)  # IMAGE: [B, H, W, 3] in [0, 1]


NODE_CLASS_MAPPINGS = {"SA3Generate": SA3Generate, "SA3AudioToAudio": SA3AudioToAudio, "SA3Inpaint": SA3Inpaint,
                       "SA3Spectrogram": SA3Spectrogram}
NODE_DISPLAY_NAME_MAPPINGS = {"SA3Generate": "SA3 Generate", "SA3AudioToAudio": "SA3 Audio to Audio",
                              "SA3Inpaint": "SA3 Inpaint", "SA3Spectrogram": "SA3 Spectrogram"}
