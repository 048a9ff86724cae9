"""`sa3-lora generate`: the engine's generation from the command line, files and settings it writes, its errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from sa3_lora_studio import load_model
from sa3_lora_studio.cli import main
from sa3_lora_studio.generate_cli import output_paths, parse_lora
from sa3_lora_studio.sa3.generate import generate


def _lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def _pcm24(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, -1, 1 - 2**-23) * 2**23) / 2**23


@pytest.mark.filterwarnings("ignore:duration")
def test_a_batch_with_stacked_loras_is_the_engine_call_and_names_its_seed(fixtures_dir, tmp_path, capsys):
    lora, bora = fixtures_dir / "golden" / "lora" / "lora.safetensors", fixtures_dir / "golden" / "lora" / "bora.safetensors"
    args = [str(fixtures_dir / "tiny-small"), "--prompt", "a bell", "--duration", "0.02", "--steps", "3",
            "--lora", f"{lora}@0.7", "--lora", str(bora), "--lora-skip-first-steps", "1", "--batch", "2",
            "--device", "cpu", "--out", str(tmp_path / "takes" / "bell.wav")]
    assert main(["generate", *args]) == 0
    lines = _lines(capsys)
    assert [line["file"] for line in lines] == [str(tmp_path / "takes" / f"bell_{i}.wav") for i in range(2)]
    seed = lines[0]["seed"]
    assert seed >= 0 and lines[0]["steps"] == 3 and lines[0]["cfg"] == 7.0 and lines[0]["sampler"] == "euler"
    assert [(x["strength"], x["skip_first_steps"]) for x in lines[0]["loras"]] == [(0.7, 1), (1.0, 1)]
    model = load_model(fixtures_dir / "tiny-small")
    expected, rate = generate(model, "a bell", duration=0.02, seed=seed, steps=3, batch_size=2,
                              loras=[{"path": str(lora), "strength": 0.7, "skip_first_steps": 1},
                                     {"path": str(bora), "strength": 1.0, "skip_first_steps": 1}])
    for i, line in enumerate(lines):
        written, written_rate = sf.read(line["file"], dtype="float64", always_2d=True)
        assert written_rate == rate and sf.info(line["file"]).subtype == "PCM_24"
        np.testing.assert_allclose(written.T, _pcm24(expected[i].double().numpy()), atol=2**-22)
    assert not np.allclose(sf.read(lines[0]["file"])[0], sf.read(lines[1]["file"])[0])  # two different takes
    # the seed in the JSON lines makes the takes again
    assert main(["generate", *args[:-2], "--seed", str(seed), "--out", str(tmp_path / "again.flac")]) == 0
    for line, again in zip(lines, _lines(capsys)):
        assert again["file"].endswith(".flac") and sf.info(again["file"]).format == "FLAC"
        np.testing.assert_allclose(sf.read(again["file"])[0], sf.read(line["file"])[0], atol=2**-22)  # 24-bit LSB


@pytest.mark.filterwarnings("ignore:duration")
def test_inpainting_and_audio_to_audio_read_their_source_files(fixtures_dir, tmp_path, capsys):
    model = load_model(fixtures_dir / "tiny-small-arc")
    source = torch.zeros(2, 768).uniform_(-0.3, 0.3, generator=torch.Generator().manual_seed(0))
    sf.write(tmp_path / "source.wav", source.numpy().T, 44100, subtype="FLOAT")
    common = [str(fixtures_dir / "tiny-small-arc"), "--prompt", "rain", "--duration", "0.02", "--seed", "4",
              "--device", "cpu"]
    assert main(["generate", *common, "--inpaint", str(tmp_path / "source.wav"), "--regions", "0.005-0.01",
                 "--paste-back", "--out", str(tmp_path / "fixed.flac")]) == 0
    line = _lines(capsys)[0]
    assert line["regions"] == [[0.005, 0.01]] and line["paste_back"] and line["sampler"] == "pingpong"
    expected, _ = generate(model, "rain", duration=0.02, seed=4, inpaint_audio=(source, 44100),
                           inpaint_regions=[(0.005, 0.01)], paste_back=True)
    np.testing.assert_allclose(sf.read(line["file"], always_2d=True)[0].T, _pcm24(expected[0].double().numpy()),
                               atol=2**-22)
    assert main(["generate", *common, "--init-audio", str(tmp_path / "source.wav"), "--init-noise-level", "0.5",
                 "--out", str(tmp_path / "varied.wav")]) == 0
    line = _lines(capsys)[0]
    expected, _ = generate(model, "rain", duration=0.02, seed=4, init_audio=(source, 44100), init_noise_level=0.5)
    np.testing.assert_allclose(sf.read(line["file"], always_2d=True)[0].T, _pcm24(expected[0].double().numpy()),
                               atol=2**-22)


@pytest.mark.filterwarnings("ignore:duration")
def test_without_a_duration_a_source_gives_its_own_length_and_a_cut_source_is_named(fixtures_dir, tmp_path, capsys):
    """Repairing or varying a take keeps its length unless --duration says otherwise; a --duration shorter than the
    source says that only the start is used; extending needs the length to extend to."""
    source = torch.zeros(2, 529).uniform_(-0.3, 0.3, generator=torch.Generator().manual_seed(1))  # 0.012 s
    sf.write(tmp_path / "take.wav", source.numpy().T, 44100, subtype="FLOAT")
    common = [str(fixtures_dir / "tiny-small-arc"), "--prompt", "rain", "--seed", "4", "--device", "cpu"]
    for extra in (["--inpaint", str(tmp_path / "take.wav"), "--regions", "0.004-0.008"],
                  ["--init-audio", str(tmp_path / "take.wav")]):
        assert main(["generate", *common, *extra, "--out", str(tmp_path / "out.wav")]) == 0
        captured = capsys.readouterr()
        line = json.loads(captured.out.splitlines()[-1])
        assert line["duration"] == pytest.approx(529.5 / 44100) and line["seconds"] == 0.012, extra  # every sample
        assert sf.info(tmp_path / "out.wav").frames == 529
        assert "no --duration: the source's length, 0.012 s" in captured.err and "only its first" not in captured.err
        assert main(["generate", *common, *extra, "--duration", "0.006", "--out", str(tmp_path / "short.wav")]) == 0
        err = capsys.readouterr().err
        assert "lasts 0.012 s but the output 0.006 s: only its first 0.006 s are used" in err, extra
    assert main(["generate", *common, "--out", str(tmp_path / "t2a.wav"), "--duration", "0.012"]) == 0
    assert "only its first" not in capsys.readouterr().err  # text-to-audio has no source to cut
    assert main(["generate", *common, "--inpaint", str(tmp_path / "take.wav"), "--regions", "0.02-0.03"]) == 2
    assert ("--regions: region 0.02-0.03 s starts after the output's end, 0.012 s (the source's length: no duration "
            "was given); set regions inside the clip, or a duration to regenerate past its end") in capsys.readouterr().err
    assert main(["generate", *common, "--inpaint", str(tmp_path / "take.wav"), "--continue"]) == 2
    assert "--continue: continuing a clip needs the length to extend to: give a duration longer than the source's " \
           "0.012 s (--duration)" in capsys.readouterr().err


def test_bad_options_are_named_before_a_model_loads(fixtures_dir, tmp_path, capsys):
    model = str(fixtures_dir / "tiny-small")
    (tmp_path / "noise.wav").write_bytes(b"RIFF....WAVEjunk")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "pads-step=000010.safetensors").write_bytes(b"x")
    cases = [
        (["--lora", str(tmp_path / "run")], "--lora .*run is a folder; give a LoRA file, e.g. its newest: "
                                             ".*pads-step=000010.safetensors"),
        (["--lora", str(tmp_path / "run" / "checkpoints" / "") + "@0.5"], "is a folder; give a LoRA file, e.g."),
        (["--lora", str(fixtures_dir)], "is a folder; give a LoRA file \\(it holds no .safetensors\\)"),
        (["--regions", "1-2"], "--regions, --continue and --paste-back need --inpaint"),
        (["--inpaint", "x.wav"], "--inpaint needs --regions"),
        (["--inpaint", "x.wav", "--regions", "2-1"], "--regions: region '2-1': need 0 <= start < end"),
        (["--out", "a.ogg"], "--out a.ogg: the extension picks the format"),
        (["--lora", "nope.safetensors@0.5"], "--lora nope.safetensors: no such file"),
        (["--inpaint", str(tmp_path / "noise.wav"), "--continue"], "--inpaint .*noise.wav: not audio"),
        (["--inpaint", "x.wav", "--continue", "--regions", "0-1"], "--regions .* or --continue .*, not both"),
        (["--batch", "0"], "--batch 0: must be 1 or more"),
        (["--batch", "-2"], "--batch -2: must be 1 or more"),
        (["--duration", "0"], "--duration 0"),
        (["--lora-interval", "0.8", "0.2"], "--lora-interval 0.8 0.2: give LO HI"),
        (["--init-noise-level", "3"], "--init-noise-level 3"),
        (["--lora", str(tmp_path / "noise.wav") + "@abc"], "the strength after '@' must be a number"),
        (["--variant", "arc"], "--variant arc picks a pack's variant; .* is a model folder"),
        (["--prompts-file", str(tmp_path / "noise.wav")], "not both"),
        (["--loudness", "3"], r"--loudness 3.0: must be in \[-70, -1\] LUFS"),
        (["--loudness", "nan"], "--loudness nan"),
        (["--out", str(tmp_path / "noise.wav" / "take.flac")],
         r"--out .*take.flac: .*noise.wav is a file, not a folder"),  # said before sampling, not after it
    ]
    for extra, message in cases:
        assert main(["generate", model, "--prompt", "x", "--device", "cpu", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert __import__("re").search(message, err), (extra, err)
    assert parse_lora("C:/loras/x@y.safetensors") == {"path": "C:/loras/x@y.safetensors", "strength": 1.0}
    assert parse_lora("a@b.safetensors@-0.5") == {"path": "a@b.safetensors", "strength": -0.5}
    assert output_paths("out/take.mp3", 3)[0][2].name == "take_2.mp3"
    assert [[p.name for p in take] for take in output_paths("t.wav", 2, 2)] == [["t_p0_0.wav", "t_p0_1.wav"],
                                                                               ["t_p1_0.wav", "t_p1_1.wav"]]
    (tmp_path / "empty.txt").write_text("# nothing yet\n\n")
    for extra, message in ((["--prompts-file", str(tmp_path / "empty.txt")], "no prompts"),
                           (["--prompts-file", str(tmp_path / "missing.txt")], "--prompts-file .*missing.txt")):
        assert main(["generate", model, "--device", "cpu", *extra]) == 2
        assert __import__("re").search(message, capsys.readouterr().err)
    assert main(["generate", model, "--device", "cpu"]) == 2
    assert "give --prompt TEXT or --prompts-file FILE" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:duration")
def test_progress_goes_to_stderr_and_the_json_lines_alone_to_stdout(fixtures_dir, tmp_path, capsys):
    assert main(["generate", str(fixtures_dir / "tiny-small"), "--prompt", "x", "--duration", "0.02", "--steps", "20",
                 "--device", "cpu", "--out", str(tmp_path / "p.wav")]) == 0
    captured = capsys.readouterr()
    assert [json.loads(line)["steps"] for line in captured.out.splitlines()] == [20]
    assert "sampling: step 10/20" in captured.err and "sampling: step 20/20" in captured.err


@pytest.mark.filterwarnings("ignore:duration")
def test_a_prompts_file_renders_every_prompt_with_the_same_seed_and_settings(fixtures_dir, tmp_path, capsys):
    (tmp_path / "set.txt").write_text("\ufeff# evaluation set\na bell\n\n  rain on a roof  \n", encoding="utf-8")
    assert main(["generate", str(fixtures_dir / "tiny-small"), "--prompts-file", str(tmp_path / "set.txt"),
                 "--duration", "0.02", "--steps", "2", "--seed", "9", "--device", "cpu",
                 "--out", str(tmp_path / "eval.wav")]) == 0
    lines = _lines(capsys)
    assert [(x["prompt"], x["prompt_index"], x["seed"], Path(x["file"]).name) for x in lines] == [
        ("a bell", 0, 9, "eval_p0.wav"), ("rain on a roof", 1, 9, "eval_p1.wav")]
    model = load_model(fixtures_dir / "tiny-small")
    for line in lines:
        expected, _ = generate(model, line["prompt"], duration=0.02, seed=9, steps=2)
        np.testing.assert_allclose(sf.read(line["file"], always_2d=True)[0].T, _pcm24(expected[0].double().numpy()),
                                   atol=2**-22)


@pytest.mark.filterwarnings("ignore:duration")
def test_takes_at_a_loudness_are_the_takes_scaled_by_the_gain_they_name(fixtures_dir, tmp_path, capsys):
    from sa3_lora_studio.encoding.loudness import integrated_loudness

    args = [str(fixtures_dir / "tiny-small"), "--prompt", "a bell", "--duration", "0.02", "--steps", "2", "--seed",
            "5", "--batch", "2", "--device", "cpu"]
    assert main(["generate", *args, "--out", str(tmp_path / "raw.wav")]) == 0
    raw = _lines(capsys)
    assert main(["generate", *args, "--loudness", "-20", "--out", str(tmp_path / "even.wav")]) == 0
    even = _lines(capsys)
    for before, after in zip(raw, even):
        heard, rate = sf.read(after["file"], dtype="float64", always_2d=True)
        took, _ = sf.read(before["file"], dtype="float64", always_2d=True)
        assert after["loudness_lufs"] == pytest.approx(integrated_loudness(took.T, rate), abs=0.01)
        assert "loudness_lufs" not in before
        np.testing.assert_allclose(heard, _pcm24(took * 10 ** (after["gain_db"] / 20)), atol=2**-21)
        if "limited_by" not in after:
            assert integrated_loudness(heard.T, rate) == pytest.approx(-20, abs=0.05)
        else:
            assert integrated_loudness(heard.T, rate) < -20
