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


def test_written_files_get_the_mode_open_gives_so_other_users_can_read_a_lora():
    """mkstemp and safetensors' writer make 0600 files: a LoRA another account (a ComfyUI service, a share) could
    not read. Checked in a child with a known umask, through both atomic writers and a training checkpoint's, in a
    folder every user may enter; where this runs as root, `nobody` then reads the LoRA (root itself, without its
    override, still owns the file and would read it at 0600 too, so another uid is what tells)."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    shared = Path(tempfile.mkdtemp(prefix="sa3-mode-", dir="/tmp"))
    shared.chmod(0o755)
    script = f"""
import os, stat, torch
os.umask(0o022)
from pathlib import Path
from sa3_lora_studio.sa3.atomic import atomic_write, fsync_replace
from sa3_lora_studio.adapters import new_adapter, write_adapter_file
root = Path({str(shared)!r})
atomic_write(root / "config.json", "{{}}")
lora = new_adapter(torch.nn.Sequential(torch.nn.Linear(4, 4)), "lora", 2)
write_adapter_file(root / ".x.tmp", lora)
fsync_replace(root / ".x.tmp", root / "x-step=000001.safetensors")
print(*(oct(stat.S_IMODE((root / n).stat().st_mode)) for n in ("config.json", "x-step=000001.safetensors")))
"""
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["0o644", "0o644"]
        if os.geteuid() == 0 and shutil.which("setpriv"):
            nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
            shown = subprocess.run(nobody + ["cat", str(shared / "x-step=000001.safetensors")], capture_output=True)
            assert shown.returncode == 0, shown.stderr
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_a_lock_that_deletes_its_file_on_release_still_lets_one_holder_in_at_a_time(tmp_path):
    """file_lock(remove=True): a waiter that locked the file its holder just deleted must not hold the lock beside a
    newcomer who locked the new file at the same path (flock locks open files, so separate opens in threads contend
    as separate processes do)."""
    import threading
    import time

    from sa3_lora_studio.sa3.atomic import file_lock

    path, inside, most, errors = tmp_path / ".encode.lock", [0], [0], []
    count_lock = threading.Lock()

    def worker() -> None:
        try:
            for _ in range(150):
                with file_lock(path, remove=True):
                    with count_lock:
                        inside[0] += 1
                        most[0] = max(most[0], inside[0])
                    time.sleep(0.0002)
                    with count_lock:
                        inside[0] -= 1
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and most[0] == 1
    assert not path.exists()  # the last holder deleted it
