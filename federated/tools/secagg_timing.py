"""Times secure aggregation's arithmetic in one process: a learner masking a ResNet-20-sized update, the leader
adding it and unmasking a round with dropped learners (`python -m federated.tools.secagg_timing`)."""

import argparse
import statistics
import time

import torch

from federated.privacy.secagg import COMMIT, SETUP, UNMASK, LeaderEpoch, LeaderRound, LearnerRound, Quantisation

RESNET20_VALUES = 272_474  # the ResNet-20 of model.py at 10 classes


def _phase(leader: LeaderEpoch | LeaderRound, learners: dict[int, LearnerRound], phase: int, ids: list[int]) -> None:
    for learner in ids:
        leader.take(phase, learner, learners[learner].answer(leader.request(phase, learner)))


def time_round(learners: int, dropped: int, size: int, noise_std: float) -> dict[str, float]:
    """Milliseconds of one round's steps: an epoch's setup phases 1-3 and a round's phase 4 (every learner's and
    the leader's work, one after another), per learner (median) quantising and masking, the leader's addition of
    one masked input (median), the reveals, the unmask and the dequantisation."""
    threshold = learners // 2 + 1
    epoch = LeaderEpoch(1, list(range(learners)), threshold)
    sides = {learner: LearnerRound(learner) for learner in range(learners)}
    everyone = list(sides)
    start = time.perf_counter()
    for phase in SETUP:
        _phase(epoch, sides, phase, everyone)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    quantisation = Quantisation(clip_range=8.0, weight_unit=100.0, summands=learners, noise_std=noise_std)
    leader = epoch.open_round(1, everyone, quantisation.ring(size))
    _phase(leader, sides, COMMIT, everyone)
    commit = time.perf_counter() - start
    update = torch.randn(size)
    masking, adding, quantising = [], [], []
    for learner in everyone[dropped:]:
        start = time.perf_counter()
        masked = sides[learner].masked_input(update, 50.0, 2.0, quantisation)
        masking.append(time.perf_counter() - start)
        start = time.perf_counter()
        leader.add_masked(learner, masked)
        adding.append(time.perf_counter() - start)
        start = time.perf_counter()
        quantisation.quantise(update, 50.0, 2.0, torch.Generator())
        quantising.append(time.perf_counter() - start)
    start = time.perf_counter()
    _phase(leader, sides, UNMASK, everyone[dropped:])
    reveals = time.perf_counter() - start
    start = time.perf_counter()
    total = leader.unmask()
    unmasking = time.perf_counter() - start
    start = time.perf_counter()
    quantisation.dequantise(total, learners - dropped)
    dequantising = time.perf_counter() - start
    return {
        "phases 1-3, all sides": setup * 1e3,
        "phase 4, all sides": commit * 1e3,
        "quantise (of masking)": statistics.median(quantising) * 1e3,
        "mask one learner": statistics.median(masking) * 1e3,
        "leader adds one": statistics.median(adding) * 1e3,
        "phase 5, all sides": reveals * 1e3,
        "leader unmasks": unmasking * 1e3,
        "leader dequantises": dequantising * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--learners", type=int, default=10)
    parser.add_argument("--dropped", type=int, default=2, help="learners dropped after sharing")
    parser.add_argument("--size", type=int, default=RESNET20_VALUES, help="values of the update")
    parser.add_argument("--noise-std", type=float, default=0.0, help="distributed DP: each learner's noise")
    parser.add_argument("--repeats", type=int, default=3, help="rounds timed; the median of each step is printed")
    args = parser.parse_args()
    rounds = [time_round(args.learners, args.dropped, args.size, args.noise_std) for _ in range(args.repeats)]
    print(
        f"{args.learners} learners, {args.dropped} dropped, {args.size} values, noise {args.noise_std}, "
        f"{torch.get_num_threads()} torch threads: median ms of {args.repeats} rounds"
    )
    for step in rounds[0]:
        print(f"  {step:24} {statistics.median(times[step] for times in rounds):8.1f}")


if __name__ == "__main__":
    main()
