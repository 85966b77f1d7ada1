"""What ``sample``, ``img2img`` and ``toy`` leave on disk, beyond their outputs (issue #17, points 1 and 6).

* No write follows a symlink someone else planted in a shared output folder: symlinks at the
  write-probe names, the output names and (made predictable here) the temporary names, all pointing
  at a victim file outside the folder, leave the victim's bytes unchanged.
* A failing command leaves no new output folder behind (nor the parents it created), and ``sample``
  removes the temporary files that killed writers left in its output folder.

The commands run in-process (``npdiffusion.cli.main``) on the tiny pipeline of ``pipeline_dummy``.
"""
import os

import pytest
from PIL import Image

from npdiffusion import cli
from npdiffusion.io import atomic
from pipeline_dummy import dummy_folder, gradient_png

VICTIM_BYTES = b"precious bytes that no npdiffusion command may touch\n"
TAG = "deadbeef"                 # the first random tag of every temporary name (see predictable_temp_names)
DEAD_PID = 2**22 + 12345         # above the default pid_max of 4194304: no such process


def run_cli(capsys, *args):
    code = cli.main([str(a) for a in args])
    _, err = capsys.readouterr()
    return code, err


@pytest.fixture(scope="module")
def input_image(tmp_path_factory):
    return gradient_png(tmp_path_factory.mktemp("img"), 16, 16)


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


PROBES = [".npdiffusion-write-test", f".npdiffusion-write-test-{os.getpid()}"]   # the old probe names


def plant(folder, names, victim):
    """A symlink to ``victim`` under each of ``names`` in ``folder``."""
    for name in names:
        os.symlink(victim, os.path.join(folder, name))


def planted_shared_folder(tmp_path, outputs):
    """``(victim, folder)``: a victim file and a folder "shared" whose write-probe names, ``outputs`` and
    the first temporary names of both are symlinks to the victim."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM_BYTES)
    out = tmp_path / "shared"
    out.mkdir()
    plant(out, PROBES + outputs + temp_names(outputs + ["npdiffusion-write-test"]), victim)
    return victim, out


def temp_names(names):
    return [f".{name}.{os.getpid()}.{TAG}.tmp" for name in names]


# ---------------------------------------------------------------------------------- point 1: symlinks
@pytest.mark.parametrize("command", ["sample", "img2img"])
def test_sample_and_img2img_follow_no_planted_symlink(tmp_path, capsys, input_image, predictable_temp_names,
                                                      command):
    outputs = ["00-00-a-cat.png", "grid.png"]
    victim, out = planted_shared_folder(tmp_path, outputs)
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
    outputs = ["losses.png", "losses.csv"]
    victim, out = planted_shared_folder(tmp_path, outputs)
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


# -------------------------------------------------------------------------------- point 6: leftovers
FAILING = [
    ("sample", ["--seed", str(10**30)], "seed must lie in"),
    ("sample", ["--noise", "numpy", "--seed", "-5"], "seed must be >= 0"),
    ("sample", ["--steps", "100000"], "num_inference_steps must be <="),
    ("sample", ["--steps", "0"], "--steps must be a positive int"),
    ("sample", ["--model", "/nonexistent/model"], "does not exist"),
    ("img2img", ["--seed", str(10**30)], "seed must lie in"),
    ("img2img", ["--noise", "numpy", "--seed", "-5"], "seed must be >= 0"),
    ("img2img", ["--strength", "2"], "--strength must lie in [0, 1]"),
    ("img2img", ["--model", "/nonexistent/model"], "does not exist"),
    ("toy", ["--lr", "1e30"], "the loss became"),
    ("toy", ["--steps", "0"], "--steps must be a positive int"),
]


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")         # toy --lr 1e30
@pytest.mark.parametrize("command, args, match", FAILING, ids=[f"{c} {' '.join(a)}" for c, a, _ in FAILING])
def test_a_failing_command_leaves_no_new_output_folder(tmp_path, capsys, input_image, command, args, match):
    out = tmp_path / "new" / "out"
    if command == "toy":
        flags, switches = {"--steps": "3", "--batch-size": "2", "--channels": "2"}, []
    else:
        flags = {"--model": dummy_folder(), "--prompt": "a cat", "--steps": "2", "--height": "16", "--width": "16"}
        flags.update({"--image": input_image} if command == "img2img" else {})
        switches = ["--no-progress"]
    flags.update(zip(args[::2], args[1::2]))
    flat = [x for kv in flags.items() for x in kv] + switches
    code, err = run_cli(capsys, command, *flat, "--out", out)
    assert code == 2, err
    assert match in err, err
    assert not (tmp_path / "new").exists()                # nor the parent it created
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
def test_a_failing_command_keeps_an_existing_output_folder(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    code, _ = run_cli(capsys, "toy", "--steps", 3, "--batch-size", 2, "--channels", 2, "--lr", 1e30, "--out", out)
    assert code == 2 and out.is_dir()


def test_sample_removes_stale_temp_files_of_dead_writers(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".x.png.{DEAD_PID}.0123abcd.tmp"
    stale.write_bytes(b"half a png")
    live = out / f".y.png.{os.getpid()}.0123abcd.tmp"      # a writer that still runs: kept
    live.write_bytes(b"being written")
    code, err = run_cli(capsys, "sample", "--model", dummy_folder(), "--prompt", "a cat", "--steps", 1, "--seed", 1,
                        "--height", 16, "--width", 16, "--out", out, "--no-progress")
    assert code == 0, err
    assert not stale.exists() and live.read_bytes() == b"being written"
    assert sorted(os.listdir(out)) == [live.name, "00-00-a-cat.png", "grid.png"]
