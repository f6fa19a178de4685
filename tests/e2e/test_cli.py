"""Flags declared once: the parser, the checks and the reference page derive from each program's flag table."""

import subprocess
import sys

import pytest

from tests.support.processes import ROOT


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("side", ["leader", "learner"])
def test_flags_are_parsed_and_a_misspelt_one_refused_before_torch_is_imported(side):
    done = run(
        f"import sys\nfrom federated.{side} import config\nconfig.command_line(['--threads', '1'])\n"
        "print('torch' in sys.modules)\nconfig.command_line(['--thraeds', '1'])"
    )
    assert done.stdout.strip() == "False" and done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == [
        f"{side}.py: error: unrecognized arguments: --thraeds 1 (did you mean --threads?)",
        f"{side}.py: see {side}.py --help",
    ]


def test_a_value_out_of_bounds_names_the_flag_and_the_bounds():
    done = run("from federated.leader import config\nconfig.command_line(['--momentum', '1.5'])")
    assert "argument --momentum: must be in [0, 1), got 1.5" in done.stderr and done.returncode == 2


def test_help_groups_the_flags_says_defaults_one_way_and_which_strategies_read_them():
    done = subprocess.run(
        [sys.executable, "leader.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    text = done.stdout
    assert done.returncode == 0
    for group in ("data:", "model:", "strategy:", "schedule:", "timeouts:", "output:", "security:", "examples:"):
        assert f"\n{group}" in text, group
    unwrapped = "".join(text.split())  # (help wraps lines at spaces and after hyphens)
    assert "servermomentum(default:0.5(0.9with--as-published))[onlywith--strategyfedavgm]" in unwrapped
    assert "one of fedsgd, fedavg, fedavgm, fedprox, fedadagrad, fedadam, fedyogi, scaffold" in " ".join(text.split())
    assert "default: None" not in text


def test_list_models_lists_the_architectures_model_takes():
    done = subprocess.run(
        [sys.executable, "leader.py", "--list-models"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    names = done.stdout.split()
    assert names[:2] == ["resnet20", "resnet18"] and "torchvision:mobilenet_v3_small" in names
