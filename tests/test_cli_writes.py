"""What ``sample``, ``img2img`` and ``toy`` leave on disk, beyond their outputs (issue #17, points 1 and 6).

* No write follows a symlink someone else planted in a shared output folder: symlinks at the
  write-probe names, the output names and (made predictable here) the temporary names, all pointing
  at a victim file outside the folder, leave the victim's bytes unchanged.
* A failing command leaves no new output folder behind (nor the parents it created), and ``sample``
  removes the temporary files that killed writers left in its output folder.

The commands run in-process (``npdiffusion.cli.main``) on the tiny pipeline of ``pipeline_dummy``.
"""
import os

import numpy as np
import pytest
from PIL import Image

from npdiffusion import cli
from npdiffusion.io import atomic
from pipeline_dummy import dummy_folder

VICTIM_BYTES = b"precious bytes that no npdiffusion command may touch\n"
TAG = "deadbeef"                 # the first random tag of every temporary name (see predictable_temp_names)
DEAD_PID = 2**22 + 12345         # above the default pid_max of 4194304: no such process


def run_cli(capsys, *args):
    code = cli.main([str(a) for a in args])
    _, err = capsys.readouterr()
    return code, err


@pytest.fixture(scope="module")
def input_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "input.png"
    y, x = np.mgrid[0:16, 0:16]
    Image.fromarray(np.stack([x * 16, y * 16, (x + y) * 8], -1).astype(np.uint8)).save(path)
    return str(path)


@pytest.fixture
def predictable_temp_names(monkeypatch):
    """Every other random tag of ``io.atomic`` is ``TAG``: the first name each write tries is known in advance
    (and planted by the test); the retry gets a real random tag. Returns the list of tags handed out."""
    real, handed = atomic.secrets.token_hex, []

    class Secrets:
        @staticmethod
        def token_hex(n):
            handed.append(TAG if len(handed) % 2 == 0 else real(n))
            return handed[-1]

    monkeypatch.setattr(atomic, "secrets", Secrets)
    return handed


def plant(folder, names, victim):
    """A symlink to ``victim`` under each of ``names`` in ``folder``."""
    for name in names:
        os.symlink(victim, os.path.join(folder, name))


def temp_names(names):
    return [f".{name}.{os.getpid()}.{TAG}.tmp" for name in names]


PROBES = [".npdiffusion-write-test", f".npdiffusion-write-test-{os.getpid()}"]   # the old probe names


# ---------------------------------------------------------------------------------- point 1: symlinks
@pytest.mark.parametrize("command", ["sample", "img2img"])
def test_sample_and_img2img_follow_no_planted_symlink(tmp_path, capsys, input_image, predictable_temp_names,
                                                      command):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM_BYTES)
    out = tmp_path / "shared"
    out.mkdir()
    outputs = ["00-00-a-cat.png", "grid.png"]
    plant(out, PROBES + outputs + temp_names(outputs + ["npdiffusion-write-test"]), victim)
    extra = ["--image", input_image, "--strength", "0.5"] if command == "img2img" else []
    code, err = run_cli(capsys, command, "--model", dummy_folder(), "--prompt", "a cat", *extra, "--steps", 2,
                        "--seed", 1, "--height", 16, "--width", 16, "--out", out, "--overwrite", "--no-progress")
    assert victim.read_bytes() == VICTIM_BYTES, err
    assert code == 0, err
    for name in outputs:                                  # the links were replaced by the new files
        assert not os.path.islink(out / name)
        with Image.open(out / name) as im:
            assert im.format == "PNG"
    assert predictable_temp_names.count(TAG) >= 3         # the probe and both outputs first met a planted link


def test_toy_follows_no_planted_symlink(tmp_path, capsys, predictable_temp_names):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM_BYTES)
    out = tmp_path / "shared"
    out.mkdir()
    outputs = ["losses.png", "losses.csv"]
    plant(out, PROBES + outputs + temp_names(outputs + ["npdiffusion-write-test"]), victim)
    code, err = run_cli(capsys, "toy", "--steps", 3, "--batch-size", 2, "--channels", 2, "--out", out)
    assert victim.read_bytes() == VICTIM_BYTES, err
    assert code == 0, err
    assert not os.path.islink(out / "losses.csv")
    assert (out / "losses.csv").read_text().startswith("step,train_loss,heldout_loss\n")
    assert predictable_temp_names.count(TAG) >= 3


def test_check_writable_creates_only_a_fresh_file_and_removes_it(tmp_path, predictable_temp_names):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM_BYTES)
    out = tmp_path / "out"
    out.mkdir()
    plant(out, temp_names(["npdiffusion-write-test"]), victim)
    before = sorted(os.listdir(out))
    atomic.check_writable(out)
    assert sorted(os.listdir(out)) == before and victim.read_bytes() == VICTIM_BYTES


def test_atomic_write_gives_up_after_bounded_tries(tmp_path, monkeypatch):
    """A temporary name that always exists (a squatter on every name) is an OSError, not an endless loop."""
    monkeypatch.setattr(atomic, "secrets", type("S", (), {"token_hex": staticmethod(lambda n: TAG)}))
    (tmp_path / f".f.{os.getpid()}.{TAG}.tmp").write_bytes(b"")
    with pytest.raises(FileExistsError, match="f"):
        atomic.atomic_write_bytes(tmp_path / "f", b"x")
    assert not (tmp_path / "f").exists()
