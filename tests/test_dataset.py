"""Encoding folders into datasets: every format + every bad-file kind, exact names, incremental re-runs,
interruption + resume, include/exclude, chunked long files, official/underfit import, 2-process sharding. The
stand-in encoder keeps most tests fast; the tiny fixture model (ratio 32, latent_dim 16) runs the acceptance paths."""

import functools
import json
import math
import os
import unicodedata

import mutagen
import numpy as np
import pytest
from sa3_lora_studio.encoding import audio_io
from sa3_lora_studio.encoding.dataset import MANIFEST, DatasetError, import_dataset, load_dataset
from sa3_lora_studio.encoding.encode import encode_folder, encode_waveform, load_encoder
from sa3_lora_studio.encoding.toy import ToyEncoder, tone, write_audio_file

FORMATS = ["wav16", "wav24", "wav32", "wavf", "flac", "aiff", "mp3", "ogg", "opus", "m4a"]
ODD_NAMES = ["with space", "quote's \"double\"", "brackets [1] (2) {3}", "100% $HOME", "日本語の歌", "Ελληνικά",
             "émigré"]


def _write(folder, name, fmt="flac", seconds=0.2, freq=440.0, rate=44100):
    folder.mkdir(parents=True, exist_ok=True)
    rate = 48000 if fmt == "opus" else rate
    return write_audio_file(folder / name, tone(seconds, rate, freq=freq), rate, fmt)


def _tiny_model_path(fixtures_dir):
    path = fixtures_dir / "tiny-small"
    try:
        load_encoder(path)
    except Exception as e:  # the engine may not be complete in this checkout
        pytest.skip(f"tiny fixture model does not load: {e}")
    return path


@pytest.fixture(scope="module")
def tiny_model(fixtures_dir):
    return load_encoder(_tiny_model_path(fixtures_dir))


def _manifest(out):
    return json.loads((out / MANIFEST).read_text())


def _status(out):
    return {f["relpath"]: (f["status"], f.get("reason")) for f in _manifest(out)["files"]}


def test_every_format_is_encoded_and_every_bad_file_is_skipped_with_a_reason(tmp_path, monkeypatch):
    src, out = tmp_path / "music", tmp_path / "ds"
    for fmt in FORMATS:
        _write(src / "formats", f"{fmt}-song", fmt, seconds=0.3)
    bad = src / "bad"
    bad.mkdir()
    (bad / "zero.wav").write_bytes(b"")
    (bad / "notes.mp3").write_text("not audio at all\n" * 10)
    flac = _write(bad, "header-only", "flac")
    flac.write_bytes(flac.read_bytes()[:60])
    x = tone(0.2, 44100)
    x[1, 7] = np.nan
    write_audio_file(bad / "nan", x, 44100, "wavf")
    write_audio_file(bad / "tiny", tone(10 / 44100, 44100), 44100, "wav16")  # 10 samples < one latent frame
    locked = _write(bad, "locked", "wav16")
    os.chmod(locked, 0)
    if os.geteuid() == 0:  # root reads anything: make open() refuse as it would for a normal user
        real_open = open
        monkeypatch.setattr(audio_io, "open", lambda p, *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied"))
                            if os.fspath(p) == os.fspath(locked) else real_open(p, *a, **k), raising=False)
    os.symlink("loop.flac", bad / "loop.flac")
    os.symlink("..", bad / "up")  # a folder loop
    tagged = mutagen.File(src / "formats" / "flac-song.flac")
    tagged["genre"], tagged["title"] = "dub", "From Tags"
    tagged.save()
    (src / "formats" / "json").mkdir()
    (src / "formats" / "json" / "flac-song.json").write_text(json.dumps({"title": "From JSON", "mood": "dark"}))
    enc = ToyEncoder()
    report = encode_folder(src, out, enc)
    os.chmod(locked, 0o644)

    status = _status(out)
    for fmt in FORMATS:
        assert status[f"formats/{fmt}-song" + (".wav" if fmt.startswith("wav") else f".{fmt}")][0] == "encoded"
    reasons = {rel: reason for rel, (st, reason) in status.items() if st == "skipped"}
    assert reasons["bad/zero.wav"] == "zero bytes"
    assert "not audio" in reasons["bad/notes.mp3"]
    assert "not audio" in reasons["bad/header-only.flac"]
    assert reasons["bad/nan.wav"] == "NaN/inf samples"
    assert reasons["bad/tiny.wav"] == "too short"
    assert reasons["bad/locked.wav"].startswith("unreadable")
    assert reasons["bad/loop.flac"] == "symlink loop"
    assert "symlink loop" in reasons["bad/up"]
    assert sorted(report.skipped) == sorted(reasons.items())
    m = _manifest(out)
    assert m["complete"] and m["totals"]["encoded"] == len(FORMATS) and m["totals"]["skipped"] == len(reasons)
    assert m["latent_dim"] == enc.latent_dim and m["latent_rate"] == 44100 / enc.downsampling_ratio

    ds = load_dataset(out)
    assert len(ds) == len(FORMATS)
    for i, e in enumerate(ds.entries):
        md, z = ds.metadata(i), ds.latents(i)
        n44 = md["timestamps"][1]
        assert z.shape == (enc.latent_dim, math.ceil(n44 / enc.downsampling_ratio)) and z.dtype == np.float32
        assert md["padding_mask"] == [1] * z.shape[1] and md["seconds_start"] == 0
        assert md["seconds_total"] == math.ceil(n44 / 44100) and md["sample_rate"] == 44100
        assert abs(md["seconds_decoded"] - 0.3) < 0.1 and md["relpath"] == e["relpath"]
    assert ds.silence().shape[0] == enc.latent_dim and np.load(out / "silence.npy").ndim == 3
    md = json.loads((out / "formats" / "flac-song.flac.json").read_text())
    assert (md["title"], md["mood"], md["genre"], md["folder"]) == ("From JSON", "dark", "dub", "formats")
    assert set(md["metadata_sources"]) == {"json", "tags", "path"}


def test_names_round_trip_exactly_and_same_stems_stay_distinct(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    for i, name in enumerate(ODD_NAMES):
        _write(src / name, name, "flac", freq=300 + 50 * i)
    nfd = unicodedata.normalize("NFD", "Café")
    _write(src, nfd, "wav16")
    _write(src, "same", "wav16", freq=500)
    _write(src, "same", "flac", freq=700)
    (src / "same.txt").write_text("shared caption")
    encode_folder(src, out, ToyEncoder())
    rels = {e["relpath"] for e in load_dataset(out).entries}
    expected = {f"{n}/{n}.flac" for n in ODD_NAMES} | {"Café.wav", "same.wav", "same.flac"}
    assert rels == expected
    for rel in expected:
        assert (out / f"{rel}.npy").is_file() and json.loads((out / f"{rel}.json").read_text())["relpath"] == rel
    assert not np.array_equal(np.load(out / "same.wav.npy"), np.load(out / "same.flac.npy"))
    assert json.loads((out / "same.flac.json").read_text())["prompt"] == "shared caption"


def test_rerun_reencodes_only_changed_and_new_files_and_removes_deleted_ones(tmp_path, tiny_model):
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(4):
        _write(src, f"s{i}", "flac", freq=200 + 100 * i)
    first = encode_folder(src, out, tiny_model)
    assert sorted(first.encoded) == [f"s{i}.flac" for i in range(4)]
    before = {i: np.load(out / f"s{i}.flac.npy") for i in range(4)}

    again = encode_folder(src, out, tiny_model)
    assert again.encoded == [] and sorted(again.reused) == sorted(first.encoded)

    _write(src, "s1", "flac", freq=999)  # changed content
    (src / "s2.flac").unlink()  # deleted
    _write(src, "s4", "flac")  # new
    os.utime(src / "s3.flac")  # touched but unchanged: the hash decides
    third = encode_folder(src, out, tiny_model)
    assert sorted(third.encoded) == ["s1.flac", "s4.flac"]
    assert third.removed == ["s2.flac"] and not (out / "s2.flac.npy").exists()
    assert sorted(third.reused) == ["s0.flac", "s3.flac"]
    assert not np.array_equal(np.load(out / "s1.flac.npy"), before[1])
    np.testing.assert_array_equal(np.load(out / "s0.flac.npy"), before[0])
    assert {e["relpath"] for e in load_dataset(out).entries} == {"s0.flac", "s1.flac", "s3.flac", "s4.flac"}


def test_a_byte_identical_copy_is_named_in_the_report_on_every_run_and_in_inspect(tmp_path, tiny_model, capsys):
    import shutil

    src, out = tmp_path / "src", tmp_path / "out"
    _write(src, "bass", "flac", freq=110)
    _write(src, "pad", "flac", freq=300)
    (src / "more").mkdir()
    shutil.copy(src / "bass.flac", src / "more" / "bass2.flac")
    for run in (encode_folder(src, out, tiny_model), encode_folder(src, out, tiny_model)):  # encoded, then reused
        assert [rel for rel, text in run.warnings if "the same file as" in text] == ["more/bass2.flac"]
        assert ("  warning more/bass2.flac: the same file as bass.flac (byte for byte): both train, so that sound "
                "counts twice; exclude one unless that is meant") in run.summary()
        assert "1 with warnings" in run.summary() and _manifest(out)["totals"]["with_warnings"] == 1  # one count
    # `sa3-lora dataset inspect` says it too, from the manifest, after the encode's report is gone
    from sa3_lora_studio.cli import main

    assert main(["dataset", "inspect", str(out)]) == 0
    assert "  warning more/bass2.flac: the same file as bass.flac (byte for byte)" in capsys.readouterr().out
    assert encode_folder(src, out, tiny_model, exclude=["more/*"], prune=True).warnings == []
    assert _manifest(out)["dataset_warnings"] == [] and _manifest(out)["totals"]["with_warnings"] == 0


def test_a_different_encoder_or_dtype_reencodes_everything(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _write(src, "a")
    _write(src, "b")
    encode_folder(src, out, ToyEncoder(seed=0))
    assert len(encode_folder(src, out, ToyEncoder(seed=1)).encoded) == 2
    r = encode_folder(src, out, ToyEncoder(seed=1), dtype="float16")
    assert len(r.encoded) == 2 and np.load(out / "a.flac.npy").dtype == np.float16
    assert len(encode_folder(src, out, ToyEncoder(seed=1), dtype="float16", force=True).encoded) == 2


def test_a_re_encode_keeps_the_dataset_usable_while_it_works_and_after_a_cancel(tmp_path, tiny_model):
    """force or another storage dtype re-encodes every file; until a file's new latents are written its old ones
    (same audio, same encoder) are what the manifest lists, so a run started meanwhile or after a cancel trains."""
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(3):
        _write(src, f"s{i}", "wav16", freq=200 + 80 * i)
    encode_folder(src, out, tiny_model)
    before = {e["relpath"]: np.load(out / e["latents"]) for e in load_dataset(out).entries}
    seen = []

    def check_then_cancel(ev):  # the dataset as a run starting now would open it
        seen.append(len(load_dataset(out).entries))
        if ev["i"] == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        encode_folder(src, out, tiny_model, dtype="float16", progress=check_then_cancel)
    assert seen == [3]
    ds = load_dataset(out)
    assert len(ds.entries) == 3 and not ds.complete
    for e in ds.entries:
        np.testing.assert_allclose(np.load(out / e["latents"]).astype(np.float32), before[e["relpath"]], atol=2e-3)
    again = encode_folder(src, out, tiny_model, dtype="float16")
    assert len(again.encoded) == 2 and len(again.reused) == 1 and _manifest(out)["complete"]
    assert {np.load(out / e["latents"]).dtype for e in load_dataset(out).entries} == {np.dtype("float16")}
    changed = _write(src, "s0", "wav16", freq=999)  # other audio: its old latents are no stand-in
    stopped = encode_folder(src, out, tiny_model, dtype="float16", force=True, should_stop=lambda: True)
    assert stopped.interrupted and stopped.encoded == []
    kept = [e["relpath"] for e in load_dataset(out).entries]
    assert changed.name == "s0.wav" and kept == ["s1.wav", "s2.wav"]  # s0 waits for its new encode


def test_interrupted_run_keeps_finished_files_and_a_rerun_completes_it(tmp_path, tiny_model):
    src, out, ref = tmp_path / "src", tmp_path / "out", tmp_path / "ref"
    for i in range(4):
        _write(src, f"s{i}", "wav16", freq=200 + 80 * i)
    done = []
    report = encode_folder(src, out, tiny_model, progress=done.append, should_stop=lambda: len(done) >= 1)
    assert report.interrupted and len(report.encoded) == 1
    m = _manifest(out)
    assert not m["complete"] and m["totals"]["pending"] == 3
    assert not load_dataset(out).complete

    # A hard stop (Ctrl-C) in the middle of the resumed run: finished work stays.
    def interrupt(ev):
        if ev["i"] == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        encode_folder(src, out, tiny_model, progress=interrupt)
    assert not _manifest(out)["complete"]

    resumed = encode_folder(src, out, tiny_model)
    assert len(resumed.encoded) == 2 and len(resumed.reused) == 2
    assert _manifest(out)["complete"]
    encode_folder(src, ref, tiny_model)
    for i in range(4):
        np.testing.assert_array_equal(np.load(out / f"s{i}.wav.npy"), np.load(ref / f"s{i}.wav.npy"))


def _seconds_of_chunks(encoder, chunks: int) -> float:
    """A length that spans `chunks` or more of the encoder's own 128-latent chunks (96 new latents each after the
    first), whatever its downsampling ratio."""
    return (128 + 96 * (chunks - 1) + 8) * encoder.downsampling_ratio / 44100


def _latents_of(encoder, path) -> int:
    return math.ceil(audio_io.load_audio(path)[0].shape[-1] / encoder.downsampling_ratio)


def _counting_chunks(monkeypatch) -> list:
    """The chunks the SAME encoder computes from now on (one entry each)."""
    from sa3_lora_studio.sa3.autoencoder import SAMEAutoencoder

    computed, real = [], SAMEAutoencoder.encode_unchunked
    monkeypatch.setattr(SAMEAutoencoder, "encode_unchunked", lambda self, x: computed.append(1) or real(self, x))
    return computed


def test_a_long_file_reports_its_chunks_and_a_stop_between_them_resumes_from_the_last_chunk(tmp_path, tiny_model,
                                                                                               monkeypatch):
    """An hour of audio is some 400 of a real pack's encoder chunks: the progress moves within the file, a stop (or a
    progress bar raising ComfyUI's cancel) acts before the next chunk without marking the file bad, and the next run
    computes only the chunks not done yet, to the same latents."""
    from sa3_lora_studio.encoding.partial import PARTIAL_DIR
    from sa3_lora_studio.sa3.autoencoder import chunk_layout

    src, out, ref = tmp_path / "src", tmp_path / "out", tmp_path / "ref"
    _write(src, "a_short", "wav16", seconds=_seconds_of_chunks(tiny_model, 1) / 2)  # inside one chunk
    long = _write(src, "b_long", "wav16", seconds=_seconds_of_chunks(tiny_model, 6), freq=300.0)
    chunks = len(chunk_layout(_latents_of(tiny_model, long), 128, 32))
    assert chunks >= 6
    events = []
    report = encode_folder(src, out, tiny_model, file_progress=events.append,
                           should_stop=lambda: len(events) >= 2)
    assert report.interrupted and report.encoded == ["a_short.wav"] and report.skipped == []
    assert [(e["relpath"], e["i"], e["n"], e["done"], e["total"], e.get("resumed")) for e in events] == [
        ("b_long.wav", 2, 2, 1, chunks, None), ("b_long.wav", 2, 2, 2, chunks, None)]
    assert _status(out) == {"a_short.wav": ("encoded", None), "b_long.wav": ("pending", None)}
    assert not (out / "b_long.wav.npy").exists()

    assert (out / PARTIAL_DIR).is_dir()

    class Cancelled(Exception):
        pass

    def cancel_on_the_fourth_chunk(event):
        if event["done"] == 4:
            raise Cancelled
    computed = _counting_chunks(monkeypatch)
    with pytest.raises(Cancelled):
        encode_folder(src, out, tiny_model, file_progress=cancel_on_the_fourth_chunk)
    assert len(computed) == 2  # chunks 3 and 4: 1 and 2 were kept by the stop
    assert _status(out)["b_long.wav"] == ("pending", None) and not _manifest(out)["complete"]

    events.clear()
    computed.clear()
    resumed = encode_folder(src, out, tiny_model, file_progress=events.append)
    assert resumed.encoded == ["b_long.wav"] and resumed.reused == ["a_short.wav"] and _manifest(out)["complete"]
    assert [e["done"] for e in events] == list(range(1, chunks + 1)) and len(computed) == chunks - 4
    assert {e.get("resumed") for e in events} == {4}  # a bar can say why its first 4 chunks went by at once
    assert not (out / PARTIAL_DIR).exists()  # the file is done: its chunks go
    encode_folder(src, ref, tiny_model)
    np.testing.assert_array_equal(np.load(out / "b_long.wav.npy"), np.load(ref / "b_long.wav.npy"))

    # Chunks kept for a file that then changed are not used: its content hash is in their key
    encode_folder(src, out, tiny_model, force=True, should_stop=lambda: len(events) >= chunks + 2,
                  file_progress=events.append)
    _write(src, "b_long", "wav16", seconds=_seconds_of_chunks(tiny_model, 6), freq=500.0)
    computed.clear()
    encode_folder(src, out, tiny_model, force=True)
    assert len(computed) == chunks + 2  # the silence, the short file, every chunk of the changed one
    assert not (out / PARTIAL_DIR).exists()  # the stale ones went with the complete run
    encode_folder(src, ref, tiny_model, force=True)
    np.testing.assert_array_equal(np.load(out / "b_long.wav.npy"), np.load(ref / "b_long.wav.npy"))


def test_a_hard_kill_in_a_long_file_loses_at_most_the_chunks_since_the_last_save(tmp_path, fixtures_dir, tiny_model,
                                                                                    monkeypatch):
    """SIGKILL leaves no chance to flush: what the timed saves wrote is what the next run reuses."""
    import subprocess
    import sys
    import textwrap

    from sa3_lora_studio.sa3.autoencoder import chunk_layout

    src, out = tmp_path / "src", tmp_path / "out"
    long = _write(src, "long", "wav16", seconds=_seconds_of_chunks(tiny_model, 5), freq=300.0)
    chunks = len(chunk_layout(_latents_of(tiny_model, long), 128, 32))
    script = textwrap.dedent(f"""
        import os, signal
        from sa3_lora_studio.encoding import encode, partial
        partial.SAVE_EVERY_SECONDS = 0  # a save after every chunk, as a slow CPU encode gets them
        def killed_after_the_third(event):
            if event["done"] == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        encode.encode_folder({str(src)!r}, {str(out)!r}, encode.load_encoder({str(fixtures_dir / "tiny-small")!r}),
                              file_progress=killed_after_the_third)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr
    computed = _counting_chunks(monkeypatch)
    report = encode_folder(src, out, tiny_model)
    assert report.encoded == ["long.wav"] and len(computed) == chunks - 3


def test_include_and_exclude_select_files_and_unticked_outputs_are_removed_only_when_asked(tmp_path, tiny_model):
    src, out = tmp_path / "src", tmp_path / "out"
    _write(src / "drums", "kick")
    _write(src / "drums", "snare [take 2]")
    _write(src / "keys", "rhodes")
    _write(src / "keys", "organ", "wav16")
    r = encode_folder(src, out, tiny_model, include=["drums/*", "*.wav"])
    assert sorted(r.encoded) == ["drums/kick.flac", "drums/snare [take 2].flac", "keys/organ.wav"]
    assert r.excluded == ["keys/rhodes.flac"]
    before = sorted(p.name for p in out.rglob("*.npy"))
    with pytest.raises(DatasetError, match=r"include/exclude leave out.*remove 2 of them \(drums/snare \[take 2\]"
                                           r"\.flac, keys/organ\.wav\)\. Nothing was changed.*--prune"):
        encode_folder(src, out, tiny_model, exclude=["drums/snare [take 2].flac", "organ.wav"])
    assert sorted(p.name for p in out.rglob("*.npy")) == before  # latents can be hours of work: kept
    (src / "drums" / "kick.flac").unlink()  # a file deleted from the source: its outputs follow without asking
    r = encode_folder(src, out, tiny_model, include=["drums/*", "*.wav"])
    assert r.removed == ["drums/kick.flac"] and not r.encoded
    _write(src / "drums", "kick")
    r = encode_folder(src, out, tiny_model, exclude=["drums/snare [take 2].flac", "organ.wav"], prune=True)
    assert sorted(r.encoded) == ["drums/kick.flac", "keys/rhodes.flac"] and not r.reused
    assert sorted(r.removed) == ["drums/snare [take 2].flac", "keys/organ.wav"]
    assert not (out / "drums" / "snare [take 2].flac.npy").exists()


def test_long_files_are_encoded_at_their_true_length_whole_or_in_outer_chunks(tmp_path, tiny_model):
    import torch

    enc = ToyEncoder()
    n = 700 * enc.downsampling_ratio + 5  # not a whole number of frames
    audio = np.random.default_rng(0).uniform(-0.5, 0.5, (2, n)).astype(np.float32)
    whole = encode_waveform(enc, audio)
    assert whole.shape == (enc.latent_dim, 701)
    np.testing.assert_array_equal(encode_waveform(enc, audio, chunk_latents=64), whole)  # seams are exact
    kept = {}
    encode_waveform(enc, audio, chunk_latents=64, on_chunk=lambda done, total, k: kept.update({done - 1: k}))
    assert sorted(kept) == list(range(11)) and sum(k.shape[-1] for k in kept.values()) == 701
    del kept[4]
    calls = enc.calls
    resumed = encode_waveform(enc, audio, chunk_latents=64, finished=kept)  # an outer chunk stopped at is redone
    assert enc.calls == calls + 1 and np.array_equal(resumed, whole)

    # The SA3 model chunks internally (official 128-latent stitching): the dataset holds exactly its encoding of
    # the whole file, far longer than one chunk, not a truncated or padded one.
    src, out = tmp_path / "src", tmp_path / "out"
    path = _write(src, "long", "flac", seconds=0.5)
    encode_folder(src, out, tiny_model)
    audio44, _ = audio_io.load_audio(path)
    r = tiny_model.downsampling_ratio
    n_latents = math.ceil(audio44.shape[1] / r)  # the last partial frame is kept (zero tail), never dropped
    padded = np.pad(audio44, ((0, 0), (0, n_latents * r - audio44.shape[1])))
    expected = tiny_model.encode_audio(torch.from_numpy(padded)[None], 44100)[0].numpy()
    stored = np.load(out / "long.flac.npy")
    assert stored.shape[1] == n_latents > 128
    np.testing.assert_allclose(stored, expected, atol=1e-6)


def _official_dataset(folder, latent_dim=16, n=3):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        t = 20 + 5 * i
        np.save(folder / f"{i:06d}{0:04d}.npy", rng.standard_normal((latent_dim, t)).astype(np.float32))
        (folder / f"{i:06d}{0:04d}.json").write_text(json.dumps({
            "prompt": f"caption {i}", "seconds_total": 2 + i, "seconds_start": 0, "padding_mask": [1] * t,
            "path": f"/data/clip{i}.wav", "relpath": f"clip{i}.wav", "timestamps": [0, t * 32],
            "sample_rate": 44100, "load_time": 0.01}))
    np.save(folder / "silence.npy", np.zeros((1, latent_dim, 50), np.float32))


def test_official_pre_encoded_dataset_imports_without_reencoding(tmp_path):
    src = tmp_path / "official"
    _official_dataset(src)
    ds = load_dataset(src)  # readable as-is, nothing written
    assert len(ds) == 3 and ds.latent_dim == 16 and not (src / MANIFEST).exists()
    imported = import_dataset(src)
    assert (src / MANIFEST).exists() and len(imported) == 3
    assert imported.metadata(0)["prompt"] == "caption 0" and imported.latents(2).shape == (16, 30)
    assert imported.silence().shape == (16, 50) and imported.manifest["origin"] == "official-pre-encode"
    copy = import_dataset(src, tmp_path / "copy")
    np.testing.assert_array_equal(copy.latents(1), imported.latents(1))


def test_underfit_dataset_imports_with_its_padded_masks(tmp_path):
    root = tmp_path / "underfit-ds"
    lat = root / "latents" / "sa3-medium" / "album"
    lat.mkdir(parents=True)
    (root / "latents" / "sa3-medium" / "details.json").write_text(json.dumps(
        {"model": "sa3-medium", "sample_rate": 44100, "downsampling_ratio": 4096, "latent_dim": 256, "scale": 1.0}))
    mask = [1] * 12 + [0] * 28
    np.save(lat / "song.wav.npy", np.zeros((256, 40), np.float32))
    (lat / "song.wav.json").write_text(json.dumps({"path": "/x/album/song.wav", "relpath": "album/song.wav.npy",
                                                   "src_relpath": "album/song.wav", "seconds_total": 4.459,
                                                   "seconds_start": 0, "padding_mask": mask, "genre": "jazz"}))
    (lat / "broken.wav.npy").write_bytes(b"junk")
    (lat / "broken.wav.json").write_text("{}")
    ds = import_dataset(root)
    assert len(ds) == 1 and ds.entries[0]["n_latents"] == 12 and ds.downsampling_ratio == 4096
    assert ds.manifest["origin"] == "underfit" and ds.skipped[0]["relpath"] == "album/broken.wav"
    assert ds.metadata(0)["genre"] == "jazz"


def test_two_processes_write_the_same_dataset_as_one(tmp_path, fixtures_dir):
    model_path = _tiny_model_path(fixtures_dir)
    src = tmp_path / "src"
    for i in range(4):
        _write(src / f"d{i % 2}", f"s{i}", "flac", freq=150 + 90 * i)
    (src / "d0" / "bad.wav").write_bytes(b"")
    _write(src / "d1", "曲" * 80, "flac")  # too long for NAME_MAX with ".npy" and a temp suffix: shortened
    one, two = tmp_path / "one", tmp_path / "two"
    factory = functools.partial(load_encoder, str(model_path))
    encode_folder(src, one, factory("cpu"))
    r = encode_folder(src, two, encoder_factory=factory, devices=["cpu", "cpu"])
    assert len(r.encoded) == 5 and r.skipped == [("d0/bad.wav", "zero bytes")]
    for npy in sorted(one.rglob("*.npy")):
        np.testing.assert_array_equal(np.load(npy), np.load(two / npy.relative_to(one)))
    for js in sorted(one.rglob("*.json")):
        a, b = json.loads(js.read_text()), json.loads((two / js.relative_to(one)).read_text())
        if js.name == MANIFEST:
            for k in ("created", "updated"):
                a.pop(k), b.pop(k)
        assert a == b

    # The workers continue a long file from the chunks a stopped encode kept, too (marked ones here, to see them)
    from sa3_lora_studio.encoding.dataset import encoder_identity, file_hash
    from sa3_lora_studio.encoding.encode import _chunks_identity
    from sa3_lora_studio.encoding.partial import PARTIAL_DIR, PartialEncode
    from sa3_lora_studio.sa3.autoencoder import chunk_layout

    encoder = factory("cpu")
    _write(src / "d0", "s0", "flac", seconds=_seconds_of_chunks(encoder, 4), freq=150)
    rel, h = "d0/s0.flac", file_hash(src / "d0" / "s0.flac")
    store = PartialEncode(two, rel, _chunks_identity(encoder_identity(encoder), h, None))
    start, (left, right), out_start = chunk_layout(_latents_of(encoder, src / "d0" / "s0.flac"), 128, 32)[1]
    marked = np.full((encoder.latent_dim, right - left), 7.0, np.float32)
    store.add(1, marked)
    store.flush()
    r = encode_folder(src, two, encoder_factory=factory, devices=["cpu", "cpu"])
    assert r.encoded == [rel] and not (two / PARTIAL_DIR).exists()
    np.testing.assert_array_equal(np.load(two / f"{rel}.npy")[:, out_start + left:out_start + right], marked)


def test_cli_encode_and_inspect(tmp_path, fixtures_dir, capsys):
    model_path = _tiny_model_path(fixtures_dir)
    from sa3_lora_studio.cli import main

    src, out = tmp_path / "src", tmp_path / "out"
    _write(src, "a b", "flac")
    (src / "a b.txt").write_text("calm piano")
    (src / "broken.mp3").write_text("nope")
    assert main(["encode", str(src), "--model", str(model_path), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "1 encoded" in printed and "broken.mp3" in printed
    assert main(["dataset", "inspect", str(out), "--json", "--prompts", "2"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["complete"] and info["latent_dim"] == 16 and info["prompts"][0]["prompt"] == "calm piano"
    assert info["skipped"][0]["relpath"] == "broken.mp3"


def test_training_items_crop_and_pad_with_silence_like_the_official_loader(tmp_path):
    src = tmp_path / "official"
    _official_dataset(src)
    silence = np.arange(16 * 7, dtype=np.float32).reshape(1, 16, 7)
    np.save(src / "silence.npy", silence)
    ds = load_dataset(src)
    z, mask, meta = ds.item(0, latent_crop_length=32)  # 20 stored frames -> 12 frames of tiled silence
    assert z.shape == (16, 32) and mask.tolist() == [1] * 20 + [0] * 12
    np.testing.assert_array_equal(z[:, :20], ds.latents(0))
    np.testing.assert_array_equal(z[:, 20:], np.tile(silence[0], (1, 2))[:, :12])
    z, mask, meta = ds.item(2, latent_crop_length=10)  # 30 frames -> first 10 without random_crop
    np.testing.assert_array_equal(z, ds.latents(2)[:, :10])
    assert meta["latent_crop_start"] == 0 and mask.tolist() == [1] * 10
    import random
    starts = {ds.item(2, 10, random_crop=True, rng=random.Random(s))[2]["latent_crop_start"] for s in range(200)}
    assert starts == set(range(0, 30 - 1 - 10 + 1))  # randint(0, last_valid - L), as the official loader draws
    z, mask, _ = ds.item(1)
    assert z.shape == (16, 25) and mask.sum() == 25


def test_cli_imports_and_inspects_an_official_dataset(tmp_path, capsys):
    from sa3_lora_studio.cli import main

    src = tmp_path / "official"
    _official_dataset(src)
    assert main(["dataset", "import", str(src)]) == 0
    assert "imported 3 files" in capsys.readouterr().out
    assert main(["dataset", "inspect", str(src), "--prompts", "3"]) == 0
    printed = capsys.readouterr().out
    assert "3 files" in printed and "caption 2" in printed


def test_a_folder_of_audio_given_as_a_dataset_says_to_encode_it_first(tmp_path):
    _write(tmp_path / "my takes", "kick")
    with pytest.raises(DatasetError, match=r"my takes: no \.npy \+ \.json latent pairs found \(nor a dataset\.json\)\. "
                                           r"It holds audio \(kick\.flac\): encode it into a dataset first \(SA3 Encode "
                                           r"Audio Folder, or `sa3-lora encode '.*my takes' --pack PACK --out DATASET`\)"):
        load_dataset(tmp_path / "my takes")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty: no \.npy \+ \.json latent pairs found \(nor a dataset\.json\)$"):
        load_dataset(tmp_path / "empty")


def test_kept_chunks_are_saved_once_and_a_damaged_archive_is_passed_over(tmp_path, monkeypatch):
    from sa3_lora_studio.encoding import partial

    monkeypatch.setattr(partial, "SAVE_EVERY_SECONDS", 0)
    identity = {"hash": "abc", "encoder": "fp", "decode_version": 3, "chunk_latents": None, "overlap_latents": 16}
    store = partial.PartialEncode(tmp_path, "set/live.flac", identity)
    chunks = {i: np.full((4, 3), i, np.float32) for i in range(3)}
    for i, kept in chunks.items():
        store.add(i, kept)
    again = partial.PartialEncode(tmp_path, "set/live.flac", identity)
    found = again.finished()
    assert sorted(found) == [0, 1, 2] and all(np.array_equal(found[i], chunks[i]) for i in found)
    for i, kept in found.items():  # the engine reports reused chunks too: they are not written again
        again.add(i, kept)
    assert len(list(again.folder.glob("*.npz"))) == 3
    other = partial.PartialEncode(tmp_path, "set/live.flac", {**identity, "hash": "changed"})
    assert other.finished() == {} and other.folder != again.folder
    (again.folder / "chunks-000001-000001.npz").write_bytes(b"PK\x03\x04 torn")  # a power cut after the rename
    assert sorted(partial.PartialEncode(tmp_path, "set/live.flac", identity).finished()) == [0, 2]
    again.remove()
    assert not (tmp_path / partial.PARTIAL_DIR).exists()
