"""Head names: one spelling, written and read back."""

import pytest

from mechicl.data.names import head_name, parse_head, parse_heads
from mechicl.errors import ConfigError


def test_names_round_trip_for_every_head_of_a_model():
    heads = [(l, h) for l in range(24) for h in range(15)]
    assert [parse_head(head_name(l, h)) for l, h in heads] == heads


def test_parse_heads_reads_comma_and_space_separated_lists():
    assert parse_heads("L1H1,L0H2") == ((1, 1), (0, 2))
    assert parse_heads(" L10H3  L11H2, ") == ((10, 3), (11, 2))
    assert parse_heads("") == ()


@pytest.mark.parametrize("bad", ["L1", "H1L1", "l1h1", "L1H1x", "nan"])
def test_a_malformed_name_says_how_to_spell_it(bad):
    with pytest.raises(ConfigError, match="L<layer>H<head>"):
        parse_heads(bad)
