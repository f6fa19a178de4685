"""The figures as the README recorded them by hand before the bench wrote the results page: shown, marked
so, for each figure the bench has not measured since. Rows follow page.HEADERS; '-' where the README gave none."""

from typing import NamedTuple


class Recorded(NamedTuple):
    date: str
    command: str
    machine: str
    rows: list[list[str]]
    notes: list[str]


DEV = "the 2-core development machine (AMD EPYC, no GPU)"

RECORDED = {
    "model_transfer_ratio": Recorded(
        "2026-11-28",
        "make bench",
        DEV,
        [["0.72", "1.17", "1.63", "-", "4.91", "44.7", "-"]],
        ["Before the changes that make the leader trust no client, that day: 0.68-0.88 (5 runs)."],
    ),
    "round_overhead": Recorded(
        "2026-11-28",
        "make bench",
        DEV,
        [
            [
                "`round_overhead_ratio`",
                "1.17",
                (
                    "median round 0.250 s against a plain step of 0.213 s (1 thread); against two "
                    "plain processes at once: 1.15. The leader waited 236 ms for the gradients, stepped in 5.6 "
                    "ms and pushed in "
                    "4.7 ms; a learner spent 24.5 ms a round sending and waiting"
                ),
            ],
            [
                "`wire_bytes_ratio`",
                "1.014",
                (
                    "2,187,564 bytes per learner-round (the kernel's loopback counter: 2,190,980) "
                    "against twice the 1,078,888 fp32 parameter bytes"
                ),
            ],
            [
                "`learner_throughput_ratio`",
                "0.94",
                ("against 300 images/s in a plain process; against two plain processes at once: 0.96"),
            ],
        ],
        [
            (
                "Before the changes that make the leader trust no client, that day: round 1.16-1.34 (3 runs), "
                "wire bytes "
                "1.014 (every run), throughput 0.81-0.94 (3 runs)."
            )
        ],
    ),
    "leader_scale": Recorded(
        "2026-11-28",
        "make bench",
        DEV,
        [
            ["1", "53", "-", "1559", "-", "0.4"],
            ["4", "26", "-", "1421", "-", "0.5"],
            ["16", "7.6", "-", "1375", "-", "0.8"],
            ["64", "2.15", "-", "1510", "-", "1.9"],
        ],
        [
            "Peak RSS growth from the fewest to the most learners: -49 MB (limit 99 MB); round time ×25 for "
            "×64 learners."
        ],
    ),
    "scale": Recorded(
        "-", "-", "-", [], ["Not measured yet: `python bench.py --only scale` (about 10 minutes on 2 cores)."]
    ),
    "serialization_gbps": Recorded(
        "2026-11-28",
        "make bench",
        DEV,
        [["ours", "5.8", "53"], ["safetensors", "2.8", "5.8"], ["torch_save", "1.7", "2.6"]],
        ["A ResNet-18 state_dict."],
    ),
    "time_to_accuracy": Recorded(
        "2026-11-28",
        "make bench",
        DEV,
        [["1.39", "24.0", "17.2", "90%"]],
        ["Before the changes that make the leader trust no client, that day: 1.19-1.40 (3 runs)."],
    ),
    "strategies": Recorded(
        "2026-11-28",
        "python bench.py --only strategies",
        DEV,
        [
            ["fedsgd", "140", "612.5", "26.4", "0.9990", "1", "1"],
            ["fedavg", "3", "13.1", "65.6", "0.9955", "0.021", "2.48"],
            ["fedavgm", "-", "-", "-", "0.2885", "-", "-"],
            ["fedprox", "3", "13.1", "63.2", "0.9980", "0.021", "2.39"],
            ["fedadam", "-", "-", "-", "0.3295", "-", "-"],
            ["scaffold", "3", "26.1", "58.5", "0.9945", "0.043", "2.22"],
        ],
        [
            (
                "Target 90%, 3 epochs for every strategy. A FedAvg round took 20.1 s against 19.3 s for its "
                "local epoch in "
                "two bare processes stepping at once (`fedavg_round_vs_compute` 1.046)."
            )
        ],
    ),
    "non_iid": Recorded(
        "2026-11-30",
        "python bench.py --only non_iid",
        DEV,
        [
            ["iid", "0.8210 (80)", "0.8005 (3)", "0.7885 (-)", "0.7900 (-)"],
            ["dirichlet 0.5", "0.9775 (70)", "0.5805 (-)", "0.5780 (-)", "0.5965 (-)"],
            ["dirichlet 0.1", "0.9740 (60)", "0.3105 (-)", "0.3450 (-)", "0.3480 (-)"],
            ["2 classes each", "0.9350 (70)", "0.2580 (-)", "0.2655 (-)", "0.2985 (-)"],
        ],
        [
            (
                "Final test accuracy, and in brackets the round it first reached 80% (-: never); 10 learners, "
                "3 epochs of "
                "synthetic."
            )
        ],
    ),
    "norms": Recorded(
        "2026-12-05",
        "python bench.py --only norms",
        "a 2-core machine (Intel Xeon, no GPU) shared with other work, load average 13-16",
        [
            ["`batch`", "0.9638", "0.8830", "+0.0808"],
            ["`group`", "0.5014", "0.3705", "+0.1309"],
            ["`group-ws`", "0.9248", "0.7632", "+0.1616"],
            ["`layer-ws`", "0.8635", "0.8440", "+0.0195"],
            ["`renorm`", "0.9666", "0.9415", "+0.0251"],
        ],
        [
            "FedSGD, 4 learners, 20 epochs of the digits at 8 px: final test accuracy; the skew's cost is IID minus "
            "Dirichlet 0.1."
        ],
    ),
    "defaults": Recorded(
        "2026-12-05",
        "python bench.py --only defaults",
        DEV,
        [],
        ["Never recorded by hand: the bench measured it first (issue 17)."],
    ),
    **{
        name: Recorded(
            "2026-12-05",
            f"python bench.py --only {name}",
            DEV,
            [],
            ["Never recorded by hand: the bench measures it first (issue 18)."],
        )
        for name in ("secagg_overhead", "secagg_accuracy", "dp_accuracy")
    },
    "codec_costs": Recorded(
        "2026-12-05",
        "python bench.py --only codec_costs",
        DEV,
        [],
        ["Never recorded by hand: the bench measures it first (issue 19)."],
    ),
    "compression": Recorded(
        "2026-12-05",
        "python bench.py --only compression",
        DEV,
        [],
        ["Never recorded by hand: the bench measures it first (issue 19)."],
    ),
    "compression_links": Recorded(
        "2026-12-05",
        "python bench.py --only compression_links",
        DEV,
        [],
        ["Never recorded by hand: the bench measures it first (issue 19)."],
    ),
    "links": Recorded(
        "2026-11-30",
        "python bench.py --only links --out /tmp/bench-links",
        f"{DEV}, while other work kept its load average near 13",
        [
            ["resnet20 fedsgd float32 @ 100mbit", "0.809", "0.801", "1.011", "0.559", "0.242", "1.09", "2.19"],
            ["resnet20 fedsgd float32 @ 1gbit", "0.610", "0.598", "1.020", "0.574", "0.024", "1.09", "2.19"],
            ["resnet20 fedsgd float16 @ 100mbit", "0.791", "0.782", "1.011", "0.670", "0.112", "0.55", "1.11"],
            ["resnet20 fedsgd float16 @ 1gbit", "0.565", "0.549", "1.028", "0.538", "0.011", "0.55", "1.11"],
            ["resnet18 fedsgd float32 @ 100mbit", "14.956", "13.918", "1.075", "3.200", "10.718", "44.74", "89.49"],
            ["resnet18 fedsgd float32 @ 1gbit", "4.462", "4.272", "1.045", "3.200", "1.072", "44.74", "89.49"],
            ["resnet20 fedavg 10 steps float32 @ 100mbit", "7.917", "7.598", "1.042", "7.356", "0.242", "1.09", "2.19"],
        ],
        [
            (
                "Compute took two to three times what it takes on a quiet machine that hour: the bytes, the "
                "transfer times "
                "and the ratios are what carries over."
            )
        ],
    ),
}
