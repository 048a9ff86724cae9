"""Encoding folders that fight back: names the output file system or UTF-8 cannot hold, sidecar folders we may not
enter, re-runs that must not wipe a dataset, edited captions and their warnings, encoder fields in prompts, twin
Unicode names, and what the CLI says about each. The stand-in ToyEncoder keeps every test fast."""

import errno
import json
import os
import unicodedata

import numpy as np
import pytest
from sa3_lora_studio.encoding import encode, scan
from sa3_lora_studio.encoding.captions import RESERVED_FIELDS, lookup_metadata
from sa3_lora_studio.encoding.dataset import MANIFEST, MAX_NAME_BYTES, DatasetError, fit_name, load_dataset, output_relpath
from sa3_lora_studio.encoding.encode import encode_folder
from sa3_lora_studio.encoding.prompts import PromptConfig, tag_parts
from sa3_lora_studio.encoding.toy import ToyEncoder, tone, write_audio_file

LONG = "曲" * 80  # 240 UTF-8 bytes: a legal name, but "<name>.wav.npy" and its temp file pass the 255-byte NAME_MAX


def _write(folder, name, fmt="wav16", seconds=0.2, freq=440.0):
    folder.mkdir(parents=True, exist_ok=True)
    return write_audio_file(folder / name, tone(seconds, 44100, freq=freq), 44100, fmt)


def _truncated(folder, name):
    """A WAV whose header claims 1 s and whose data holds 0.5 s."""
    path = _write(folder, name, seconds=1.0)
    data = path.read_bytes()
    path.write_bytes(data[:44 + (len(data) - 44) // 2])
    return path


def _manifest(out):
    return json.loads((out / MANIFEST).read_bytes().decode("utf-8"))  # strict UTF-8, as any reader would


def _records(out):
    return {f["relpath"]: f for f in _manifest(out)["files"]}


def _metadata(out, relpath):
    ds = load_dataset(out)
    return ds.metadata([e["relpath"] for e in ds.entries].index(relpath))


def _listing(out):
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))


def _strict_json(path):
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}")
    return json.loads(path.read_bytes().decode("utf-8"), parse_constant=refuse)


# ----------------------------------------------------------------------------------------------------------------
# names


def test_long_names_are_shortened_on_disk_and_mapped_in_the_manifest(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _write(src, "a")
    _write(src, LONG, freq=300)
    (src / f"{LONG}.txt").write_text("long caption")
    _write(src / ("夜" * 80), "b", freq=500)  # a folder name as long
    report = encode_folder(src, out, ToyEncoder())
    rels = ["a.wav", f"{'夜' * 80}/b.wav", f"{LONG}.wav"]
    assert sorted(report.encoded) == rels and _manifest(out)["complete"]
    for rel in rels:
        rec = _records(out)[rel]
        assert rec["latents"] == f"{output_relpath(rel)}.npy" and (out / rec["latents"]).is_file()
        assert all(len(part.encode()) <= MAX_NAME_BYTES + len(".json") for part in rec["metadata"].split("/"))
    md = _metadata(out, f"{LONG}.wav")
    assert md["relpath"] == f"{LONG}.wav" and md["prompt"] == "long caption" and md["file_stem"] == LONG
    again = encode_folder(src, out, ToyEncoder())
    assert again.encoded == [] and sorted(again.reused) == rels


def test_shortened_names_are_deterministic_distinct_and_keep_the_extension():
    a, b = fit_name("x" * 300 + ".wav"), fit_name("x" * 299 + "y.wav")
    assert a == fit_name("x" * 300 + ".wav") and a != b
    assert a.endswith(".wav") and len(a.encode()) <= MAX_NAME_BYTES and len(fit_name(LONG).encode()) <= MAX_NAME_BYTES
    assert fit_name("short.wav") == "short.wav"


def test_an_output_the_file_system_refuses_skips_that_file_and_the_run_goes_on(tmp_path, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    for name in ("a", "b", "c"):
        _write(src, name)
    real_save = encode.save_npy_atomic

    def refusing_save(path, array):
        if path.name == "b.wav.npy":
            raise OSError(errno.ENAMETOOLONG, "File name too long", str(path))
        real_save(path, array)
    monkeypatch.setattr(encode, "save_npy_atomic", refusing_save)
    report = encode_folder(src, out, ToyEncoder())
    assert sorted(report.encoded) == ["a.wav", "c.wav"]
    assert report.skipped == [("b.wav", "could not write its outputs")]
    assert "File name too long" in _records(out)["b.wav"]["detail"] and _manifest(out)["complete"]


def test_a_file_name_that_is_not_utf8_is_encoded_under_an_escaped_relpath(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    ok = _write(src, "ok")
    try:
        with open(os.path.join(os.fsencode(src), b"caf\xe9 latin1.wav"), "wb") as f:
            f.write(ok.read_bytes())
        with open(os.path.join(os.fsencode(src), b"caf\xe9 latin1.txt"), "wb") as f:
            f.write(b"latin-1 named")
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    report = encode_folder(src, out, ToyEncoder())
    rel = "caf\\xe9 latin1.wav"
    assert sorted(report.encoded) == [rel, "ok.wav"] and _manifest(out)["complete"]
    md = _metadata(out, rel)
    assert md["prompt"] == "latin-1 named" and md["file_stem"] == "caf\\xe9 latin1"
    assert "\\xe9" in _strict_json(out / _records(out)[rel]["metadata"])["path"]
    assert encode_folder(src, out, ToyEncoder()).reused == [rel, "ok.wav"]


def test_nfc_and_nfd_twins_keep_the_nfc_file_and_skip_the_other_with_a_reason(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _write(src, "caf\u00e9", seconds=0.2)
    nfd = unicodedata.normalize("NFD", "café")
    _write(src, nfd, seconds=0.5)
    if len(os.listdir(src)) < 2:
        pytest.skip("this file system stores one spelling per name")
    report = encode_folder(src, out, ToyEncoder())
    assert report.encoded == ["café.wav"]
    assert [rel for rel, _ in report.skipped] == [f"{nfd}.wav"] and "Unicode normalisation" in report.skipped[0][1]
    assert _metadata(out, "café.wav")["seconds_decoded"] == pytest.approx(0.2)  # data and manifest agree


# ----------------------------------------------------------------------------------------------------------------
# re-runs


def test_an_empty_or_unselected_source_never_wipes_an_existing_dataset(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    for name in ("tone_pcm_16", "tone_pcm_24", "tone_float"):
        _write(src, name)
    encode_folder(src, out, ToyEncoder())
    before = _listing(out)
    unmounted = tmp_path / "drive"
    unmounted.mkdir()
    with pytest.raises(DatasetError, match="no audio files found.*mounted"):
        encode_folder(unmounted, out, ToyEncoder())
    with pytest.raises(DatasetError, match="none of its 3 audio files is selected"):
        encode_folder(src, out, ToyEncoder(), include=["tone_pcm16*"])  # the typo of tone_pcm_16*
    assert _listing(out) == before and _manifest(out)["totals"]["encoded"] == 3


def test_another_source_folder_replaces_a_dataset_only_when_asked(tmp_path):
    src, other, out = tmp_path / "src", tmp_path / "other", tmp_path / "out"
    for name in ("a", "b"):
        _write(src, name)
    _write(other, "c")
    encode_folder(src, out, ToyEncoder())
    before = _listing(out)
    with pytest.raises(DatasetError, match=f"encoded from {src}.*remove 2 of them.*--prune"):
        encode_folder(other, out, ToyEncoder())
    assert _listing(out) == before
    report = encode_folder(other, out, ToyEncoder(), prune=True)
    assert report.removed == ["a.wav", "b.wav"] and [e["relpath"] for e in load_dataset(out).entries] == ["c.wav"]


def test_a_moved_source_folder_with_the_same_files_just_carries_on(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    for name in ("a", "b"):
        _write(src, name)
    encode_folder(src, out, ToyEncoder())
    moved = src.rename(tmp_path / "moved")
    report = encode_folder(moved, out, ToyEncoder())
    assert sorted(report.reused) == ["a.wav", "b.wav"] and report.removed == []
    assert _manifest(out)["source_folder"] == str(moved.absolute())
    assert _metadata(out, "a.wav")["path"] == str((moved / "a.wav").absolute())


def test_edited_captions_reach_the_dataset_on_a_rerun_without_reencoding(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _write(src, "a")
    _write(src, "b", freq=300)
    (src / "a.txt").write_text("old caption")
    (src / "json").mkdir()
    (src / "json" / "b.json").write_text(json.dumps({"genre": "dub"}))
    enc = ToyEncoder()
    encode_folder(src, out, enc)
    calls = enc.calls
    (src / "a.txt").write_text("new caption")
    (src / "json" / "b.json").write_text(json.dumps({"genre": "techno"}))
    report = encode_folder(src, out, enc)
    assert enc.calls == calls and sorted(report.reused) == ["a.wav", "b.wav"]  # no audio was encoded again
    assert _metadata(out, "a.wav")["prompt"] == "new caption" and _metadata(out, "b.wav")["genre"] == "techno"
    assert sorted(report.recaptioned) == ["a.wav", "b.wav"] and "2 unchanged (2 with new captions or tags)" in \
        report.summary()
    (src / "a.txt").unlink()
    report = encode_folder(src, out, enc)
    assert "prompt" not in _metadata(out, "a.wav") and enc.calls == calls and report.recaptioned == ["a.wav"]
    report = encode_folder(src, out, enc)
    assert report.recaptioned == [] and "with new captions" not in report.summary()


def test_unchanged_captions_leave_the_file_json_untouched(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _write(src, "a")
    (src / "a.txt").write_text("caption")
    encode_folder(src, out, ToyEncoder())
    before = (out / "a.wav.json").stat().st_mtime_ns
    encode_folder(src, out, ToyEncoder())
    assert (out / "a.wav.json").stat().st_mtime_ns == before


def test_sidecar_and_audio_warnings_name_the_file_and_survive_reruns(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _write(src / "sub", "song")
    (src / "sub" / "song.json").write_text("{oops")
    _truncated(src, "half")
    expected = {"sub/song.wav": "sub/song.json: invalid JSON", "half.wav": "decoded 0.50 s of the 1.00 s"}
    for _ in range(2):  # the first run encodes, the second reuses: the warnings must be there both times
        report = encode_folder(src, out, ToyEncoder())
        records = _records(out)
        for rel, text in expected.items():
            assert len(records[rel]["warnings"]) == 1 and records[rel]["warnings"][0].startswith(text)
        assert sorted(rel for rel, _ in report.warnings) == sorted(expected)
        assert "  warning sub/song.wav: sub/song.json: invalid JSON" in report.summary()
        assert _manifest(out)["totals"]["with_warnings"] == 2


def test_nan_in_a_sidecar_never_reaches_the_written_json(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _write(src, "a")
    (src / "a.json").write_text('{"prompt": "ok", "bpm": NaN}')
    encode_folder(src, out, ToyEncoder())
    md = _strict_json(out / "a.wav.json")
    assert md["prompt"] == "ok" and "bpm" not in md and "NaN" in _records(out)["a.wav"]["warnings"][0]


# ----------------------------------------------------------------------------------------------------------------
# prompts


def test_no_field_the_encoder_writes_reaches_a_prompt_built_from_every_field(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _write(src, "a")
    (src / "a.json").write_text(json.dumps({"mood": "calm"}))
    _truncated(src, "half")  # its JSON also carries audio_warnings
    encode_folder(src, out, ToyEncoder())
    every_field = PromptConfig(caption_weight=0, tags_weight=100, tag_keys=None)
    ds = load_dataset(out)
    for rel, md in ds.prompt_items():
        assert set(md) - set(lookup_metadata(src / rel, src)) <= RESERVED_FIELDS  # all the encoder added
        assert tag_parts(md, every_field) == (["Mood: calm"] if rel == "a.wav" else [])


def test_the_encoder_refuses_to_write_a_field_that_is_not_reserved():
    with pytest.raises(RuntimeError, match="ENCODER_FIELDS"):
        encode._file_json({"title": "x"}, {}, {"seconds_total": 1, "new_internal_field": 2})


# ----------------------------------------------------------------------------------------------------------------
# the command line


@pytest.fixture
def models_loaded(monkeypatch):
    """The CLI with the ToyEncoder for any model; the list holds each model source it loaded."""
    loaded = []

    def load_toy(source, device="cpu", variant=None, models_dir=None):
        loaded.append(source)
        return ToyEncoder()
    monkeypatch.setattr(encode, "load_encoder", load_toy)
    return loaded


def _encode_cli(folder, out, *extra):
    from sa3_lora_studio.cli import main

    return main(["encode", str(folder), "--model", "toy", "--out", str(out), "--quiet", *extra])


def test_cli_checks_the_folders_before_loading_the_model_and_prints_no_traceback(tmp_path, capsys, models_loaded):
    from sa3_lora_studio.cli import main

    audio = _write(tmp_path / "src", "a")
    cases = [(tmp_path / "missing", tmp_path / "out", "missing: no such folder"),
             (audio, tmp_path / "out", "a.wav is a file; give the folder"),
             (tmp_path / "src", audio, "a.wav is a file; the dataset is written to a folder"),
             (tmp_path / "src", audio / "set", "a.wav is a file, not a folder; give a dataset folder you can write to")]
    for folder, out, message in cases:
        assert _encode_cli(folder, out) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert models_loaded == []
    assert main(["dataset", "inspect", str(tmp_path / "nope")]) == 2
    assert "nope: no such dataset folder" in capsys.readouterr().err


def test_cli_says_when_a_folder_holds_no_audio_and_which_extensions_count(tmp_path, capsys, models_loaded):
    src = tmp_path / "src"
    src.mkdir()
    (src / "readme.md").write_text("hi")
    (src / "clip.mkv").write_bytes(b"\0" * 100)
    assert _encode_cli(src, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "no audio files found (2 other files ignored: " in err and ".mkv" in err and ".flac" in err
    assert models_loaded == [] and not (tmp_path / "out").exists()


def test_cli_does_not_report_a_folder_of_only_bad_files_as_a_success(tmp_path, capsys, models_loaded, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "zero.wav").write_bytes(b"")
    (src / "text.mp3").write_text("not audio\n" * 20)
    scans = []
    real_scan = scan.scan_folder
    monkeypatch.setattr(scan, "scan_folder", lambda *a, **k: scans.append(1) or real_scan(*a, **k))
    assert _encode_cli(src, tmp_path / "out") == 1
    assert "no usable file: every file was skipped" in capsys.readouterr().out
    assert len(scans) == 1  # planned before the model loads, and that plan is what is encoded


def test_cli_refuses_to_replace_a_dataset_from_another_folder_unless_pruning(tmp_path, capsys, models_loaded):
    src, other, out = tmp_path / "src", tmp_path / "other", tmp_path / "out"
    _write(src, "a")
    _write(other, "b")
    assert _encode_cli(src, out) == 0
    assert _encode_cli(other, out) == 2 and "--prune" in capsys.readouterr().err
    assert _encode_cli(other, out, "--prune") == 0
    assert [e["relpath"] for e in load_dataset(out).entries] == ["b.wav"]


def test_cli_ctrl_c_says_a_rerun_resumes_without_a_traceback(tmp_path, capsys, models_loaded, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    for name in ("a", "b", "c"):
        _write(src, name)
    (src / "metadata.csv").write_text("file_name,prompt\na.wav,warm pad\ngone.wav,a renamed file\n")
    real_encode = encode.encode_waveform
    calls = []

    def interrupted_on_the_second_file(encoder, audio, *args, **kwargs):
        if len(calls) == 2:  # the silence, then the first file
            raise KeyboardInterrupt
        calls.append(audio.shape)
        return real_encode(encoder, audio, *args, **kwargs)
    monkeypatch.setattr(encode, "encode_waveform", interrupted_on_the_second_file)
    assert _encode_cli(src, out) == 130
    err = capsys.readouterr().err
    assert "Run the same command again to continue" in err and "Traceback" not in err
    assert not _manifest(out)["complete"] and _manifest(out)["totals"]["encoded"] == 1
    assert [w["table"] for w in _manifest(out)["dataset_warnings"]] == ["metadata.csv"]  # `dataset inspect` sees it
    monkeypatch.setattr(encode, "encode_waveform", real_encode)
    assert _encode_cli(src, out) == 0 and "2 encoded, 1 unchanged" in capsys.readouterr().out
    assert np.isfinite(load_dataset(out).latents(0)).all()


def test_the_folder_signature_sees_edits_in_symlinked_folders_and_ignores_hidden_ones_and_the_dataset(tmp_path):
    """ComfyUI re-runs SA3 Encode Audio Folder only when this changes: it must walk what the scan walks."""
    from sa3_lora_studio.encoding.dataset import folder_signature

    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    src.mkdir()
    elsewhere.mkdir()
    (src / "a.wav").write_bytes(b"x")
    (src / "linked").symlink_to(elsewhere, target_is_directory=True)
    (src / "loop").symlink_to(src, target_is_directory=True)  # must not walk forever
    before = folder_signature(src, skip=(src / "dataset",))
    (src / ".git").mkdir()
    (src / ".git" / "index").write_bytes(b"y")
    (src / "dataset").mkdir()
    (src / "dataset" / "a.wav.npy").write_bytes(b"z")
    assert folder_signature(src, skip=(src / "dataset",)) == before
    (elsewhere / "b.txt").write_text("a caption")
    assert folder_signature(src, skip=(src / "dataset",)) != before


def test_datasets_written_before_names_were_shortened_or_the_decoding_changed_are_reused_or_redone(tmp_path):
    """A 210-byte name was stored unshortened before: its outputs are found there, reused and removed there. An
    encode without `decode_version` is kept for stereo but redone for surround (its downmix changed)."""
    src, out = tmp_path / "src", tmp_path / "out"
    mid = "m" * 206 + ".wav"  # 210 bytes: shortened now, written as it is before
    _write(src, mid)
    _write(src, "stereo.wav", freq=300)
    write_audio_file(src / "surround.wav", np.tile(tone(0.2, 44100, 1, 500), (6, 1)) * 0.3, 44100, "wav16")
    encode_folder(src, out, ToyEncoder())
    short = output_relpath(mid)
    for suffix in (".npy", ".json"):  # as the earlier code left it
        (out / f"{short}{suffix}").rename(out / f"{mid}{suffix}")
    for rel in (mid, "stereo.wav", "surround.wav"):
        meta_path = out / (rel + ".json")
        meta = json.loads(meta_path.read_text())
        del meta["decode_version"]
        meta_path.write_text(json.dumps(meta))
    again = encode_folder(src, out, ToyEncoder())
    assert again.encoded == ["surround.wav"] and sorted(again.reused) == sorted([mid, "stereo.wav"])
    assert _records(out)[mid]["latents"] == f"{mid}.npy" and load_dataset(out).latents(0).size
    (src / mid).unlink()
    encode_folder(src, out, ToyEncoder())
    assert not (out / f"{mid}.npy").exists() and not (out / f"{mid}.json").exists()


def test_a_file_too_long_for_the_free_memory_is_skipped_with_a_reason_and_the_rest_encoded(tmp_path, monkeypatch):
    """A 2-hour mix decoded whole needs ~9 GB: better one skipped file than the whole encode killed."""
    from sa3_lora_studio.encoding.audio_io import DECODE_COPIES, ENCODE_RESERVE_BYTES
    from sa3_lora_studio.sa3 import host_memory

    src, out = tmp_path / "src", tmp_path / "out"
    _write(src, "short.wav", seconds=0.05)
    _write(src, "long.wav", seconds=2.0)
    need_long = DECODE_COPIES * 4 * 2 * 2.0 * 44100 + ENCODE_RESERVE_BYTES  # 2 s of stereo, and the encoder's share
    monkeypatch.setattr(host_memory, "available_host_memory", lambda: int(need_long - 4 * 2 * 44100))
    report = encode_folder(src, out, ToyEncoder())
    assert report.encoded == ["short.wav"]
    (reason,) = [r for rel, r in report.skipped if rel == "long.wav"]
    assert reason == "too long for the free memory"
    assert _records(out)["long.wav"]["detail"].endswith("split the file into parts, or free memory and run again")


def test_a_version_2_dataset_redoes_only_the_mp4_files_ffmpeg_decoded(tmp_path):
    """Decoding version 3 removes AAC priming in MP4s without an edit list (iTunSMPB): only MP4-family files decoded
    by FFmpeg can have changed, so an earlier dataset keeps the rest."""
    src, out = tmp_path / "src", tmp_path / "out"
    _write(src, "a.wav")
    write_audio_file(src / "b", tone(0.3, 44100), 44100, "m4a")
    write_audio_file(src / "c", tone(0.3, 44100), 44100, "mp3")
    first = encode_folder(src, out, ToyEncoder())
    assert sorted(first.encoded) == ["a.wav", "b.m4a", "c.mp3"]
    for rel in first.encoded:
        meta_path = out / (rel + ".json")
        meta = json.loads(meta_path.read_text())
        assert meta["decode_version"] == 3
        meta["decode_version"] = 2
        meta_path.write_text(json.dumps(meta))
    again = encode_folder(src, out, ToyEncoder())
    assert again.encoded == ["b.m4a"] and sorted(again.reused) == ["a.wav", "c.mp3"]


def _damaged_mp3(folder):
    """An MP3 with 5000 bytes of its middle overwritten: libmpg123 resyncs and prints notes to fd 2 as it does."""
    path = _write(folder, "damaged", "mp3", seconds=3.0)
    data = bytearray(path.read_bytes())
    data[2000:7000] = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("quiet", [False, True])
def test_cli_keeps_native_decoder_chatter_off_the_terminal_and_in_a_log(tmp_path, fixtures_dir, quiet):
    import subprocess
    import sys

    src = tmp_path / "src"
    _damaged_mp3(src)
    _write(src, "fine", seconds=0.5)
    out = tmp_path / "ds"
    command = [sys.executable, "-m", "sa3_lora_studio", "encode", str(src), "--model",
               str(fixtures_dir / "tiny-small"), "--out", str(out)] + (["--quiet"] if quiet else [])
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    log = out / "decoder-messages.log"
    assert "mpg123" in log.read_text() or "Note:" in log.read_text()
    assert "mpg123" not in done.stderr and "resync" not in done.stderr
    assert "warning damaged.mp3" in done.stdout  # the report still says what was lost
    assert (f"decoder messages (libmpg123 and the like, already summed up above): {log}" in done.stdout) != quiet
    if not quiet:  # progress (Python's stderr) still reaches stderr: a pipe here, so plain lines, no bar escapes
        assert "2/2 " in done.stderr and "\r" not in done.stderr and "\x1b[" not in done.stderr
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)  # nothing decoded: nothing to name
    assert again.returncode == 0 and "decoder messages" not in again.stdout


def test_native_stderr_capture_leaves_no_log_when_nothing_was_written_and_restores_fd2(tmp_path):
    import subprocess
    import sys

    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from sa3_lora_studio.encoding.native_stderr import native_stderr_to\n"
        "log = Path(sys.argv[1])\n"
        "with native_stderr_to(log / 'quiet.log') as c:\n"
        "    print('python side', file=sys.stderr)\n"
        "print('quiet', c.bytes, log.joinpath('quiet.log').exists())\n"
        "with native_stderr_to(log / 'loud.log') as c:\n"
        "    os.write(2, b'native side\\n')\n"
        "print('loud', c.bytes)\n"
        "log.joinpath('killed.log').write_bytes(b'')\n"  # what a run killed with -9 leaves
        "with native_stderr_to(log / 'killed.log') as c:\n"
        "    pass\n"
        "print('killed', c.bytes, log.joinpath('killed.log').exists())\n"
        "os.write(2, b'after\\n')\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["quiet 0 False", "loud 12", "killed 0 False"]
    assert done.stderr.splitlines() == ["python side", "after"]
    assert (tmp_path / "loud.log").read_text() == "native side\n"


def test_cli_takes_the_dtype_spellings_of_the_other_commands_and_the_auto_device(tmp_path, models_loaded, monkeypatch):

    devices = []
    real = encode.load_encoder
    monkeypatch.setattr(encode, "load_encoder", lambda source, device="cpu", **kw: devices.append(device) or real(source))
    _write(tmp_path / "src", "a")
    assert _encode_cli(tmp_path / "src", tmp_path / "out", "--dtype", "fp16") == 0
    assert _manifest(tmp_path / "out")["dtype"] == "float16"
    assert devices == ["cpu"]  # "auto" on a machine without a GPU


def test_cli_names_a_device_this_machine_lacks_among_several_before_loading(tmp_path, capsys, models_loaded,
                                                                           monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _write(tmp_path / "src", "a")
    assert _encode_cli(tmp_path / "src", tmp_path / "out", "--devices", "cpu", "cuda:7") == 2
    assert "device cuda:7: this PyTorch sees no CUDA GPU" in capsys.readouterr().err
    assert models_loaded == []


def test_a_take_copied_over_with_the_same_size_and_mtime_is_encoded_again(tmp_path, monkeypatch):
    """`cp -p`, `rsync -a` or unzip keep a file's mtime, and a same-length bounce its size: the inode's change time,
    which no tool sets back, tells that the content may differ (the file is read again, and encoded if it does)."""
    src, out = tmp_path / "src", tmp_path / "out"
    take = _write(src, "take", freq=440.0)
    encode_folder(src, out, ToyEncoder())
    first = np.load(out / "take.wav.npy")
    hashed = []
    real_hash = encode.file_hash
    monkeypatch.setattr(encode, "file_hash", lambda path: hashed.append(path) or real_hash(path))
    assert encode_folder(src, out, ToyEncoder()).reused == ["take.wav"] and hashed == []  # unchanged: not read
    st = take.stat()
    other = _write(tmp_path / "v2", "take", freq=880.0)
    take.write_bytes(other.read_bytes())  # the same length, another sound
    os.utime(take, ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p leaves it
    assert take.stat().st_size == st.st_size and take.stat().st_mtime_ns == st.st_mtime_ns
    report = encode_folder(src, out, ToyEncoder())
    assert report.encoded == ["take.wav"] and not np.array_equal(np.load(out / "take.wav.npy"), first)
    os.chmod(take, 0o600)  # a change of the inode alone: read again, the same hash, nothing encoded
    hashed.clear()
    assert encode_folder(src, out, ToyEncoder()).reused == ["take.wav"] and len(hashed) == 1
    assert _records(out)["take.wav"]["ctime_ns"] == take.stat().st_ctime_ns  # the new stamp: not read next time


def test_a_second_encode_into_a_dataset_being_written_is_refused_and_changes_nothing(tmp_path):
    import subprocess
    import sys

    from sa3_lora_studio.encoding.dataset import ENCODE_LOCK

    src, out = tmp_path / "src", tmp_path / "out"
    _write(src, "a")
    encode_folder(src, out, ToyEncoder())
    _write(src, "b")
    assert not (out / ENCODE_LOCK).exists()  # an encode that ended leaves no lock file in the dataset folder
    holder = subprocess.Popen(  # another process in the middle of an encode into `out`
        [sys.executable, "-c", "import sys, time\nfrom sa3_lora_studio.sa3.atomic import file_lock\n"
         f"with file_lock({str(out / ENCODE_LOCK)!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _listing(out)
        with pytest.raises(DatasetError, match="another encode is writing this dataset now .*Nothing was changed"):
            encode_folder(src, out, ToyEncoder())
        assert _listing(out) == before
    finally:
        holder.kill()
        holder.wait()
    assert encode_folder(src, out, ToyEncoder()).encoded == ["b.wav"]  # once it is gone
    assert not (out / ENCODE_LOCK).exists()  # the killed holder's file too


def test_an_encode_planned_before_another_one_wrote_the_folder_is_checked_again_under_the_lock(tmp_path):
    """The CLI plans before loading the model (minutes): what it may remove is decided again once it holds the lock."""
    from sa3_lora_studio.encoding.scan import plan_encode

    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "out"
    for name in ("a", "b"):
        _write(first, name)
    _write(second, "z")
    planned = plan_encode(second, out)  # the dataset folder is still empty: nothing to refuse yet
    encode_folder(first, out, ToyEncoder())  # meanwhile another process encodes into it
    before = _listing(out)
    with pytest.raises(DatasetError, match="encoded from .*first.*remove 2 of them"):
        encode_folder(second, out, ToyEncoder(), planned=planned)
    assert _listing(out) == before


def test_the_cli_bar_moves_within_a_long_file_on_a_terminal_and_logs_a_long_one_now_and_then(capsys, monkeypatch):
    """On a terminal the bar moves per chunk; a log file gets a line within a file only 30 s after the line before,
    so a folder of songs logs a line each, and an hour-long take says where it is every half minute."""
    from sa3_lora_studio.encoding import cli

    clock = [1000.0]
    monkeypatch.setattr(cli.time, "monotonic", lambda: clock[0])
    bar = cli._Bar(quiet=False)
    for done in range(1, 4):  # a song: 3 chunks in a few seconds
        clock[0] += 2
        bar.within({"i": 1, "n": 4, "relpath": "song.flac", "done": done, "total": 3})
    bar({"i": 1, "n": 4, "relpath": "song.flac", "status": "encoded"})
    for done in range(1, 31):  # an hour-long take: 30 chunks of 12 s
        clock[0] += 12
        bar.within({"i": 2, "n": 4, "relpath": "live set.flac", "done": done, "total": 30})
    bar({"i": 2, "n": 4, "relpath": "live set.flac", "status": "encoded"})
    logged = capsys.readouterr().err.splitlines()
    assert logged == ["1/4 song.flac (encoded)"] + [f"2/4 live set.flac ({round(100 * d / 30)} % encoded)"
                                                    for d in (3, 6, 9, 12, 15, 18, 21, 24, 27)] + \
        ["2/4 live set.flac (encoded)"]
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    bar.within({"i": 2, "n": 4, "relpath": "live set.flac", "done": 15, "total": 30})
    drawn = capsys.readouterr().err
    assert drawn.startswith("\r[" + "#" * 11 + "." * 19 + "] 2/4 live set.flac (50 %)")  # 1.5 of 4 files
    bar.within({"i": 2, "n": 4, "relpath": "live set.flac", "done": 15, "total": 30, "resumed": 12})
    assert "live set.flac (50 %, resumed at 40 %)" in capsys.readouterr().err  # why it got there at once
    cli._Bar(quiet=True).within({"i": 1, "n": 1, "relpath": "x.wav", "done": 1, "total": 2})
    assert capsys.readouterr().err == ""
