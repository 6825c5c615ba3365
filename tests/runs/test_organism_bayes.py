"""The model card's Bayes section: the ideal reader beside the measured curve, replaced rather than repeated."""

from __future__ import annotations

import shutil

import pandas as pd

from mechicl.data.optimal_reader import bayes_point
from mechicl.data.organism import LanguageConfig
from mechicl.models.organism import checkpoint_path
from mechicl.runs.organism import BAYES_HEADER, bayes_table, refresh_bayes_section


def test_bayes_table_puts_the_ideal_reader_beside_the_measurement():
    acc = pd.DataFrame(
        {
            "condition": ["flipped", "flipped"],
            "k": [1, 16],
            "mean": [0.4, 0.9],
            "ci_low": [0.3, 0.8],
            "ci_high": [0.5, 1.0],
        }
    )
    t = bayes_table(LanguageConfig(), acc)
    assert list(t["bayes_accuracy"]) == [0.0, 1.0]
    assert t["bayes_p"].iloc[1] == bayes_point(LanguageConfig(), "flipped", 16)[0]
    assert t["gap"].round(6).tolist() == [0.4, -0.1]


def test_refresh_replaces_the_section(tmp_path):
    ckpt = tmp_path / "strong.safetensors"
    shutil.copy(checkpoint_path("organism-strong"), ckpt)
    (tmp_path / "strong.md").write_text(f"# card\n\n{BAYES_HEADER}\nold table\n\n## Later\nkept\n")
    card = refresh_bayes_section(ckpt, n_contexts=16)
    text = card.read_text()
    assert text.count(BAYES_HEADER) == 1 and "old table" not in text and "## Later\nkept" in text
    assert "| flipped | 16 |" in text and (tmp_path / "strong.bayes.png").stat().st_size > 1000
