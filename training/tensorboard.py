"""TensorBoard event files for training runs, written without TensorFlow or the tensorboard package.

`tensorboard --logdir <runs folder>` then shows every run side by side: loss, learning rate, gradient norm, adapter
size, the loss per noise-level bin, validation loss (overall and per noise level) and the demos as playable audio.
Each run writes into `<run>/tensorboard/` as its events happen (`TensorBoardSink`, a listener of the run's event
log); `sa3-lora runs tensorboard` rebuilds that folder from `events.jsonl` for runs trained without it.

Format (TensorFlow's, as TensorBoard reads it): a file of TFRecords, each `uint64 length, uint32 masked CRC-32C of
the length, the bytes, uint32 masked CRC-32C of the bytes`, holding serialized `tensorflow.Event` protobufs. The
first says `file_version: "brain.Event:2"`; scalars are `Summary.Value.simple_value`, audio is
`Summary.Value.audio` (a WAV). A resumed run first writes a `SessionLog START` at its resume step: TensorBoard then
drops what the earlier file logged after that step (the steps a crash or stop replays).
"""

from __future__ import annotations

import io
import math
import os
import socket
import struct
import threading
import time
from pathlib import Path

from .crc32c import crc32c
from .events import bin_edges, bin_means

TB_FOLDER = "tensorboard"

# ---------------------------------------------------------------------------------------------------- TFRecord

def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord around data."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


# ---------------------------------------------------------------------------------------------------- protobuf

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 fields: negatives as two's complement
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field_varint(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _field_bytes(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _field_double(number: int, value: float) -> bytes:
    return _varint(number << 3 | 1) + struct.pack("<d", value)


def _field_float(number: int, value: float) -> bytes:
    return _varint(number << 3 | 5) + struct.pack("<f", value)


def _event(step: int, body: bytes, wall_time: float | None = None) -> bytes:
    """A tensorflow.Event: wall_time = 1 (double), step = 2 (int64), then one of its `what` fields (body)."""
    return _field_double(1, time.time() if wall_time is None else wall_time) + _field_varint(2, step) + body


def file_version_event(wall_time: float | None = None) -> bytes:
    return _event(0, _field_bytes(3, b"brain.Event:2"), wall_time)


def session_start_event(step: int, wall_time: float | None = None) -> bytes:
    """Event.session_log = 7 with SessionLog.status = START (1): later-step events of earlier files are dropped."""
    return _event(step, _field_bytes(7, _field_varint(1, 1)), wall_time)


def scalars_event(step: int, values: dict[str, float], wall_time: float | None = None) -> bytes:
    """Event.summary = 5 holding Summary.value = 1 entries of tag = 1 and simple_value = 2."""
    summary = b"".join(_field_bytes(1, _field_bytes(1, tag.encode()) + _field_float(2, value))
                       for tag, value in values.items())
    return _event(step, _field_bytes(5, summary), wall_time)


def audio_event(step: int, tag: str, wav: bytes, sample_rate: int, channels: int, frames: int,
                wall_time: float | None = None) -> bytes:
    """Event.summary with Summary.Value.audio = 6: sample_rate = 1 (float), num_channels = 2, length_frames = 3,
    encoded_audio_string = 4, content_type = 5."""
    audio = (_field_float(1, float(sample_rate)) + _field_varint(2, channels) + _field_varint(3, frames)
             + _field_bytes(4, wav) + _field_bytes(5, b"audio/wav"))
    value = _field_bytes(1, tag.encode()) + _field_bytes(6, audio)
    return _event(step, _field_bytes(5, _field_bytes(1, value)), wall_time)


# ---------------------------------------------------------------------------------------------------- writing

class EventFileWriter:
    """Appends events to a new `events.out.tfevents.<time>.<host>.<pid>.sa3` file in folder (one per writer)."""

    def __init__(self, folder: Path, wall_time: float | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.time() if wall_time is None else wall_time
        # TensorBoard reads a folder's files in name order: whole seconds then a nanosecond clock keep a stop and
        # resume within one second in order
        name = f"events.out.tfevents.{int(stamp)}.{socket.gethostname()}.{time.time_ns():020d}.{os.getpid()}.sa3"
        self.path = folder / name
        self._lock = threading.Lock()
        self.write(file_version_event(wall_time))

    def write(self, event: bytes) -> None:
        with self._lock, open(self.path, "ab") as f:
            f.write(tfrecord(event))


def _wav_bytes(path: Path) -> tuple[bytes, int, int, int] | None:
    """(16-bit WAV bytes, rate, channels, frames) of a demo's audio file (any format we write), or None when it
    cannot be read (deleted meanwhile, a codec this machine lacks): that demo is left out of TensorBoard."""
    import soundfile as sf

    from ..encoding.audio_io import decode_audio

    try:
        decoded = decode_audio(path)
    except Exception:
        return None
    buffer = io.BytesIO()
    sf.write(buffer, decoded.samples.T, decoded.sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue(), int(decoded.sample_rate), int(decoded.samples.shape[0]), int(decoded.samples.shape[1])


def _finite(values: dict[str, float | None]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float) and math.isfinite(float(v))}


class TensorBoardSink:
    """A listener of a run's event log writing what TensorBoard shows into `<run>/tensorboard/`.

    bins: the number of noise-level bins of the loss-by-noise chart; per step, each bin's mean sample loss is logged
    as `loss_by_noise/<lo>-<hi>` (bins without a sample that step are left out).
    start_step: the first step this attempt logs when an earlier attempt of the run logged here (a SessionLog START
    there: TensorBoard drops that attempt's events from this step on); None: nothing to replace."""

    def __init__(self, run_folder: Path, bins: int = 5, start_step: int | None = None,
                 wall_time: float | None = None):
        self.run_folder = Path(run_folder)
        self.bins = bins
        self.writer = EventFileWriter(self.run_folder / TB_FOLDER, wall_time)
        if start_step is not None:
            self.writer.write(session_start_event(start_step, wall_time))

    def __call__(self, event: dict) -> None:
        kind, step, wall_time = event.get("type"), event.get("step"), event.get("time")
        if not isinstance(step, int):
            return
        if kind == "step":
            values = _finite({"loss": event.get("loss"), "learning_rate": event.get("lr"),
                              "grad_norm": event.get("grad_norm"), "adapter_size": event.get("delta_norm"),
                              "steps_per_second": event.get("steps_per_s")})
            values.update(self._loss_by_noise(event))
            if values:
                self.writer.write(scalars_event(step, values, wall_time))
        elif kind == "validation":
            values = _finite({"validation/loss": event.get("loss")})
            values.update(_finite({f"validation/noise_{float(t):.2f}": v for t, v in event.get("levels") or []}))
            if values:
                self.writer.write(scalars_event(step, values, wall_time))
        elif kind == "demo" and event.get("audio"):
            wav = _wav_bytes(self.run_folder / event["audio"])
            if wav is not None:
                settings = event.get("settings") or {}
                label = "arc" if settings.get("arc") else "base"
                tag = f"demo_{event.get('index', 0)}_{label}_cfg{settings.get('cfg', '')}"
                self.writer.write(audio_event(step, tag, *wav, wall_time=wall_time))

    def _loss_by_noise(self, event: dict) -> dict[str, float]:
        """Each bin's mean sample loss this step (`events.bin_means`, the loss-by-noise chart's bins)."""
        return {f"loss_by_noise/{lo:.2f}-{hi:.2f}": mean
                for (lo, hi), mean in zip(bin_edges(self.bins), bin_means(event, self.bins)) if mean is not None}


def attempt_start_step(run_folder: Path, step: int, resumed: bool) -> int | None:
    """`TensorBoardSink`'s start_step for an attempt of a run starting at `step`: a resume replays the steps after
    its checkpoint (step + 1 on); an attempt over events of an earlier one that never checkpointed (killed early)
    starts over at `step`; else None."""
    if resumed:
        return step + 1
    return step if any((Path(run_folder) / TB_FOLDER).glob("events.out.tfevents.*")) else None


def export_run(run_folder: Path, bins: int = 5) -> Path:
    """Rebuild `<run>/tensorboard/` from the run's `events.jsonl` (a run trained with tensorboard off, or whose folder
    was deleted), with the events' own times. Steps a resumed run logged again (after a crash, from its last
    checkpoint) replace the first ones, as in a live run. Returns the folder."""
    import shutil

    from .events import read_all_events

    run_folder = Path(run_folder)
    events = read_all_events(run_folder / "events.jsonl")
    shutil.rmtree(run_folder / TB_FOLDER, ignore_errors=True)
    first_time = next((e["time"] for e in events if isinstance(e.get("time"), int | float)), None)
    sink = TensorBoardSink(run_folder, bins, wall_time=first_time)
    highest = 0
    for event in events:
        step = event.get("step")
        if event.get("type") == "step" and isinstance(step, int):
            if step <= highest:  # a replayed step: a new session from here drops the old points
                sink.writer.write(session_start_event(step, event.get("time")))
            highest = step
        sink(event)
    return run_folder / TB_FOLDER


__all__ = ["EventFileWriter", "TB_FOLDER", "TensorBoardSink", "attempt_start_step", "audio_event", "crc32c", "export_run",
           "file_version_event", "scalars_event", "session_start_event", "tfrecord"]
