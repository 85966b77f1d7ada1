"""CheckpointManager: a checkpoint appears complete under its final name or not at all, the latest pointer is
written after it, old ones are deleted only after a newer one is complete, stale temp folders are cleaned."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from npdiffusion.io.safetensors import load_file, save_file
from npdiffusion.training.checkpoint import STATE_FILE, CheckpointManager, prepare_output_dir


def writer(value, seen=None, out=None):
    """A write callback that saves one tensor and records what the output folder held meanwhile."""
    def write(folder):
        if seen is not None:
            seen.append((os.path.basename(folder), sorted(os.listdir(out))))
        save_file({"w": np.full(3, value, np.float32)}, os.path.join(folder, "weights.safetensors"))
    return write


def test_save_layout_pointer_and_state(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=3)
    path = m.save(10, writer(1.0), {"step": 10, "rng": {"state": 2 ** 100}})
    assert path == str(tmp_path / "checkpoint-10")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10", "latest"]
    assert sorted(os.listdir(path)) == [STATE_FILE, "weights.safetensors"]
    assert (tmp_path / "latest").read_text() == "checkpoint-10\n"
    assert m.read_state(path) == {"step": 10, "rng": {"state": 2 ** 100}}      # big ints survive JSON
    assert m.latest() == path and m.checkpoints() == [(10, path)]


def test_the_new_checkpoint_is_written_under_a_temp_name_and_old_ones_survive_until_it_is_complete(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2)
    seen = []
    for step in (1, 2, 3, 4):
        m.save(step, writer(float(step), seen, tmp_path), {"step": step})
    for step, (folder, listing) in zip((1, 2, 3, 4), seen):
        assert folder.startswith(f".checkpoint-{step}.") and folder.endswith(".tmp")
        assert f"checkpoint-{step}" not in listing                       # never under the final name early
        if step >= 3:   # both older checkpoints still there while the new one is written
            assert {f"checkpoint-{step - 2}", f"checkpoint-{step - 1}"} <= set(listing)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3", "checkpoint-4", "latest"]
    assert load_file(tmp_path / "checkpoint-4" / "weights.safetensors")["w"][0] == 4.0


def test_a_failing_write_leaves_everything_as_it_was(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=1)
    m.save(5, writer(5.0), {"step": 5})
    before = sorted(os.listdir(tmp_path))

    def broken(folder):
        writer(6.0)(folder)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        m.save(6, broken, {"step": 6})
    assert sorted(os.listdir(tmp_path)) == before
    assert m.latest() == str(tmp_path / "checkpoint-5")
    with pytest.raises(TypeError):          # a state that is not JSON: same, nothing changes
        m.save(7, writer(7.0), {"step": object()})
    assert sorted(os.listdir(tmp_path)) == before


def test_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=5)
    m.save(1, writer(1.0), {"step": 1})
    m.save(2, writer(2.0), {"step": 2})
    (tmp_path / "latest").write_text("garbage\n")
    assert m.latest() == str(tmp_path / "checkpoint-2")
    os.remove(tmp_path / "latest")
    os.makedirs(tmp_path / "checkpoint-9")              # no trainer_state.json: not a checkpoint
    assert m.latest() == str(tmp_path / "checkpoint-2")
    assert [s for s, _ in m.checkpoints()] == [1, 2]
    assert CheckpointManager(tmp_path / "empty").latest() is None


def test_saving_a_step_again_replaces_it(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2)
    m.save(3, writer(1.0), {"v": 1})
    m.save(3, writer(2.0), {"v": 2})
    assert m.read_state(m.latest()) == {"v": 2}
    assert load_file(tmp_path / "checkpoint-3" / "weights.safetensors")["w"][0] == 2.0
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3", "latest"]


def test_stale_temp_folders_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = [f".checkpoint-7.{dead}.0123abcd.tmp", f".trash-checkpoint-2.{dead}.89abcdef.tmp"]
    live = f".checkpoint-8.{os.getpid()}.fedcba98.tmp"
    for name in stale + [live]:
        os.makedirs(tmp_path / name / "sub")
    (tmp_path / f".latest.{dead}.00000000.tmp").write_text("half")
    m = CheckpointManager(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [live]
    assert m.latest() is None


def test_pruning_never_deletes_what_latest_names(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=1)
    m.save(10, writer(1.0), {})
    m.save(20, writer(2.0), {})
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-20", "latest"]
    os.makedirs(tmp_path / "checkpoint-30")                       # newer, but not what the pointer names
    (tmp_path / "checkpoint-30" / STATE_FILE).write_text("{}")
    assert m.prune() == []                                        # keeps the newest and the pointed-to one
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-20", "checkpoint-30", "latest"]
    assert json.loads((tmp_path / "checkpoint-20" / STATE_FILE).read_text()) == {}


def test_unwritable_output_dir_is_one_clear_os_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match=r"output_dir .*file/out' is not writable: Not a directory"):
        prepare_output_dir(tmp_path / "file" / "out")
    with pytest.raises(ValueError, match="output_dir is empty"):
        prepare_output_dir("")
    assert prepare_output_dir(tmp_path / "new" / "deep") == str(tmp_path / "new" / "deep")
    assert os.listdir(tmp_path / "new" / "deep") == []                  # the probe file is gone


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits; the not-a-folder case covers it")
def test_read_only_output_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OSError, match="is not writable: Permission denied"):
            prepare_output_dir(ro)
    finally:
        ro.chmod(0o700)
