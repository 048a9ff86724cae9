"""Audio decoding, caption/metadata lookup, prompt composition and pre-encoded datasets."""

from .audio_io import AUDIO_EXTENSIONS, AudioFileError, DecodedAudio, decode_audio, downmix, load_audio, resample
from .captions import lookup_metadata, read_tags
from .dataset import DatasetError, EncodedDataset, import_dataset, load_dataset
from .encode import EncodeReport, encode_folder, encode_waveform, load_encoder
from .prompts import PromptConfig, batch_prompts, compose, compose_prompt, preview_prompts, prompt_seed
from .scan import scan_folder

__all__ = [
    "AUDIO_EXTENSIONS", "AudioFileError", "DecodedAudio", "decode_audio", "downmix", "load_audio", "resample",
    "lookup_metadata", "read_tags", "DatasetError", "EncodedDataset", "EncodeReport", "encode_folder",
    "encode_waveform", "import_dataset", "load_dataset", "load_encoder", "scan_folder", "PromptConfig", "compose",
    "compose_prompt", "preview_prompts", "prompt_seed", "batch_prompts",
]
