"""Benchmarks (`make bench`: the headline figures; `make bench-full`: every figure): each figure is a ratio
against a baseline measured in the same run.

Prints a table, writes OUT/results.json (one key per figure, each with the median, min and max of its
repetitions) and the documentation's results page. Modules:

registry     every figure once: its group, headline or not, what it compares, its settings; the helper subcommands
cli          the command line (bench.py): runs the chosen figures, writes results.json and the page
common       what the figures share: statistics, timing, helper processes, work folders
baselines    plain PyTorch training steps, in one process or several at once
federations  local federations run to their end, and what their logs say
transfers    model transfer against raw gRPC and TCP; serialisation against safetensors and torch.save
rounds       round overhead against a plain step (with wire bytes and learner throughput); time to accuracy
scale        the leader's rounds per second and memory with 1 to 64 fake learners
strategies   each strategy to a test accuracy: rounds, bytes, seconds
non_iid      each strategy on each partition of the data
links        rounds on network-namespace hosts with limited links against their physical bound
poisoning    not a timed figure: how far one hostile learner moves the model, SCAFFOLD's honest control ratios
provenance   when, by which command, on which machine and under what load a figure was measured
console      the printed table
page         the results page (docs/performance/results.md), a function of results.json
recorded     the README's hand-recorded figures, shown until the bench measures them again
"""

from federated.tools.bench.cli import main

__all__ = ["main"]
