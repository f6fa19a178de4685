"""The bench's structure, without running a figure: the registry, the command line's choices, the helper
subcommands, results.json's keys, and the results page written from it."""

import dataclasses
import json
from pathlib import Path

import pytest

from federated.tools.bench import cli, defaults, page, recorded, registry
from federated.tools.bench.common import compress_flags
from federated.tools.bench.compression import codec_pairs, group_rows, pair_cpu_ms
from federated.tools.bench.federations import Progress
from federated.tools.bench.links import LinkRun, link_row
from federated.tools.bench.non_iid import partition_table
from federated.tools.bench.rounds import (
    RoundRuns,
    overhead_ratio,
    throughput_ratio,
    wire_bytes_ratio,
)
from federated.tools.bench.strategies import accuracy_by_bytes, strategy_table

KEYS = [
    "model_transfer_ratio",
    "round_overhead_ratio",
    "wire_bytes_ratio",
    "learner_throughput_ratio",
    "leader_scale",
    "virtual_scale",
    "serialization_gbps",
    "time_to_accuracy",
    "strategies",
    "non_iid",
    "norms",
    "defaults",
    "links",
    "secagg_overhead",
    "secagg_accuracy",
    "dp_accuracy",
    "codec_costs",
    "compression",
    "compression_links",
]  # results.json's keys, as ever


def test_results_json_keeps_its_keys_and_figures_keep_their_names():
    assert [key for figure in registry.FIGURES for key in figure.result_keys] == KEYS
    assert [figure.name for figure in registry.FIGURES] == [
        "model_transfer_ratio",
        "round_overhead",
        "leader_scale",
        "scale",
        "serialization_gbps",
        "time_to_accuracy",
        "strategies",
        "non_iid",
        "norms",
        "defaults",
        "links",
        "secagg_overhead",
        "secagg_accuracy",
        "dp_accuracy",
        "codec_costs",
        "compression",
        "compression_links",
    ]


def test_every_figure_binds_to_its_function_and_has_its_page_rows():
    for figure in registry.FIGURES:
        assert figure.signature_problems() == []
        assert figure.name in page.RENDER and figure.name in page.HEADERS and figure.name in recorded.RECORDED
        assert all(len(row) == len(page.HEADERS[figure.name]) for row in recorded.RECORDED[figure.name].rows)


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
    assert (
        args.repeats,
        args.rounds,
        args.scale,
        args.strategy_epochs,
        args.non_iid_epochs,
        args.non_iid_dataset,
        args.norm_epochs,
        args.norm_image_size,
        args.out,
    ) == (5, 20, [1, 4, 16, 64], 3, 50, "digits", 20, 8, "bench")


def spread(*values: float) -> dict:
    return {"median": sorted(values)[len(values) // 2], "min": min(values), "max": max(values), "n": len(values)}


def measured() -> dict:
    return {
        "date": "2026-12-05T04:50:00+00:00",
        "seconds": 300.0,
        "command": "python bench.py --headline",
        "machine": {
            "cpu": "Some CPU",
            "cores": 2,
            "available_cores": 2,
            "python": "3.11.7",
            "torch": "2.14.1",
            "grpcio": "1.85.1",
        },
        "load_at_start": [1.5, 1.2, 1.0],
        "load_at_end": [2.5, 1.8, 1.2],
    }


def round_results() -> dict:
    records = [
        {
            "round": r,
            "seconds": 0.25,
            "bytes_in": 2_200_000,
            "bytes_out": 2_200_000,
            "learners": 2,
            "gradients_s": 0.2,
            "step_s": 0.005,
            "push_s": 0.005,
            "train_loss": 1.0,
        }
        for r in range(1, 21)
    ]
    taken = RoundRuns(
        [0.2, 0.21],
        [0.25] * 17,
        records,
        [Progress(5, 300.0, 0.02), Progress(10, 310.0, 0.03)],
        [(r, 1000 * r) for r in range(21)],
    )
    coscheduled = spread(0.22, 0.23)
    return {
        "round_overhead_ratio": overhead_ratio(taken, coscheduled, 1, 3),
        "wire_bytes_ratio": wire_bytes_ratio(taken, 20),
        "learner_throughput_ratio": throughput_ratio(taken, coscheduled),
    }


def strategy_results(tmp_path: Path) -> dict:
    runs = {
        name: [
            {"round": 1, "test_accuracy": 0.5},
            {"round": 1, "train_loss": 1.0, "seconds": 2.0, "bytes_in": 1e6, "bytes_out": 1e6},
            {"round": 2, "test_accuracy": accuracy},
            {"round": 2, "train_loss": 1.0, "seconds": 2.0, "bytes_in": 1e6, "bytes_out": 1e6},
        ]
        for name, accuracy in (("fedsgd", 0.95), ("fedavg", 0.6))
    }
    return {
        **strategy_table(runs, 0.9, tmp_path / "strategies.png"),
        "epochs": 3,
        "fedavg_round_s": 20.1,
        "local_epoch_compute_s": 19.3,
        "fedavg_round_vs_compute": 1.04,
    }


def non_iid_curves() -> dict[str, list]:
    """Four rounds of each strategy as metrics records make them: (MB a round, test accuracy after each round)."""
    made_up = {
        "fedsgd": (3, (0.4, 0.6, 0.9, 0.97)),
        "fedavg": (1, (0.5, 0.7, 0.82, 0.85)),
        "fedprox": (1, (0.5, 0.7, 0.75, 0.79)),
        "scaffold": (2, (0.6, 0.81, 0.9, 0.95)),
    }
    return {
        name: accuracy_by_bytes(
            [
                record
                for round_index, accuracy in enumerate(accuracies, 1)
                for record in (
                    {"round": round_index, "test_accuracy": accuracy},
                    {
                        "round": round_index,
                        "train_loss": 1.0,
                        "seconds": 1.0,
                        "bytes_in": mb / 2 * 1e6,
                        "bytes_out": mb / 2 * 1e6,
                    },
                )
            ]
        )
        for name, (mb, accuracies) in made_up.items()
    }


def test_the_defaults_sweep_reruns_its_rows_with_the_batch_norm_they_were_measured_with(tmp_path, monkeypatch):
    runs = []

    def federation_run(out, learners, leader_flags):
        runs.append(leader_flags)
        return [{"test_accuracy": 0.9}], None

    monkeypatch.setattr(defaults, "federation_run", federation_run)
    rows = defaults.defaults_sweep(tmp_path)["value"]
    assert len(runs) == len(rows) == len(defaults.SWEEP) + len(defaults.CONFIRMED) * len(defaults.DIGITS_PARTITIONS)
    assert all(flags[flags.index("--norm") + 1] == "batch" for flags in runs)  # not auto's renorm under skew


def test_the_non_iid_table_reads_each_run_at_its_end_and_at_the_cheapest_runs_megabytes():
    row = partition_table(non_iid_curves(), 0.8)
    assert row["budget_mb"] == 4.0  # FedAvg's and FedProx's 4 rounds of 1 MB
    at_end = {name: row[name]["at_end"] for name in ("fedsgd", "fedavg", "fedprox", "scaffold")}
    assert [(cell["accuracy"], cell["rounds_to_target"], cell["mb_to_target"]) for cell in at_end.values()] == [
        (0.97, 3, 9.0),
        (0.85, 3, 3.0),
        (0.79, None, None),
        (0.95, 2, 4.0),
    ]
    at_budget = {name: row[name]["at_budget"] for name in at_end}
    assert at_budget["fedavg"] == at_end["fedavg"]  # the cheapest run is read whole
    assert at_budget["scaffold"] == {
        "accuracy": 0.81,
        "rounds": 2,
        "mb": 4.0,
        "rounds_to_target": 2,
        "mb_to_target": 4.0,
    }
    assert at_budget["fedsgd"] == {
        "accuracy": 0.4,
        "rounds": 1,
        "mb": 3.0,
        "rounds_to_target": None,
        "mb_to_target": None,
    }


def compression_records(up: float, down: float, accuracies: tuple[float, ...], seconds: float = 0.1) -> list[dict]:
    """A run of two learners as metrics.jsonl records it: a round's bytes (both learners) and an evaluation after
    each round, its record before the round's."""
    return [
        record
        for round_index, accuracy in enumerate(accuracies, 1)
        for record in (
            {"round": round_index, "test_accuracy": accuracy},
            {
                "round": round_index,
                "train_loss": 1.0,
                "seconds": seconds,
                "learners": 2,
                "bytes_in": 2 * up,
                "bytes_out": 2 * down * (4 if round_index == 1 else 1),  # a full state first, then deltas
            },
        )
    ]


CODEC_COSTS = {
    "topk": {"bytes": 36_824, "ratio": 29.4, "encode_ms": 3.0, "decode_ms": 1.0},
    "int4": {"bytes": 151_068, "ratio": 7.2, "encode_ms": 2.0, "decode_ms": 2.0},
}


def compression_groups() -> dict:
    """One strategy and dataset's rows: uncompressed, and top-k up with int4 down."""
    runs = {
        "none / none": [compression_records(1e6, 1e6, (0.3, 0.6, 0.85, 0.9))],
        "topk / int4": [compression_records(5e4, 2.5e5, (0.2, 0.5, 0.7, 0.85), seconds=0.2)],
    }
    return {"fedsgd, synthetic iid": group_rows(runs, {label: pair_cpu_ms(CODEC_COSTS, label) for label in runs})}


def test_the_compression_table_reads_bytes_per_learner_round_accuracy_and_the_share_of_the_uncompressed_runs():
    rows = compression_groups()["fedsgd, synthetic iid"]
    base, topk = rows["none / none"], rows["topk / int4"]
    assert (base["up_bytes"], base["down_bytes"]) == (1e6, 1.75e6)  # the mean of (4 + 1 + 1 + 1) MB down
    assert (topk["up_bytes"], topk["down_bytes"]) == (5e4, 4.375e5)
    assert (topk["up_fewer"], topk["down_fewer"]) == (20.0, 4.0)
    assert base["rounds_to_share"] == 3 and base["mb_to_share"] == pytest.approx(3 * 2 + (8 + 2 + 2))  # both ways
    assert topk["rounds_to_share"] == 4  # 0.85 ≥ 0.9 × 0.9 first after the last round
    assert topk["accuracy"] == 0.85 and topk["accuracy_change"] == pytest.approx(-0.05)
    assert topk["codec_ms"] == 8.0 and topk["codec_share"] == pytest.approx(0.04)  # 8 ms of a 0.2 s round
    assert base["codec_ms"] == 0.0


def test_a_codec_that_never_reaches_the_share_reads_none():
    runs = {
        "none / none": [compression_records(1e6, 1e6, (0.5, 0.9))],
        "sign / none": [compression_records(5e4, 1e6, (0.3, 0.8))],
    }
    row = group_rows(runs, dict.fromkeys(runs, 0.0))["sign / none"]
    assert row["rounds_to_share"] is None and row["mb_to_share"] is None and row["accuracy"] == 0.8


def test_a_rows_accuracy_is_the_mean_over_its_seeds_and_reads_against_the_uncompressed_rows_mean():
    runs = {
        "none / none": [compression_records(1e6, 1e6, (0.5, accuracy)) for accuracy in (0.9, 0.8, 0.85)],
        "sign / none": [compression_records(5e4, 1e6, (0.3, accuracy)) for accuracy in (0.88, 0.8, 0.84)],
    }
    rows = group_rows(runs, dict.fromkeys(runs, 0.0))
    assert rows["none / none"]["accuracy"] == pytest.approx(0.85) and rows["none / none"][
        "accuracy_sd"
    ] == pytest.approx(0.05)
    assert rows["sign / none"]["accuracies"] == [0.88, 0.8, 0.84]
    assert rows["sign / none"]["accuracy_change"] == pytest.approx(-0.01)  # 0.84 against 0.85, not the first seeds'
    assert rows["sign / none"]["rounds_to_share"] == 2  # the first seed's curve: 0.88 >= 0.9 x 0.85


def test_each_compression_row_is_run_with_its_codecs_flags():
    assert compress_flags("none") == []
    assert compress_flags("powersgd rank 4", "int4") == [
        "--compress",
        "powersgd",
        "--compress-ratio",
        "0.01",
        "--compress-rank",
        "4",
        "--compress-down",
        "int4",
    ]
    assert compress_flags("none", "int4") == ["--compress-down", "int4"]
    assert codec_pairs(("none", "topk"), "int4", with_down_alone=True) == [
        ("none", "none"),
        ("none", "int4"),
        ("topk", "int4"),
    ]
    assert codec_pairs(("none", "topk"), "none", with_down_alone=True) == [("none", "none"), ("topk", "none")]
    plain = LinkRun("resnet18", 32, 4, 1)
    assert plain.name == "resnet18 fedsgd float32" and "--compress" not in plain.leader_args()  # links' keys stay
    compressed = LinkRun("resnet18", 32, 4, 1, codecs=("topk", "int4"))
    assert compressed.name == "resnet18 fedsgd float32 topk / int4"
    flags = compress_flags("topk", "int4")
    assert compressed.leader_args()[-len(flags) :] == flags


def every_figure(tmp_path: Path) -> dict:
    """A results.json with every key, in the shapes the figures write."""
    transfer_steps = {
        "raw_grpc": 0.03,
        "our_stream": 0.031,
        "plus_copy_into_place": 0.035,
        "plus_finite_check_and_load": 0.04,
    }
    scale_row = {
        "rounds_per_s": 50.0,
        "round_s": spread(0.02, 0.03),
        "leader_peak_rss_mb": 1500.0,
        "leader_peak_anon_mb": 900.0,
        "anon_before_rounds_mb": 899.0,
        "anon_growth_in_rounds_mb": 1.0,
    }
    records = [
        {"round": r, "seconds": 0.8, "bytes_in": 2_180_000, "bytes_out": 2_190_000, "learners": 2, "step_s": 0.005}
        for r in range(2, 10)
    ]
    results = {
        "model_transfer_ratio": {
            "value": 0.75,
            "bytes": 44_745_416,
            "ours_s": spread(0.04),
            "raw_grpc_s": spread(0.03),
            "steps_median_s": transfer_steps,
            "raw_best_chunk": 1 << 20,
            "ours_gbps": 1.1,
            "raw_grpc_gbps": 1.5,
            "raw_tcp_gbps": 5.0,
            "raw_grpc_by_chunk_gbps": {"262144": 1.2, "1048576": 1.5, "4194304": 1.4},
        },
        **round_results(),
        "leader_scale": {
            "value": {"1": scale_row, "64": scale_row},
            "model_mb": 1.03,
            "rss_growth_mb": 0.0,
            "anon_growth_mb": 0.0,
            "anon_growth_in_rounds_mb": 0.0,
            "rss_growth_limit_mb": 99.0,
            "round_time_growth": 1.0,
            "learner_growth": 64.0,
        },
        "virtual_scale": {
            "value": 1.1,
            "update_s": 0.5 / 1.1 / 20,
            "image_size": 8,
            "rows": {"100:10": virtual_run(100, 10, 1)},
            "goal": virtual_run(1000, 20, 1),
            "processes": virtual_run(10, 10, 10),
            "pooled": virtual_run(10, 10, 1),
        },
        "serialization_gbps": {
            "value": {name: {"encode_gbps": 2.0, "decode_gbps": 5.0} for name in ("ours", "safetensors", "torch_save")},
            "bytes": 44_734_408,
        },
        "time_to_accuracy": {"value": None, "federated_s": None, "centralised_s": 17.2, "target": 0.9},
        "strategies": strategy_results(tmp_path),
        "non_iid": {
            "value": {"iid": partition_table(non_iid_curves(), 0.8)},
            "target": 0.8,
            "learners": 10,
            "epochs": 4,
            "dataset": "digits",
            "flags": "--norm batch",
            "plot": str(tmp_path / "non_iid.png"),
        },
        "norms": {
            "value": {"batch": {"iid": 0.96, "dirichlet 0.1": 0.88, "skew_cost": 0.08}},
            "learners": 4,
            "epochs": 20,
            "image_size": 8,
            "dataset": "digits",
        },
        "defaults": {
            "value": [{"setting": "synthetic", "strategy": "fedadam", "flags": "", "final_accuracy": 0.97}],
            "synthetic_flags": "--dataset synthetic",
            "digits_flags": "--dataset digits",
            "learners": 2,
        },
        "links": {
            "value": {
                "resnet20 fedsgd float32 @ 100mbit": link_row(records, dict.fromkeys(range(2, 10), 0.5), 100_000_000)
            }
        },
        "secagg_overhead": {
            "value": {"bytes_ratio": 1.01, "seconds_ratio": 1.2},
            "by_learners": {
                "3": {
                    "plain": {"bytes_per_round": 6_500_000, "round_s": spread(0.5)},
                    "secure": {"bytes_per_round": 6_600_000, "round_s": spread(0.6)},
                    "bytes_ratio": 1.01,
                    "seconds_ratio": 1.2,
                }
            },
            "rounds": 10,
            "image_size": 16,
        },
        "secagg_accuracy": {
            "value": 0.004,
            "plain": 0.95,
            "secure": 0.946,
            "learners": 5,
            "epochs": 10,
            "image_size": 16,
        },
        "dp_accuracy": {
            "value": {
                "digits": {
                    "none": {"accuracy": 0.9, "epsilon_spent": None},
                    "central": {
                        "1.0": {"accuracy": 0.5, "epsilon_spent": 0.98},
                        "3.0": {"accuracy": None, "epsilon_spent": None, "stopped": "5 rounds in a row were discarded"},
                    },
                }
            },
            "learners": 10,
            "epochs": 10,
            "image_size": 16,
            "delta": 1e-5,
        },
        "codec_costs": {
            "value": {"topk": {"bytes": 32_632, "ratio": 33.2, "encode_ms": 8.7, "decode_ms": 1.0}},
            "values": 271_098,
            "ratio": 0.01,
            "threads": 1,
        },
        "compression": {
            "value": compression_groups(),
            "share": 0.9,
            "rounds": 200,
            "local_steps": 10,
            "learners": 2,
            "down": "int4",
            "flags": "--image-size 16",
            "learner_flags": "--threads 1",
            "ratio": 0.01,
            "codec_costs": CODEC_COSTS,
            "plot": str(tmp_path / "compression.png"),
        },
        "compression_links": {
            "value": {
                "resnet18 fedsgd float32 topk / int4 @ 100mbit": {
                    **link_row(records, dict.fromkeys(range(2, 10), 0.5), 100_000_000),
                    "round_vs_compute": 1.6,
                }
            },
            "ratio": 0.01,
        },
    }
    assert list(results) == KEYS
    return {key: {**value, "measured": measured()} for key, value in results.items()}


def virtual_run(registered: int, per_round: int, processes: int) -> dict:
    """A row of virtual_scale: a round of 20 drawn learners takes 1.1 times their compute."""
    return {
        "registered": registered,
        "per_round": per_round,
        "processes": processes,
        "registration_s": 12.0,
        "rounds_per_s": 2.0,
        "round_s": 0.5,
        "compute_s": 0.5 / 1.1 * per_round / 20,
        "update_s": None,
        "bytes_per_round": 4.4e7,
        "leader_peak_rss_mb": 1100.0,
        "learners_peak_rss_mb": 900.0,
    }


def test_the_page_dates_every_figure_measured_and_marks_the_others_hand_recorded(tmp_path):
    results = every_figure(tmp_path)
    written = page.render(results)
    assert page.HAND not in written and written.count("2026-12-05 04:50 UTC") > len(registry.FIGURES)
    assert "`python bench.py --headline`" in written and "1.50 / 1.20 / 1.00" in written
    assert "| digits | `central` | 0.5000 (0.98) | stopped | - | 0.9000 (-) |" in written
    assert "Stopped: 5 rounds in a row were discarded" in written
    assert "| `topk / int4` | 50,000 | 437,500 | 20.0 | 4.0 | 0.8500 | -0.0500 |" in written
    assert "(compression.png)" in written
    assert (
        "| goal: virtual, one process | 1000 | 20 | 1 | 12.0 | 2.00 | 0.500 | 0.455 | 1.10 | 44.0 | 1100 | 900 |"
        in written
    )
    earlier = page.render({key: results[key] for key in ("serialization_gbps",)})
    assert earlier.count("## `") == len(registry.FIGURES)
    assert f"2026-11-30 {page.HAND}" in earlier and f"2026-11-28 {page.HAND}" in earlier


def test_the_page_reads_a_results_json_written_before_the_bench_dated_its_figures(tmp_path):
    undated = {
        key: {k: v for k, v in value.items() if k != "measured"} for key, value in every_figure(tmp_path).items()
    }
    assert "not recorded" in page.render(undated)


def test_a_rerun_of_some_figures_keeps_the_others_rows_and_a_skip_keeps_a_measurement(tmp_path):
    results, target = every_figure(tmp_path), tmp_path / "docs" / "results.md"
    cli.write_page(str(target), results)
    rerun = {
        "serialization_gbps": {**results["serialization_gbps"], "bytes": 1},
        "links": {"value": None, "skipped": "no namespaces", "measured": measured()},
    }
    cli.write_page(str(target), rerun)
    record = json.loads(target.with_suffix(".json").read_text())
    assert list(record) == KEYS and record["serialization_gbps"]["bytes"] == 1 and record["links"]["value"]
    assert target.read_text() == page.render(record)


@pytest.mark.parametrize("name", ["scale", "leader_scale"])
def test_a_figure_of_one_key_gives_its_value_under_that_key(name, monkeypatch, tmp_path):
    """The scale figure writes results.json's virtual_scale (its one key, not its name): its value came back bare."""
    figure = dataclasses.replace(registry.figure_named(name), params={})
    monkeypatch.setattr(registry.Figure, "callable", lambda self: lambda: {"rows": 1})
    assert figure.measure({}, tmp_path) == {figure.result_keys[0]: {"rows": 1}}
