"""Folder-level metadata tables (`metadata.csv` / `.tsv` / `.jsonl`, the Hugging Face audiofolder convention) as a
source of the one metadata lookup: row matching, priority against sidecars and tags, encodings and delimiters,
problems reported once per dataset, parsed once per change, and edits reaching an encoded dataset."""

import json
import os
import zlib

import mutagen
from mutagen.id3 import TCON
from sa3_lora_studio.encoding import metadata_tables
from sa3_lora_studio.encoding.captions import lookup_metadata, table_warnings
from sa3_lora_studio.encoding.dataset import load_dataset
from sa3_lora_studio.encoding.encode import EncodeReport, encode_folder
from sa3_lora_studio.encoding.toy import ToyEncoder, tone, write_audio_file


def _audio(path, fmt="flac"):
    """A short tone of its own for each path (byte-identical files would be named as copies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    freq = 220 + zlib.crc32(str(path).encode()) % 2000
    return write_audio_file(path, tone(0.1, 44100, freq=freq), 44100, fmt)


def _lookup(path, root):
    """(metadata, the file's warnings + the problems of the tables it consults, sources). Table problems are reported
    once per table (`table_warnings`), not per file; they are added here as "<table>: <problem>" for the assertions."""
    warnings, sources = [], {}
    md = lookup_metadata(path, root, warnings=warnings, sources=sources)
    warnings += [f"{table}: {text}" for table, text in table_warnings(root, [path]) if "name no audio file" not in text]
    return md, warnings, sources


def test_audiofolder_csv_names_files_by_path_from_its_folder_and_its_text_is_the_prompt(tmp_path):
    a, b = _audio(tmp_path / "a.flac"), _audio(tmp_path / "drums" / "b.flac")
    (tmp_path / "metadata.csv").write_text(
        'file_name,text,Genre,Tempo\na.flac,"warm pad, slow",ambient,70\ndrums/b.flac,tight kick,,128\n',
        encoding="utf-8")
    md, warnings, sources = _lookup(a, tmp_path)
    assert md["prompt"] == "warm pad, slow" and "text" not in md  # moved, so no tag says it again as "Text: ..."
    assert md["genre"] == "ambient" and md["bpm"] == "70"  # Tempo is the tag alias of bpm
    assert sources["table"].endswith("metadata.csv:2") and warnings == []
    md, _, sources = _lookup(b, tmp_path)
    assert md["prompt"] == "tight kick" and md["bpm"] == "128" and "genre" not in md  # empty cells are no field
    assert sources["table"].endswith("metadata.csv:3")
    assert md["file_stem"] == "b" and md["folder"] == "drums"  # the path fields stay


def test_sidecars_beat_the_table_and_the_table_beats_embedded_tags(tmp_path):
    song = _audio(tmp_path / "song.mp3", "mp3")
    f = mutagen.File(song)
    f.add_tags()
    f.tags.add(TCON(encoding=3, text="Jazz"))
    f.save()
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "song.mp3", "prompt": "from the table", "genre": "House", "mood": "dark"}) + "\n")
    md, _, _ = _lookup(song, tmp_path)
    assert (md["prompt"], md["genre"], md["mood"]) == ("from the table", "House", "dark")
    (tmp_path / "song.txt").write_text("from the text sidecar")
    (tmp_path / "song.json").write_text(json.dumps({"mood": "bright"}))
    md, _, sources = _lookup(song, tmp_path)
    assert (md["prompt"], md["genre"], md["mood"]) == ("from the text sidecar", "House", "bright")
    assert set(sources) == {"path", "tags", "table", "txt", "json"}


def test_the_nearest_table_naming_the_file_wins_and_tables_outside_the_root_are_not_read(tmp_path):
    root = tmp_path / "set"
    a, b = _audio(root / "sub" / "a.flac"), _audio(root / "sub" / "b.flac")
    (root / "metadata.csv").write_text("file_name,caption\nsub/a.flac,root a\nsub/b.flac,root b\n")
    (root / "sub" / "metadata.tsv").write_text("file_name\tcaption\na.flac\tnear a\n")
    (tmp_path / "metadata.csv").write_text("file_name,caption\nset/sub/b.flac,outside\n")
    assert _lookup(a, root)[0]["prompt"] == "near a"
    assert _lookup(b, root)[0]["prompt"] == "root b"  # the near table does not name b: the next one up does
    (root / "metadata.csv").unlink()
    assert "prompt" not in _lookup(b, root)[0]  # the table above the dataset root is not part of the dataset


def test_spreadsheet_exports_semicolons_windows_1252_bare_names_and_backslashes(tmp_path):
    one, two = _audio(tmp_path / "Keys" / "Rhodes.flac"), _audio(tmp_path / "Pads" / "Strings.flac")
    dup1, dup2 = _audio(tmp_path / "x" / "loop.flac"), _audio(tmp_path / "y" / "loop.flac")
    rows = ("Filename;Prompt;Caption;Key\n"
            "Rhodes.flac;café jazz chords;ignored;Eb major\n"  # a bare name: the one file of that name
            "Pads\\Strings.flac;string pad;;\n"  # a Windows path
            "loop.flac;ambiguous;;\nloop.flac;ambiguous too;;\n")
    (tmp_path / "metadata.csv").write_bytes(rows.encode("cp1252"))
    md, warnings, _ = _lookup(one, tmp_path)
    assert md["prompt"] == "café jazz chords" and md["caption"] == "ignored" and md["key"] == "Eb major"
    assert any("metadata.csv: not UTF-8; read as Windows-1252" in w for w in warnings)
    assert any("listed twice (e.g. loop.flac)" in w for w in warnings)
    assert _lookup(two, tmp_path)[0]["prompt"] == "string pad"
    # "loop.flac" without a folder, listed twice: its last row, for each file of that name, said to be a loose match
    for dup in (dup1, dup2):
        md, warnings, sources = _lookup(dup, tmp_path)
        assert md["prompt"] == "ambiguous too" and sources["table"].endswith("metadata.csv:5")
        assert ("metadata.csv: rows matched loosely (by case, audio extension, bare name or path from the dataset "
                "root)") in warnings


def test_a_table_without_a_file_column_is_one_summary_line_not_one_per_file(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(5):
        _audio(src / f"s{i}.flac")
    (src / "metadata.csv").write_text("title,artist\nOne,Someone\n")
    _, warnings, sources = _lookup(src / "s0.flac", src)
    assert warnings == ["metadata.csv: no column names the audio files (expected one of file_name, filename, file, "
                        "file_path …); ignored"] and "table" not in sources
    report = encode_folder(src, out, ToyEncoder())
    lines = [line for line in report.summary().splitlines() if "metadata.csv" in line]
    assert len(lines) == 1 and lines[0].startswith("  warning metadata.csv: no column names the audio files")
    assert report.warnings == [] and ", 0 with warnings;" in report.summary()  # a table's problem, not the files'
    assert not any(r.get("warnings") for r in load_dataset(out).manifest["files"])
    assert EncodeReport(out, warnings=[("a", "x"), ("b", "x")]).summary().count("  warning ") == 2  # few: each


def test_a_table_is_parsed_once_for_all_its_files_and_again_after_an_edit(tmp_path, monkeypatch):
    for i in range(6):
        _audio(tmp_path / f"s{i}.flac")
    table = tmp_path / "metadata.csv"
    table.write_text("file_name,text\n" + "".join(f"s{i}.flac,take {i}\n" for i in range(6)))
    parsed = []
    real = metadata_tables.parse_table
    monkeypatch.setattr(metadata_tables, "parse_table", lambda *a: parsed.append(a[0]) or real(*a))
    assert [_lookup(tmp_path / f"s{i}.flac", tmp_path)[0]["prompt"] for i in range(6)] == [f"take {i}" for i in range(6)]
    assert parsed == [table]
    table.write_text("file_name,text\ns0.flac,edited take\n")
    os.utime(table, ns=(1, 1))
    assert _lookup(tmp_path / "s0.flac", tmp_path)[0]["prompt"] == "edited take" and len(parsed) == 2


def test_an_edited_table_reaches_the_encoded_dataset_without_reencoding(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _audio(src / "a.flac"), _audio(src / "b.flac")
    (src / "metadata.csv").write_text("file_name,text\na.flac,first caption\n")
    first = encode_folder(src, out, ToyEncoder())
    assert sorted(first.encoded) == ["a.flac", "b.flac"]
    assert "  captions: 1 from metadata tables; 1 file(s) without one (tags and path only)" in first.summary()
    prompts = {e["relpath"]: load_dataset(out).metadata(i).get("prompt") for i, e in enumerate(load_dataset(out).entries)}
    assert prompts == {"a.flac": "first caption", "b.flac": None}
    (src / "metadata.csv").write_text("file_name,text\na.flac,second caption\nb.flac,now captioned\n")
    (src / "b.txt").write_text("the text sidecar wins")
    again = encode_folder(src, out, ToyEncoder())
    assert again.encoded == [] and sorted(again.reused) == ["a.flac", "b.flac"]
    assert again.captions == {"table": 1, "txt": 1}
    assert "  captions: 1 from .txt sidecars, 1 from metadata tables\n" in again.summary() + "\n"
    ds = load_dataset(out)
    assert {e["relpath"]: ds.metadata(i).get("prompt") for i, e in enumerate(ds.entries)} == {
        "a.flac": "second caption", "b.flac": "the text sidecar wins"}


def test_absolute_paths_inside_the_table_folder_match_and_a_one_column_list_is_read(tmp_path):
    a, b = _audio(tmp_path / "in" / "a.flac"), _audio(tmp_path / "in" / "b, with comma.flac")
    (tmp_path / "metadata.csv").write_text(f"path,prompt\n{a},absolute\n/elsewhere/b.flac,not this one\n")
    assert _lookup(a, tmp_path)[0]["prompt"] == "absolute"
    (tmp_path / "metadata.csv").write_text('file_name\n"in/b, with comma.flac"\n')
    assert _lookup(b, tmp_path)[1] == []
    table = metadata_tables.parse_table(tmp_path / "metadata.csv", {})
    row = table.exact_row("in/b, with comma.flac")
    assert (row.line, row.fields) == (2, {}) and table.problems == []


LOOSE = "metadata.csv: rows matched loosely (by case, audio extension, bare name or path from the dataset root)"


def test_loose_matches_case_extension_root_relative_paths_and_never_a_row_of_another_existing_file(tmp_path):
    kick, warm = _audio(tmp_path / "Drums" / "kick.flac"), _audio(tmp_path / "Pads" / "warm.flac")
    main_kick, alt_kick = _audio(tmp_path / "Kick.flac"), _audio(tmp_path / "Alt" / "Kick.flac")
    (tmp_path / "metadata.csv").write_text("file_name,caption\nDRUMS/KICK.WAV,punchy\nPads/warm,airy\n"
                                           "Kick.flac,main kick\n")
    for path, prompt in [(kick, "punchy"), (warm, "airy")]:
        md, warnings, _ = _lookup(path, tmp_path)
        assert md["prompt"] == prompt and LOOSE in warnings
    assert _lookup(main_kick, tmp_path)[0]["prompt"] == "main kick"
    assert "prompt" not in _lookup(alt_kick, tmp_path)[0]  # the bare row names root/Kick.flac, which exists
    # a table in train/ listing paths from the dataset root (a common slip) still finds them
    clip = _audio(tmp_path / "train" / "clip0.flac")
    (tmp_path / "train" / "metadata.csv").write_text("file_name,text\ntrain/clip0.flac,from the root\n")
    md, warnings, _ = _lookup(clip, tmp_path)
    assert md["prompt"] == "from the root" and any("train/metadata.csv: rows matched loosely" in w for w in warnings)


def test_an_exact_row_further_up_beats_a_loose_row_nearer(tmp_path):
    deep = _audio(tmp_path / "sub" / "deep" / "a.flac")
    (tmp_path / "sub" / "deep" / "metadata.csv").write_text("file_name,text\nA.WAV,loose and near\n")
    (tmp_path / "metadata.csv").write_text("file_name,text\nsub/deep/a.flac,exact and far\n")
    md, warnings, _ = _lookup(deep, tmp_path)
    assert md["prompt"] == "exact and far" and not any("loosely" in w for w in warnings)


def test_rows_naming_no_audio_file_are_one_report_warning_per_table(tmp_path, capsys):
    src = tmp_path / "src"
    _audio(src / "a.flac"), _audio(src / "b.flac")
    (src / "metadata.csv").write_text("file_name,text\na.flac,ok\ngone.flac,renamed since\nold/b2.wav,moved\n")
    report = encode_folder(src, tmp_path / "out", ToyEncoder())
    assert ("metadata.csv", "2 of 3 rows name no audio file here (e.g. line 3: 'gone.flac'); paths are relative to "
                            "the table's folder") in report.table_warnings
    assert "warning metadata.csv: 2 of 3 rows" in report.summary()
    from sa3_lora_studio.cli import main  # and `dataset inspect` after the encode, from the manifest

    assert main(["dataset", "inspect", str(tmp_path / "out")]) == 0
    assert "  warning metadata.csv: 2 of 3 rows name no audio file here" in capsys.readouterr().out


def test_spreadsheet_quirks_utf16_sep_line_spaced_headers_comments_and_unquoted_commas(tmp_path):
    a = _audio(tmp_path / "a.flac")
    cases = {
        "utf-16": ("file_name\tcaption\na.flac\tpunchy kick\n".encode("utf-16"), "punchy kick"),
        "sep line": (b"sep=;\nfile_name;caption\na.flac;punchy kick\n", "punchy kick"),
        "spaced header, comment first": (b"# exported 2026-01-02\n\nFile Name,Caption\na.flac,punchy kick\n",
                                         "punchy kick"),
        "a tie in the header": (b"Filename;Description, long\na.flac;a pad, slow\n", None),
        "unquoted comma": (b'file_name,caption\na.flac,warm pad, slow attack\n', "warm pad, slow attack"),
    }
    for label, (data, prompt) in cases.items():
        (tmp_path / "metadata.csv").write_bytes(data)
        md, warnings, sources = _lookup(a, tmp_path)
        assert "table" in sources and md.get("prompt") == prompt, label
        if label == "a tie in the header":
            assert md["description, long"] == "a pad, slow"
        if label == "unquoted comma":
            assert warnings == ["metadata.csv: line 2 more cells than columns: the rest was kept in 'caption' "
                                "(quote text that holds ',')"]
        else:
            assert not [w for w in warnings if "metadata" in w], (label, warnings)


def test_jsonl_with_unescaped_line_separators_and_non_finite_numbers_keeps_every_file(tmp_path):
    src = tmp_path / "src"
    for name in "abc":
        _audio(src / f"{name}.flac")
    lines = [json.dumps({"file_name": "a.flac", "text": "verse one\u2028verse two"}, ensure_ascii=False),
             '{"file_name": "b.flac", "text": "ok", "emb": [0.1, NaN], "gain": Infinity}',
             json.dumps({"file_name": "c.flac", "text": "third"})]
    (src / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = encode_folder(src, tmp_path / "out", ToyEncoder())
    assert sorted(report.encoded) == ["a.flac", "b.flac", "c.flac"] and not report.skipped
    ds = load_dataset(tmp_path / "out")
    meta = {e["relpath"]: ds.metadata(i) for i, e in enumerate(ds.entries)}
    assert meta["a.flac"]["prompt"] == "verse one\u2028verse two" and meta["c.flac"]["metadata_sources"]["table"].endswith(":3")
    assert meta["b.flac"]["prompt"] == "ok" and "emb" not in meta["b.flac"] and "gain" not in meta["b.flac"]
    assert any("line 2 NaN/Infinity is not valid JSON" in text for _, text in report.table_warnings)


def test_an_absolute_path_row_matches_whatever_spelling_the_root_was_given_in(tmp_path, monkeypatch):
    real = tmp_path / "real"
    a = _audio(real / "a.flac")
    (real / "metadata.csv").write_text(f"file_name,text\n{a},absolute row\n")
    (tmp_path / "link").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    for root in ("real", "./real", "link", str(tmp_path / "link")):
        out = tmp_path / f"out-{root.replace('/', '_')}"
        encode_folder(root, out, ToyEncoder())
        assert load_dataset(out).metadata(0)["prompt"] == "absolute row", root


def test_an_unclosed_quote_that_swallows_rows_is_named_and_an_absolute_file_under_a_relative_root_finds_its_table(
        tmp_path, monkeypatch):
    a, b = _audio(tmp_path / "a.flac"), _audio(tmp_path / "sub" / "b.flac")
    (tmp_path / "metadata.csv").write_text('file_name,caption\na.flac,"never closed\nsub/b.flac,next\n')
    md, warnings, _ = _lookup(a, tmp_path)
    assert "metadata.csv: line 2 a quoted cell runs into the next rows (an unclosed quote?)" in warnings
    (tmp_path / "metadata.csv").write_text('file_name,caption\na.flac,"two\nlines"\nsub/b.flac,next\n')
    assert _lookup(a, tmp_path)[1] == []  # a caption over two lines is fine
    monkeypatch.chdir(tmp_path.parent)
    assert _lookup(b, tmp_path.name)[0]["prompt"] == "next"  # b is absolute, the root relative


def test_prompts_from_embedded_tags_are_counted_in_the_caption_line(tmp_path):
    src = tmp_path / "src"
    tagged, _ = _audio(src / "tagged.flac"), _audio(src / "plain.flac")
    audio = mutagen.File(tagged)
    audio["prompt"] = "a tagged bell"
    audio.save()
    (src / "plain.txt").write_text("a sidecar bell")
    report = encode_folder(src, tmp_path / "out", ToyEncoder())
    assert report.captions == {"tags": 1, "txt": 1}
    assert "captions: 1 from .txt sidecars, 1 from embedded tags" in report.summary()


def test_the_table_cache_drops_the_least_recently_used_table_not_all(tmp_path, monkeypatch):
    monkeypatch.setattr(metadata_tables, "CACHE_TABLES", 3)
    monkeypatch.setattr(metadata_tables, "_CACHE", type(metadata_tables._CACHE)())
    parsed = []
    real = metadata_tables.parse_table
    monkeypatch.setattr(metadata_tables, "parse_table", lambda *a: parsed.append(a[0].parent.name) or real(*a))
    for name in "abcd":
        (tmp_path / name).mkdir()
        (tmp_path / name / "metadata.csv").write_text("file_name,text\nx.flac,take\n")
    for name in "abcab":  # a and b used again before d arrives: c is the least recently used
        metadata_tables.cached_table(tmp_path / name / "metadata.csv", {})
    metadata_tables.cached_table(tmp_path / "d" / "metadata.csv", {})
    for name in "abd":
        metadata_tables.cached_table(tmp_path / name / "metadata.csv", {})
    assert parsed == ["a", "b", "c", "d"]  # a, b and d stayed; only c left
