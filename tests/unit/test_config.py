"""Flags declared once: the parser, the checks and the reference page derive from each program's flag table."""

import pytest

from federated.common import flags
from federated.leader.config import LeaderConfig
from federated.learner.config import LearnerConfig
from federated.tools import reference


def test_the_command_line_reference_is_what_the_flag_tables_say():
    assert reference.PAGE.read_text(encoding="utf-8") == reference.page(), (
        "docs/reference/cli.md is stale: run python -m federated.tools.reference"
    )


@pytest.mark.parametrize("config", [LeaderConfig, LearnerConfig])
def test_every_flag_has_help_a_group_and_a_default_that_satisfies_its_bounds(config):
    for field in flags.fields(config):
        assert field.flag.help and field.flag.group, field.name
        bounds, default = field.bounds(), field.default_value()
        assert default is None or bounds is None or bounds.holds(default), field.name


def test_local_epochs_says_which_shard_it_counts_passes_over_and_is_bounded():
    # (it once said "passes over its data each learner makes", false in the default federation mode)
    (field,) = [field for field in flags.fields(LeaderConfig) if field.name == "local_epochs"]
    assert "over the typical shard" in field.flag.help and "each learner's own shard" in field.flag.help
    assert not field.bounds().holds(1001)  # MAX_LOCAL_EPOCHS: what a learner takes
