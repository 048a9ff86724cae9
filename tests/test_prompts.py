"""Prompt composition: balance statistics, trigger percentage, shuffle, tag/path formatting, determinism by seed,
and preview == what a training step composes."""

import random
from collections import Counter

import pytest
from sa3_lora_studio.encoding.prompts import (
    PromptConfig,
    batch_prompts,
    compose,
    compose_prompt,
    preview_prompts,
    prompt_seed,
)

MD = {"prompt": "warm tape hiss, slow piano", "title": "Nocturne", "artist": "Ana", "genre": "ambient, jazz",
      "bpm": 72, "date": "1999", "mood": "calm", "file_stem": "nocturne", "folder": "piano/live",
      "seconds_total": 30, "padding_mask": [1, 1], "relpath": "piano/live/nocturne.flac"}
REL = "piano/live/nocturne.flac"
N = 4000


def _sources(cfg, md=MD, rel=REL, n=N):
    return Counter(compose(md, rel, cfg, s).source for s in range(n))


def test_balance_percentages_are_respected():
    cfg = PromptConfig(caption_weight=50, tags_weight=30, path_weight=0, fixed_weight=20, fixed_text="my style")
    counts = _sources(cfg)
    assert set(counts) == {"caption", "tags", "fixed"}
    for src, pct in (("caption", 50), ("tags", 30), ("fixed", 20)):
        assert abs(counts[src] / N - pct / 100) < 0.03, counts


def test_sources_without_text_for_a_file_share_out_their_weight():
    cfg = PromptConfig(caption_weight=50, tags_weight=50)
    counts = _sources(cfg, md={"title": "x"})
    assert counts == {"tags": N}


def test_fallback_avoids_unconditioned_prompts_unless_disabled():
    md = {"title": "Only a title"}
    assert compose_prompt(md, "a.wav", PromptConfig(), 0) == "Title: Only a title"  # caption weighted, none there
    assert compose_prompt(md, "a.wav", PromptConfig(fallback=False), 0) == ""
    assert compose_prompt({}, "dir/a.wav", PromptConfig(), 0) == "dir/a"


def test_trigger_word_is_prepended_to_the_given_percentage_and_never_replaces_the_caption():
    cfg = PromptConfig(trigger="zvq", trigger_percent=30, shuffle=False)
    results = [compose(MD, REL, cfg, s) for s in range(N)]
    frac = sum(r.triggered for r in results) / N
    assert abs(frac - 0.30) < 0.03
    for r in results:
        assert r.text == ("zvq, " + MD["prompt"] if r.triggered else MD["prompt"])
    assert all(compose(MD, REL, PromptConfig(trigger="zvq", trigger_percent=100), s).triggered for s in range(50))
    assert not any(compose(MD, REL, PromptConfig(trigger="zvq", trigger_percent=0), s).triggered for s in range(50))


def test_tags_are_key_value_parts_with_options():
    cfg = PromptConfig(caption_weight=0, tags_weight=1, shuffle=False, tag_subset_percent=0,
                       tag_keys=("title", "genre", "bpm", "date", "mood"))
    assert compose_prompt(MD, REL, cfg, 0) == "Title: Nocturne, Genre: ambient, jazz, BPM: 72, Year: 1999, Mood: calm"
    split = PromptConfig(**{**cfg.to_dict(), "split_commas": True, "hide_tag_names": True, "tag_keys": ("genre",)})
    assert compose_prompt(MD, REL, split, 0) == "ambient, jazz"
    spaced = PromptConfig(**{**cfg.to_dict(), "hide_commas": True, "hide_tag_names": True, "tag_keys": ("title", "bpm")})
    assert compose_prompt(MD, REL, spaced, 0) == "Nocturne 72"


def test_all_tag_keys_skip_reserved_and_path_fields():
    cfg = PromptConfig(caption_weight=0, tags_weight=1, shuffle=False, tag_subset_percent=0, tag_keys=None)
    text = compose_prompt(MD, REL, cfg, 0)
    assert "Mood: calm" in text and "Artist: Ana" in text
    for hidden in ("Seconds", "Padding", "Relpath", "File Stem", "Folder", "tape hiss"):
        assert hidden not in text


def test_tag_shuffle_and_subset_draw_permutations_and_subsets():
    tags = ("title", "artist", "genre", "bpm")
    shuffled = {compose_prompt(MD, REL, PromptConfig(caption_weight=0, tags_weight=1, tag_keys=tags,
                                                     tag_subset_percent=0), s) for s in range(200)}
    assert len(shuffled) == 24  # every order of the four parts appears
    assert all(len(t.split(", ")) == 5 for t in shuffled)  # "Genre: ambient, jazz" keeps its comma
    subsets = [compose(MD, REL, PromptConfig(caption_weight=0, tags_weight=1, tag_keys=tags,
                                             tag_subset_percent=100), s).parts for s in range(400)]
    sizes = Counter(len(p) for p in subsets)
    assert set(sizes) == {1, 2, 3, 4}


def test_caption_shuffle_only_when_asked():
    same = {compose_prompt(MD, REL, PromptConfig(), s) for s in range(50)}
    assert same == {MD["prompt"]}
    shuffled = {compose_prompt(MD, REL, PromptConfig(shuffle_captions=True), s) for s in range(50)}
    assert shuffled == {"warm tape hiss, slow piano", "slow piano, warm tape hiss"}


@pytest.mark.parametrize("opts,expected", [
    ({}, "piano/live/nocturne"),
    ({"hide_extension": False}, "piano/live/nocturne.flac"),
    ({"hide_directories": True}, "nocturne"),
    ({"hide_top_folder": True}, "live/nocturne"),
])
def test_path_prompts_hide_what_is_asked(opts, expected):
    cfg = PromptConfig(caption_weight=0, path_weight=1, **opts)
    assert compose_prompt(MD, REL, cfg, 0) == expected


def test_a_name_that_was_not_utf8_reads_as_its_letters_in_a_path_prompt_not_as_a_folder():
    """Relpaths spell such name bytes `\\xNN` (lossless); a prompt reads them as Windows-1252, the usual origin."""
    import os

    from sa3_lora_studio.encoding.captions import name_text

    relpath = "old/" + name_text(os.fsdecode(b"caf\xe9 latin1 name.wav"))
    assert relpath == "old/caf\\xe9 latin1 name.wav"
    cfg = PromptConfig(caption_weight=0, path_weight=1)
    assert compose_prompt({}, relpath, cfg, 0) == "old/café latin1 name"
    assert compose_prompt({}, "win\\drums\\kick.wav", cfg, 0) == "win/drums/kick"  # a Windows relpath still splits
    assert compose_prompt({}, "set/a\\x81b.wav", cfg, 0) == "set/ab"  # no control character from an odd byte


def test_same_seed_same_prompt_and_seeds_differ():
    cfg = PromptConfig(caption_weight=1, tags_weight=1, trigger="sks", trigger_percent=50, tag_keys=None)
    a = [compose_prompt(MD, REL, cfg, s) for s in range(100)]
    b = [compose_prompt(dict(MD), REL, cfg, s) for s in range(100)]
    assert a == b and len(set(a)) > 10
    rng1, rng2 = random.Random(5), random.Random(5)
    assert [compose_prompt(MD, REL, cfg, rng1) for _ in range(20)] == [compose_prompt(MD, REL, cfg, rng2)
                                                                       for _ in range(20)]


def test_preview_with_a_seed_equals_what_that_training_step_composes():
    items = [(f"d/{i}.wav", {"title": f"t{i}", "genre": "rock, pop", "prompt": f"caption {i}"}) for i in range(5)]
    cfg = PromptConfig(caption_weight=40, tags_weight=40, path_weight=20, trigger="ohwx", trigger_percent=50)
    for run_seed, step in ((0, 0), (3, 17), (42, 999)):
        preview = preview_prompts(items, cfg, prompt_seed(run_seed, step), n=len(items))
        batch = batch_prompts(items, range(len(items)), cfg, run_seed, step)
        assert [row["prompt"] for row in preview] == batch
        assert [row["relpath"] for row in preview] == [r for r, _ in items]


def test_config_checks_and_round_trips():
    with pytest.raises(ValueError, match="trigger_percent"):
        PromptConfig(trigger_percent=120)
    with pytest.raises(ValueError, match="negative"):
        PromptConfig(tags_weight=-1)
    cfg = PromptConfig(tags_weight=20, tag_keys=("genre",), trigger="x", trigger_percent=10)
    assert PromptConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        PromptConfig.from_dict({"colour": "red"})


def test_placeholder_values_from_spreadsheets_are_no_prompt_text():
    metadata = {"prompt": "NaN", "bpm": "nan", "genre": ["ambient", "N/A"], "mood": "None", "key": "null", "a": "x"}
    cfg = PromptConfig(caption_weight=1, tags_weight=0, tag_keys=None, fallback=True)
    assert compose_prompt(metadata, "set/take.wav", cfg, 0) == "Genre: ambient, A: x"  # no caption: the tags
    assert compose_prompt({"prompt": "Nan bread sizzling"}, "t.wav", cfg, 0) == "Nan bread sizzling"  # only whole
