"""sa3/atomic.py's checks before long work: can files be written into a folder?"""

import subprocess
import sys

from sa3_lora_studio.sa3.atomic import writable_folder_problem
from unprivileged import unprivileged


def test_a_writable_folder_is_made_and_left_as_it_was(tmp_path):
    folder = tmp_path / "new" / "takes"
    assert writable_folder_problem(folder) is None
    assert folder.is_dir() and list(folder.iterdir()) == []  # the probe file is gone


def test_a_file_in_the_way_is_named(tmp_path):
    (tmp_path / "song.wav").write_bytes(b"x")
    assert writable_folder_problem(tmp_path / "song.wav" / "out") == f"{tmp_path / 'song.wav'} is a file, not a folder"


def test_a_read_only_folder_is_refused_with_the_reason(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    check = f"from sa3_lora_studio.sa3.atomic import writable_folder_problem as w; print(w({str(folder)!r}))"
    try:
        out = subprocess.run(unprivileged([sys.executable, "-c", check]), capture_output=True, text=True, check=True)
        assert out.stdout.strip() == f"cannot write into {folder}: Permission denied"
    finally:
        folder.chmod(0o755)
