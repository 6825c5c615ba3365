"""The head-ablation modes by name, importable without torch: the CLI's ``--ablation`` choices and the presets.

``analysis.heads.ablation.MODES`` maps each name to the function that builds its replacement (a test checks that
the two agree). What each mode replaces a head's output with, at the readout slots:

- ``resample``: the same slot of another context of the same label condition;
- ``mean`` / ``mean_correct`` / ``mean_condition``: its mean over both conditions' / the correct-label / the same
  condition's contexts;
- ``zero``: zeros;
- ``interchange``: the same slot of the *other* label condition of the same context (correct <-> flipped), so only
  what the head carries about the shown labels changes.

Which mode finds planted heads is measured, not assumed: ``docs/results/finder_ground_truth.md``.
"""

ABLATION_MODES = ("resample", "mean", "mean_correct", "zero", "mean_condition", "interchange")
FINDINGS_DEFAULT = "interchange"  # every finder (findings, heads, report): the ground-truth benchmark's best mode
