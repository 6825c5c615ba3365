from __future__ import annotations

import pandas as pd

from mechicl.cli import main


def test_behavior_writes_every_output(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["behavior", "--model", "tiny", "--task", "toy", "--k-max", "3", "--n-contexts", "4",
               "--conditions", "default,random,flipped", "--out", str(out)])
    assert rc == 0
    for name in ["raw.csv", "summary.csv", "summary.md", "config.json", "accuracy.png", "log_likelihood.png", "entropy.png"]:
        assert (out / name).stat().st_size > 0, name
    s = pd.read_csv(out / "summary.csv")
    assert set(s.condition) == {"default", "random", "flipped"} and s.k.max() == 3
    assert "# Behaviour: tiny on toy" in (out / "summary.md").read_text()


def test_user_errors_exit_2(capsys, tmp_path):
    assert main(["behavior", "--model", "nope", "--task", "toy", "--out", str(tmp_path)]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["behavior", "--model", "tiny", "--task", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["behavior", "--model", "tiny", "--task", "toy", "--conditions", "default,upside-down"]) == 2
    assert "unknown label condition 'upside-down'" in capsys.readouterr().err


def test_list_commands(capsys):
    assert main(["models"]) == 0 and "smollm2-135m" in capsys.readouterr().out
    assert main(["tasks"]) == 0 and "vader-words" in capsys.readouterr().out


def test_file_task_with_integer_labels(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"w{i} w{i + 1},{i % 2}\n" for i in range(20)))
    out = tmp_path / "run"
    assert main(["behavior", "--model", "tiny", "--task", str(data), "--label-names", "negative,positive",
                 "--k-max", "2", "--n-contexts", "3", "--conditions", "default,flipped", "--out", str(out)]) == 0
    assert (out / "summary.csv").exists()
