"""The one metadata lookup order: JSON sidecar (next to / json/ / ../json/), text sidecar, embedded tags (written
with mutagen into real files), path fields."""

import json
import os
from pathlib import Path

import mutagen
import pytest
from mutagen.id3 import COMM, TALB, TBPM, TCON, TIT2, TKEY, TPE1, TPUB, TXXX
from mutagen.mp4 import MP4FreeForm
from sa3_lora_studio.encoding.captions import lookup_metadata, name_text, path_fields, read_tags
from sa3_lora_studio.encoding.toy import tone, write_audio_file

TAGS = {"title": "Night Drive", "artist": "Kōji & the Ølbrygg", "album": "Roads", "genre": "Synthwave",
        "label": "Neon Recs", "bpm": "118", "key": "A minor"}


def _tag_id3(path):
    f = mutagen.File(path)
    if f.tags is None:
        f.add_tags()
    t = f.tags
    for frame in (TIT2(encoding=3, text=TAGS["title"]), TPE1(encoding=3, text=TAGS["artist"]),
                  TALB(encoding=3, text=TAGS["album"]), TCON(encoding=3, text=TAGS["genre"]),
                  TPUB(encoding=3, text=TAGS["label"]), TBPM(encoding=3, text=TAGS["bpm"]),
                  TKEY(encoding=3, text=TAGS["key"]), TXXX(encoding=3, desc="mood", text="calm"),
                  COMM(encoding=3, lang="eng", desc="", text="late night")):
        t.add(frame)
    f.save()


def _tag_vorbis(path):
    f = mutagen.File(path)
    for k, v in TAGS.items():
        f[{"label": "organization", "key": "initialkey"}.get(k, k)] = v
    f["mood"] = "calm"
    f["comment"] = "late night"
    f.save()


def _tag_mp4(path):
    f = mutagen.File(path)
    f["\xa9nam"], f["\xa9ART"], f["\xa9alb"], f["\xa9gen"] = TAGS["title"], TAGS["artist"], TAGS["album"], TAGS["genre"]
    f["tmpo"] = [int(TAGS["bpm"])]
    f["\xa9cmt"] = "late night"
    f["----:com.apple.iTunes:LABEL"] = MP4FreeForm(TAGS["label"].encode())
    f["----:com.apple.iTunes:initialkey"] = MP4FreeForm(TAGS["key"].encode())
    f["----:com.apple.iTunes:mood"] = MP4FreeForm(b"calm")
    f.save()


TAGGERS = {"mp3": _tag_id3, "aiff": _tag_id3, "wav16": _tag_id3, "flac": _tag_vorbis, "ogg": _tag_vorbis,
           "opus": _tag_vorbis, "m4a": _tag_mp4}


@pytest.mark.parametrize("fmt", sorted(TAGGERS))
def test_embedded_tags_are_read_from_every_container(tmp_path, fmt):
    rate = 48000 if fmt == "opus" else 44100
    path = write_audio_file(tmp_path / "song", tone(0.1, rate), rate, fmt)
    TAGGERS[fmt](path)
    tags = read_tags(path)
    for k, v in TAGS.items():
        assert tags.get(k) == v, (k, tags)
    assert tags["mood"] == "calm" and tags["comment"] == "late night"
    md = lookup_metadata(path, tmp_path)
    assert md["title"] == "Night Drive" and md["file_stem"] == "song"


def _song(folder, name="song"):
    folder.mkdir(parents=True, exist_ok=True)
    path = write_audio_file(folder / name, tone(0.1, 44100), 44100, "mp3")
    _tag_id3(path)
    return path


def test_json_sidecar_next_to_the_audio_wins_over_text_tags_and_path(tmp_path):
    audio = _song(tmp_path / "album")
    (tmp_path / "album" / "song.json").write_text(json.dumps({"title": "From JSON", "mood": "tense", "n": 3}))
    (tmp_path / "album" / "song.txt").write_text("  a caption from txt \n")
    sources = {}
    md = lookup_metadata(audio, tmp_path, sources=sources)
    assert md["title"] == "From JSON" and md["mood"] == "tense" and md["n"] == 3
    assert md["prompt"] == "a caption from txt"  # the text sidecar still supplies `prompt`
    assert md["artist"] == TAGS["artist"]  # tags fill what the sidecars do not say
    assert md["folder"] == "album" and md["top_folder"] == "album" and md["file_stem"] == "song"
    assert set(sources) == {"json", "txt", "tags", "path"}


def test_json_sidecar_layouts_in_documented_priority(tmp_path):
    audio = _song(tmp_path / "data" / "songs")
    beside = tmp_path / "data" / "songs" / "json" / "song.json"
    parent = tmp_path / "data" / "json" / "song.json"
    nextto = tmp_path / "data" / "songs" / "song.json"
    parent.parent.mkdir(parents=True)
    parent.write_text(json.dumps({"title": "parent json"}))
    assert lookup_metadata(audio, tmp_path)["title"] == "parent json"
    beside.parent.mkdir(parents=True)
    beside.write_text(json.dumps({"title": "json folder beside"}))
    assert lookup_metadata(audio, tmp_path)["title"] == "json folder beside"
    nextto.write_text(json.dumps({"title": "next to"}))
    assert lookup_metadata(audio, tmp_path)["title"] == "next to"


def test_text_sidecar_layouts_give_the_prompt(tmp_path):
    audio = _song(tmp_path / "data" / "songs")
    (tmp_path / "data" / "txt").mkdir()
    (tmp_path / "data" / "txt" / "song.txt").write_text("from ../txt\n")
    assert lookup_metadata(audio, tmp_path)["prompt"] == "from ../txt"
    (tmp_path / "data" / "songs" / "txt").mkdir()
    (tmp_path / "data" / "songs" / "txt" / "song.txt").write_text("from txt/")
    assert lookup_metadata(audio, tmp_path)["prompt"] == "from txt/"
    (tmp_path / "data" / "songs" / "song.txt").write_text("next to")
    assert lookup_metadata(audio, tmp_path)["prompt"] == "next to"


def test_a_text_sidecar_saved_by_a_windows_editor_is_read_with_a_note(tmp_path):
    audio = _song(tmp_path)
    (tmp_path / "song.txt").write_bytes("café crème, 90 bpm – dusty".encode("cp1252"))
    warnings = []
    assert lookup_metadata(audio, tmp_path, warnings=warnings)["prompt"] == "café crème, 90 bpm – dusty"
    assert warnings == ["song.txt: not UTF-8; read as Windows-1252 (save it as UTF-8 if accents look wrong)"]
    (tmp_path / "song.txt").write_text("naïve", encoding="utf-16")  # with its BOM
    warnings.clear()
    assert lookup_metadata(audio, tmp_path, warnings=warnings)["prompt"] == "naïve" and warnings == []
    (tmp_path / "song.txt").write_bytes("warm pad".encode("utf-16") + b"\n")  # an odd byte count: torn
    md = lookup_metadata(audio, tmp_path, warnings=warnings)  # never raises on a bad sidecar
    assert md["prompt"].startswith("warm pad") and warnings == ["song.txt: damaged UTF-16 (undecodable bytes replaced)"]


def test_invalid_json_warns_and_falls_back_to_the_next_source(tmp_path):
    audio = _song(tmp_path)
    (tmp_path / "song.json").write_text("{not json")
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "song.json").write_text(json.dumps(["a list"]))
    warnings = []
    md = lookup_metadata(audio, tmp_path, warnings=warnings)
    assert len(warnings) == 2 and "invalid JSON" in warnings[0]
    assert md["title"] == TAGS["title"]  # from the tags


def test_path_fields_without_any_sidecar_or_tag(tmp_path):
    folder = tmp_path / "Bossa [live]" / "set 1"
    folder.mkdir(parents=True)
    audio = write_audio_file(folder / "Águas de 50% $ 'x'", tone(0.1, 44100), 44100, "wavf")
    md = lookup_metadata(audio, tmp_path)
    assert md == {"file_stem": "Águas de 50% $ 'x'", "folder": "Bossa [live]/set 1", "top_folder": "Bossa [live]"}


def test_sidecar_warnings_name_the_sidecar_by_its_path_under_the_root(tmp_path):
    audio = _song(tmp_path / "album" / "disc 1")
    (tmp_path / "album" / "disc 1" / "song.json").write_text("{oops")
    warnings = []
    lookup_metadata(audio, tmp_path, warnings=warnings)
    assert warnings[0].startswith("album/disc 1/song.json: invalid JSON")


def test_a_sidecar_folder_it_may_not_look_into_is_a_warning_not_an_error(tmp_path, monkeypatch):
    audio = _song(tmp_path / "b")
    locked = tmp_path / "b" / "json"
    locked.mkdir()
    (tmp_path / "b" / "song.txt").write_text("still read")
    os.chmod(locked, 0)
    if os.geteuid() == 0:  # root looks anywhere: make stat() refuse as it would for a normal user
        real_is_file = Path.is_file

        def refusing_is_file(self):
            if self.parent == locked:
                raise PermissionError(13, "Permission denied", str(self))
            return real_is_file(self)
        monkeypatch.setattr(Path, "is_file", refusing_is_file)
    warnings = []
    try:
        md = lookup_metadata(audio, tmp_path, warnings=warnings)
    finally:
        os.chmod(locked, 0o755)
    assert md["prompt"] == "still read" and md["title"] == TAGS["title"]
    assert len(warnings) == 1 and warnings[0].startswith("b/json/song.json: cannot look") and "denied" in warnings[0]


def test_nan_and_infinity_in_a_json_sidecar_are_dropped_with_a_warning(tmp_path):
    audio = _song(tmp_path)
    (tmp_path / "song.json").write_text('{"prompt": "ok", "bpm": NaN, "energy": [1, Infinity], "key": "C"}')
    warnings = []
    md = lookup_metadata(audio, tmp_path, warnings=warnings)
    assert md["prompt"] == "ok" and md["key"] == "C" and md["bpm"] == TAGS["bpm"]  # the tag fills in
    assert "energy" not in md
    assert len(warnings) == 1 and "bpm, energy" in warnings[0]
    json.dumps(md, allow_nan=False)  # strict JSON again


def test_name_bytes_that_are_not_utf8_are_spelled_as_escapes():
    undecodable = os.fsdecode(b"caf\xe9 \xff")  # how os.scandir hands such a name over
    assert name_text(undecodable) == "caf\\xe9 \\xff"
    assert name_text("cafe\u0301") == "caf\u00e9"  # NFC as before
    fields = path_fields(Path("/r") / os.fsdecode(b"d\xe9j\xe0") / f"{undecodable}.wav", "/r")
    assert fields == {"file_stem": "caf\\xe9 \\xff", "folder": "d\\xe9j\\xe0", "top_folder": "d\\xe9j\\xe0"}
    json.dumps(fields, ensure_ascii=False).encode("utf-8")  # writable


def test_a_json_sidecars_caption_or_text_is_its_prompt_and_no_tag(tmp_path):
    from sa3_lora_studio.encoding.prompts import PromptConfig, tag_parts

    folder = tmp_path / "set"
    folder.mkdir()
    for name, fields in (("cap", {"caption": "dusty breakbeat", "bpm": 100}),
                         ("txt", {"text": "glassy pad", "description": "Downloaded from a sample site"}),
                         ("desc", {"description": "recorded with a Zoom H4n"}),  # metadata, not a caption
                         ("nan", {"caption": "NaN", "text": "warm analog pad"}),  # a placeholder is no caption
                         ("both", {"prompt": "own prompt", "caption": "a second caption"}),
                         ("blank", {"caption": "  ", "mood": "calm"})):
        audio = write_audio_file(folder / name, tone(0.05, 44100), 44100, "wav16")
        (folder / f"{name}.json").write_text(json.dumps(fields))
        md = lookup_metadata(audio, tmp_path)
        expected = {"cap": "dusty breakbeat", "txt": "glassy pad", "desc": None, "nan": "warm analog pad",
                    "both": "own prompt", "blank": None}[name]
        assert md.get("prompt") == expected, name
        parts = tag_parts(md, PromptConfig(tag_keys=None))
        assert not any(expected and expected in part for part in parts), (name, parts)
    assert md["caption"] == "  " and md["mood"] == "calm"  # nothing to take: the fields stay as they are


@pytest.mark.parametrize("fmt", ["WAV", "AIFF"])
def test_a_wavs_riff_info_and_an_aiffs_text_chunks_are_tags_and_an_id3_tag_wins_over_them(tmp_path, fmt):
    import numpy as np
    import soundfile as sf

    path = tmp_path / f"take.{fmt.lower()}"
    with sf.SoundFile(str(path), "w", 44100, 2, format=fmt, subtype="PCM_16") as f:
        f.title, f.artist, f.genre, f.comment, f.software = "Rain Loop", "Field Kit", "Ambient", "mic: MKH416", "X 1.0"
        f.write(np.zeros((4410, 2), dtype=np.float32))
    tags = read_tags(path)
    if fmt == "WAV":  # RIFF INFO: INAM, IART, IGNR, ICMT (a sample editor's, a DAW's)
        assert tags == {"title": "Rain Loop", "artist": "Field Kit", "genre": "Ambient", "comment": "mic: MKH416"}
    else:  # AIFF's NAME, AUTH and ANNO chunks (no genre there)
        assert tags["title"] == "Rain Loop" and tags["artist"] == "Field Kit" and "software" not in tags
    assert lookup_metadata(path, tmp_path)["title"] == "Rain Loop"
    _tag_id3(path)  # both kinds in one file: the ID3 tag's title
    assert read_tags(path)["title"] == TAGS["title"] and read_tags(path)["mood"] == "calm"


def test_riff_info_written_in_a_windows_code_page_keeps_its_accents(tmp_path):
    import numpy as np
    import soundfile as sf

    path = tmp_path / "take.wav"
    with sf.SoundFile(str(path), "w", 44100, 1, format="WAV", subtype="PCM_16") as f:
        f.title, f.artist = "Cafe Noir", "Jose Gonzalez"
        f.write(np.zeros(4410, dtype=np.float32))
    data = path.read_bytes()  # as a Windows editor writes them: Windows-1252 bytes, sizes unchanged
    data = data.replace(b"Cafe Noir", "Café Noir".encode("cp1252")).replace(b"Jose", "José".encode("cp1252"))
    path.write_bytes(data)
    tags = read_tags(path)
    assert tags["title"] == "Café Noir" and tags["artist"] == "José Gonzalez"
    with sf.SoundFile(str(path), "w", 44100, 1, format="WAV", subtype="PCM_16") as f:  # UTF-8 stays UTF-8
        f.title = "Café Noir"
        f.write(np.zeros(4410, dtype=np.float32))
    assert read_tags(path)["title"] == "Café Noir"


def test_a_sidecar_named_with_another_case_or_unicode_form_or_after_the_whole_file_name_is_found(tmp_path):
    import unicodedata

    folder = tmp_path / "set"
    folder.mkdir()
    loud = write_audio_file(folder / "KICK", tone(0.05, 44100), 44100, "wav16")  # KICK.wav
    (folder / "kick.TXT").write_text("punchy kick")
    nfd = write_audio_file(folder / unicodedata.normalize("NFD", "Café Noir"), tone(0.05, 44100), 44100, "wav16")
    (folder / (unicodedata.normalize("NFC", "Café Noir") + ".json")).write_text(json.dumps({"prompt": "smoky"}))
    whole = write_audio_file(folder / "Track 01", tone(0.05, 44100), 44100, "wav16")
    (folder / "Track 01.wav.txt").write_text("intro theme")
    assert lookup_metadata(loud, tmp_path)["prompt"] == "punchy kick"
    assert lookup_metadata(nfd, tmp_path)["prompt"] == "smoky"
    assert lookup_metadata(whole, tmp_path)["prompt"] == "intro theme"
    (folder / "Track 01.txt").write_text("the exact name first")
    assert lookup_metadata(whole, tmp_path)["prompt"] == "the exact name first"
    write_audio_file(folder / "kick", tone(0.05, 44100), 44100, "wav16")  # kick.wav beside KICK.wav: kick.TXT is
    (folder / "kick.TXT").rename(folder / "kick.txt")  # kick.wav's own now, not KICK.wav's too
    assert lookup_metadata(folder / "kick.wav", tmp_path)["prompt"] == "punchy kick"
    assert "prompt" not in lookup_metadata(loud, tmp_path)
