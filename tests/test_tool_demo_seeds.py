"""tools/demo_seeds.py --quick on two seeds: one demo per seed (resumed, not rerun, when its report.json
exists), the time table has a row per seed, the accuracy table a row per seed and sampling plus the
min-max rows, and the spread it would write is the min and max over the seeds of the scores it read.
"""
import os
import sys

import pytest

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")


@pytest.fixture(scope="module")
def demo_seeds():
    sys.path.insert(0, TOOLS)
    import demo_seeds as tool

    return tool


def test_two_quick_seeds_give_both_tables(demo_seeds, tmp_path, capsys):
    argv = ["--quick", "--seeds", "0,1", "--work", str(tmp_path), "--prompts", "2", "--images-per-prompt", "1",
            "--steps", "2", "--processes", "1", "--guidance", "1,4", "--table", str(tmp_path / "t.md")]
    result = demo_seeds.run(argv)
    table = (tmp_path / "t.md").read_text()
    for seed in (0, 1):
        assert (tmp_path / f"seed-{seed}" / "report.json").is_file()
        assert f"\n| {seed} | 1 |" in table                                  # time row: seed, processes
    samplings = list(result["scores"]["seed 0"])
    assert len(samplings) == 2 + 3                                           # report's two + scales 1, 2, 4
    for sampling in samplings:
        assert table.count(f"| {sampling} |") == 3                           # two seeds and the min-max row
    spread = demo_seeds.spread(result["records"], result["scores"], 2)
    for sampling in samplings:
        joint = [result["scores"][f"seed {s}"][sampling]["joint"] for s in (0, 1)]
        assert spread["all_three"][sampling] == [min(joint), max(joint)]
    assert spread["seeds"] == [0, 1]
    capsys.readouterr()
    mtime = os.path.getmtime(tmp_path / "seed-0" / "report.json")
    demo_seeds.run(argv)                                                     # resumes: no demo rerun
    assert os.path.getmtime(tmp_path / "seed-0" / "report.json") == mtime
    assert "--no-progress" not in capsys.readouterr().out                    # the demo command it prints


def test_bad_seed_list_is_one_line(demo_seeds, capsys):
    with pytest.raises(SystemExit) as exc:
        demo_seeds.parse(["--seeds", "0,x"])
    assert exc.value.code == 2
