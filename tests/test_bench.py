"""The bench's structure, without running a figure: the registry, the command line's choices, the helper
subcommands and results.json's keys."""

import subprocess
import sys
from pathlib import Path

import pytest

from federated.tools.bench import cli, registry

ROOT = Path(__file__).resolve().parents[1]
KEYS = ["model_transfer_ratio", "round_overhead_ratio", "wire_bytes_ratio", "learner_throughput_ratio", "leader_scale",
        "serialization_gbps", "time_to_accuracy", "strategies", "non_iid", "links"]  # results.json's keys, as ever


def test_results_json_keeps_its_keys_and_figures_keep_their_names():
    assert [key for figure in registry.FIGURES for key in figure.result_keys] == KEYS
    assert [figure.name for figure in registry.FIGURES] == ["model_transfer_ratio", "round_overhead", "leader_scale",
                                                            "serialization_gbps", "time_to_accuracy", "strategies",
                                                            "non_iid", "links"]


def test_every_figure_binds_to_its_function():
    for figure in registry.FIGURES:
        assert figure.signature_problems() == []


def test_every_helper_subcommand_names_a_function():
    for helper in registry.HELPERS.values():
        assert callable(getattr(__import__(f"federated.tools.bench.{helper.group}", fromlist=["_"]), helper.function))


def chosen(*argv: str) -> list[str]:
    made = cli.parser()
    return [figure.name for figure in cli.chosen_figures(made.parse_args(list(argv)), made)]


def test_only_headline_and_all_choose_in_the_registrys_order():
    assert chosen() == chosen("--only") == [figure.name for figure in registry.FIGURES]
    assert chosen("--headline") == ["model_transfer_ratio", "round_overhead", "serialization_gbps", "time_to_accuracy"]
    assert chosen("--only", "links", "serialization_gbps") == ["serialization_gbps", "links"]
    assert chosen("--only", "wire_bytes_ratio") == ["round_overhead"]  # a results.json key names its figure


def test_an_unknown_figure_is_refused_with_the_list(capsys):
    with pytest.raises(SystemExit):
        chosen("--only", "round_overhed")
    assert "no figure round_overhed" in capsys.readouterr().err


def test_the_settings_keep_their_flags_and_defaults():
    args = cli.parser().parse_args([])
    assert (args.repeats, args.rounds, args.scale, args.strategy_epochs, args.non_iid_epochs, args.non_iid_dataset,
            args.out) == (5, 20, [1, 4, 16, 64], 3, 3, "synthetic", "bench")


def test_an_unknown_helper_subcommand_says_so():
    done = subprocess.run([sys.executable, "bench.py", "_nothing"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "no helper subcommand _nothing" in done.stderr


def test_help_lists_every_setting():
    output = subprocess.run([sys.executable, "bench.py", "--help"], check=True, cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
    assert all(setting.flag in output for setting in registry.SETTINGS)
    assert all(flag in output for flag in ("--out", "--only", "--headline", "--list"))
