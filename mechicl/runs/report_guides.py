"""The one line under each `mechicl report` section title that tells a reader how to read it: what the numbers are,
their scale, and what each sign means. Kept apart from the sections so that a section's contents can change without
touching its guide; ``with_guides`` fails on a section that has none."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from mechicl.runs.report_headline import HOW_TO_READ as HEADLINE
from mechicl.viz.report_html import Section

GUIDES = {
    "Headline": HEADLINE,
    "Behaviour": (
        "How to read: accuracy (0 to 1, with 95% CIs) against the number of demonstrations k; a flipped-label "
        "curve above chance means the model follows the shown labels against its prior. In the tables, a − b is "
        "the mean paired difference between two scores (positive = a higher)."
    ),
    "Where the flip happens": (
        "How to read: depth runs left to right (0 = embeddings); each curve is the accuracy (0 to 1) of the label "
        "read off the residual stream at that depth, with default and flipped labels; the depth where they part is where the flipped "
        "labels become readable."
    ),
    "Who looks at labels": (
        "How to read: the maps are layer x head; a cell is the share (0 to 1) of a readout slot's attention on "
        "earlier label tokens (PM: on the labels of same-class demonstrations minus the others). Attention shows "
        "where a head looks, not what it carries; attribution (in logit difference) and the next section test that."
    ),
    "Who carries the label information causally": (
        "How to read: each cell is the share of the correct-vs-flipped logit difference restored by patching "
        "one component from the correct-label run into the flipped-label run: 0 = no change, 1 = fully "
        "restored, negative = pushed further towards the flipped labels."
    ),
    "Validation": (
        "How to read: an effect is the share of the correct-vs-flipped gap in P(true label) that ablating a head "
        "closes on held-out contexts (1 = all of it, negative = widened), beside the same for matched control "
        "heads; a head counts when its effect and head − controls both have 95% CIs above 0."
    ),
    "Prior vs context": (
        "How to read: shares of the correct-vs-flipped logit difference at the readout slot by the positions it "
        "arrives from (1 = all of it), per bin of the query's zero-shot log-odds for its true class; the share of "
        "flipped-label queries still answered with the true class (above 0.5 the prior wins); and where scaling a "
        "head's label signal makes half of them follow the labels. 95% CIs over contexts."
    ),
    "Circuit and findings": (
        "How to read: first each head's verdict across the grid's tasks and seeds (replicates = above its matched "
        "controls in at least 2/3 of the voting cells); then path effects between the headline heads: the share "
        "(1 = all) of the correct-vs-flipped logit difference that a sender head's output restores through one "
        "receiver's query, key or value input alone, with 95% CIs over held-out contexts."
    ),
    "Run facts": (
        "How to read: what ran, on what, and at what cost: a forward is one call of the model's last block; "
        "times are wall seconds on this machine."
    ),
}


def with_guides(sections: Sequence[Section]) -> list[Section]:
    """Each section with its guide line (a section without one in ``GUIDES`` is an error)."""
    missing = [s.title for s in sections if s.title not in GUIDES]
    if missing:
        raise ValueError(f"report sections without a how-to-read line in runs.report_guides.GUIDES: {missing}")
    return [dataclasses.replace(s, how_to_read=GUIDES[s.title]) for s in sections]
