"""Secure aggregation through the rounds, without sockets: the leader's SecureRounds driving learners' SecureParty
objects (a fake client hands each phase's request to them), masked inputs counted by the RoundCollector, and the
unmasked mean against the plain one; the flags it refuses; what the leader receives from one learner, captured."""

import collections
import dataclasses
import threading
from collections.abc import Callable

import grpc
import pytest
import torch
from scipy import stats

from federated.core import strategies
from federated.core.plan import SecureRound
from federated.leader import config as leader_flags
from federated.leader.collector import RoundCollector
from federated.leader.data import DataFacts
from federated.leader.global_model import GlobalModel
from federated.leader.planner import Planner
from federated.leader.registry import Member
from federated.leader.secure import UNIMPLEMENTED_WHY, SecureRounds
from federated.learner.secure import SecureParty
from federated.learner.state import Replica
from federated.net.rpc import learner_pb2
from federated.privacy import secagg
from federated.wire import codec, messages
from tests.support.live import leader_config

MEAN, STD = [0.5] * 3, [0.25] * 3
IMAGE_SIZE, BATCH = 8, 8


class Failed(grpc.RpcError):
    """A call that ended in an error, as a grpc future's result() raises it."""

    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class FakeClient:
    """The leader's calls to learners, handed straight to their SecureParty objects; `failing` learners' calls end
    in that status code; every reply is kept (what the leader receives)."""

    def __init__(self, parties: dict[int, SecureParty], failing: dict[int, grpc.StatusCode] | None = None) -> None:
        self.parties, self.failing, self.received = parties, failing or {}, []
        self.tamper: dict[int, Callable[[learner_pb2.SecAggReply], None]] = {}  # a learner's replies, changed
        self.calls: collections.Counter[int] = collections.Counter()  # by phase

    def ask(self, members, method, requests, reply_type, timeout):
        replies = {}
        for learner in members:
            self.calls[requests[learner].phase] += 1
            if learner in self.failing:
                replies[learner] = Failed(self.failing[learner], "no such method")
                continue
            try:
                replies[learner] = self.parties[learner].answer(requests[learner])
                self.tamper.get(learner, lambda reply: None)(replies[learner])
                self.received.append((learner, replies[learner]))
            except secagg.Refused as refused:
                replies[learner] = Failed(grpc.StatusCode.INVALID_ARGUMENT, str(refused))
        return replies


def members(count: int) -> dict[int, Member]:
    return {
        learner: Member(learner, f"127.0.0.1:{50100 + learner}", f"credential-{learner}", 1) for learner in range(count)
    }


def parties(count: int) -> dict[int, SecureParty]:
    made = {learner: SecureParty() for learner in range(count)}
    for learner, party in made.items():
        party.bind(learner)
    return made


@dataclasses.dataclass
class Trained:
    """One round's honest updates of `count` learners of a real run's first state, as the learners make them."""

    config: leader_flags.LeaderConfig
    secure: SecureRound
    updates: list[torch.Tensor]
    samples: list[int]
    losses: list[float]


def train(strategy: str, count: int = 4, *flags: str) -> Trained:
    config = leader_config(
        [
            *("--dataset", "synthetic", "--strategy", strategy, "--secure-aggregation", "--learners", str(count)),
            *("--image-size", str(IMAGE_SIZE), "--batch-size", str(BATCH), "--rounds", "2", *flags),
        ]
    )
    rule = strategies.named(strategy)(config)
    planner = Planner(config, rule, DataFacts(MEAN, STD, 4 * BATCH))
    plan = planner.plan(0, None)
    model = GlobalModel(config, 10, rule, (MEAN, STD))
    model.publish(0, False, plan=plan)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(count * 4 * BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    labels_all = torch.randint(10, (count * 4 * BATCH,), generator=generator)
    updates, samples, losses = [], [], []
    for learner in range(count):
        replica = Replica(codec.decode(model.encoded_state), "cpu")
        shard = slice(learner * 4 * BATCH, (learner + 1) * 4 * BATCH)
        pixels, labels = (images[shard] - 0.5) / 0.25, labels_all[shard]
        own = plan.for_shard(4 * BATCH, BATCH)
        batch_at = lambda step, pixels=pixels, labels=labels: (
            pixels[step % 4 * BATCH :][:BATCH],
            labels[step % 4 * BATCH :][:BATCH],
        )
        losses.append(replica.local_update(batch_at, own))
        updates.append(replica.gradient.clone())
        assert plan.secure is not None
        samples.append(int(plan.secure.weight_unit) * (learner + 1) // count)  # unequal weights, within the unit
    return Trained(config, plan.secure, updates, samples, losses)


def secure_round(trained: Trained, participants: dict[int, SecureParty], client: FakeClient, threshold: float = 0.5):
    """Phases 1-3 with every learner, each committed learner's masked input into a collector; returns the
    SecureRounds, the collector and who committed."""
    size = trained.updates[0].numel()
    rounds = SecureRounds(client, threshold, secagg.Ring(secagg.BITS, size), timeout=5)
    collector = RoundCollector(size, add_masked=rounds.add_masked)
    collector.expect(sorted(participants))
    committed = rounds.begin(0, members(len(participants)))
    collector.commit(committed)
    return rounds, collector, committed


def send_masked(trained, participants, collector, learners) -> None:
    for learner in learners:
        masked = participants[learner].masked_input(
            0, trained.updates[learner], trained.samples[learner], trained.losses[learner], trained.secure
        )
        assert masked is not None and collector.submit_masked(learner, 0, masked, 0) is None


def plain_mean(trained: Trained, learners) -> tuple[torch.Tensor, int, float]:
    size = trained.updates[0].numel()
    collector = RoundCollector(size)
    collector.expect(list(learners))
    for learner in learners:
        collector.submit(learner, 0, [trained.updates[learner]], trained.samples[learner], trained.losses[learner], 0)
    out = torch.zeros(size)
    summary = collector.close(out)
    return out, summary.samples, summary.loss


def quantisation_bound(trained: Trained, learners) -> float:
    """How far a dequantised mean may lie from the exact one: each input's stochastic rounding moves each value by
    less than one integer step, and the weight's sum alike."""
    quantisation = secagg.Quantisation(**dataclasses.asdict(trained.secure))
    weight = sum(trained.samples[learner] for learner in learners) / trained.secure.weight_unit * quantisation.scale
    return 2 * len(learners) * trained.secure.clip_range / weight


def assert_within_bound(mean: torch.Tensor, trained: Trained, learners) -> None:
    """The secure mean is the plain one within the quantisation bound (and float32's rounding of either)."""
    expected = plain_mean(trained, learners)[0]
    bound = quantisation_bound(trained, learners) + 4 * torch.finfo(torch.float32).eps * expected.abs()
    assert bool(((mean - expected).abs() <= bound).all()), (mean - expected).abs().max()
    assert expected.abs().max() > 1000 * quantisation_bound(trained, learners)  # (a bound that says something)


STRATEGIES = ["fedsgd", "fedavg", "fedprox", "fedavgm", "fedadagrad", "fedadam", "fedyogi", "scaffold"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_unmasked_mean_is_the_plain_mean_within_the_quantisation_bound(strategy):
    trained = train(strategy, 3)
    participants = parties(3)
    rounds, collector, committed = secure_round(trained, participants, FakeClient(participants))
    assert committed == [0, 1, 2]
    send_masked(trained, participants, collector, committed)
    out = torch.zeros(trained.updates[0].numel())
    outcome = rounds.finish(
        collector.seal(), members(3), secagg.Quantisation(**dataclasses.asdict(trained.secure)), out
    )
    summary = collector.close(out, outcome)
    _, samples, loss = plain_mean(trained, range(3))
    assert summary.discarded is None and summary.per_learner == {}
    assert summary.samples == samples and summary.loss == pytest.approx(loss, rel=1e-3)
    assert_within_bound(out, trained, range(3))


@pytest.fixture(scope="module")
def fedsgd() -> Trained:
    return train("fedsgd", 5)


@pytest.mark.parametrize(("never_sends", "dies_after_sending"), [([4], []), ([], [3]), ([4], [3])])
def test_learners_that_drop_before_or_after_their_masked_input_are_recovered_but_not_both_in_one_round(
    fedsgd, never_sends, dies_after_sending
):
    """One that never sends: its pair masks are undone with the survivors' pair seeds with it; one that dies after
    sending: its self mask is undone with the others' shares. Both in one round: the dead survivor's pair mask
    with the one that never sent is known to nobody else, so the round is discarded, never leaked."""
    participants = parties(5)
    client = FakeClient(participants)
    rounds, collector, _ = secure_round(fedsgd, participants, client)
    sent = [learner for learner in range(5) if learner not in never_sends]
    send_masked(fedsgd, participants, collector, sent)
    client.failing.update(dict.fromkeys(dies_after_sending, grpc.StatusCode.UNAVAILABLE))
    out = torch.zeros(fedsgd.updates[0].numel())
    outcome = rounds.finish(collector.seal(), members(5), secagg.Quantisation(**dataclasses.asdict(fedsgd.secure)), out)
    if never_sends and dies_after_sending:
        assert "learners [3] sent their masked input but revealed nothing" in outcome.discarded
        assert not outcome.revealed and bool((out == 0).all())
        return
    assert outcome.discarded is None and outcome.samples == plain_mean(fedsgd, sent)[1]
    assert_within_bound(out, fedsgd, sent)


def run_rounds(rounds: SecureRounds, participants: dict[int, SecureParty], first: int, last: int) -> list[list[int]]:
    """Rounds first..last of small random updates (64 values) of every participant, each unmasked mean checked
    against the plain one within the quantisation bound; returns who committed."""
    size, secure = rounds.ring.size, SecureRound(clip_range=8.0, weight_unit=10.0, summands=len(participants))
    quantisation, generator = secagg.Quantisation(**dataclasses.asdict(secure)), torch.Generator().manual_seed(first)
    committed_by_round = []
    for round_index in range(first, last + 1):
        committed = rounds.begin(round_index, members(len(participants)))
        updates = {learner: torch.randn(size, generator=generator) * 6 for learner in committed}
        weights = {learner: 1.0 + learner for learner in committed}
        for learner in committed:
            masked = participants[learner].masked_input(round_index, updates[learner], weights[learner], 1.0, secure)
            assert masked is not None
            rounds.add_masked(learner, masked)
        out = torch.zeros(size)
        outcome = rounds.finish(committed, members(len(participants)), quantisation, out)
        assert outcome.discarded is None
        total = sum(weights.values())
        expected = sum(weights[learner] * updates[learner].clamp(-8.0, 8.0) for learner in committed) / total
        bound = 2 * len(committed) * 8.0 / (total / secure.weight_unit * quantisation.scale)
        assert float((out - expected).abs().max()) <= bound + 1e-6
        committed_by_round.append(committed)
    return committed_by_round


def test_an_epoch_runs_phases_1_to_3_once_for_its_rounds_each_unmasked_right_then_a_new_one_opens():
    participants = parties(4)
    client = FakeClient(participants)
    rounds = SecureRounds(client, 0.5, secagg.Ring(secagg.BITS, 64), timeout=5)
    committed = run_rounds(rounds, participants, 0, secagg.EPOCH_ROUNDS)  # K rounds, and one more
    assert committed == [[0, 1, 2, 3]] * (secagg.EPOCH_ROUNDS + 1)
    setup = {phase: client.calls[phase] for phase in secagg.SETUP}
    assert setup == dict.fromkeys(secagg.SETUP, 2 * 4), "phases 1-3 once for the K rounds, then for the next epoch"
    assert client.calls[secagg.COMMIT] == client.calls[secagg.UNMASK] == 4 * (secagg.EPOCH_ROUNDS + 1)
    assert rounds.epochs_opened == 2


@pytest.mark.parametrize(("fraction", "count"), [(0.8, 5), (0.75, 4), (0.67, 3), (0.99, 10)])
def test_a_threshold_fraction_near_one_still_leaves_rounds_that_unmask(fraction, count):
    """A round unmasks with more than t survivors, so t stops one short of all: floor(0.8 x 5) + 1 = 5 would have
    discarded every round (and stopped the run)."""
    participants = parties(count)
    rounds = SecureRounds(FakeClient(participants), fraction, secagg.Ring(secagg.BITS, 64), timeout=5)
    assert run_rounds(rounds, participants, 0, 1) == [list(range(count))] * 2


def test_no_more_commits_than_the_threshold_leave_the_round_without_learners(fedsgd):
    """4 learners (t = 3), one fails its commit: 3 committed could never unmask, so none train for it."""
    participants = parties(4)
    client = FakeClient(participants)
    rounds = SecureRounds(client, 0.5, secagg.Ring(secagg.BITS, fedsgd.updates[0].numel()), timeout=5)
    rounds.begin(0, members(4))  # the epoch, agreed by all four
    client.failing[3] = grpc.StatusCode.UNAVAILABLE
    assert rounds.begin(1, members(4)) == []


def test_a_learner_that_registered_again_is_refused_at_commit_left_out_and_the_next_round_opens_an_epoch():
    participants = parties(5)
    client = FakeClient(participants)
    rounds = SecureRounds(client, 0.5, secagg.Ring(secagg.BITS, 64), timeout=5)
    assert run_rounds(rounds, participants, 0, 0) == [[0, 1, 2, 3, 4]]
    participants[2].bind(2)  # it forgot its epoch: a commit of it is refused
    assert run_rounds(rounds, participants, 1, 1) == [[0, 1, 3, 4]]  # 2's pair masks undone as a dropout's
    assert client.calls[secagg.KEYS] == 5
    assert run_rounds(rounds, participants, 2, 2) == [[0, 1, 2, 3, 4]]
    assert client.calls[secagg.KEYS] == 10 and rounds.epochs_opened == 2


def test_below_the_threshold_the_round_is_discarded_and_nothing_is_unmasked(fedsgd):
    participants = parties(5)
    client = FakeClient(participants)
    rounds, collector, _ = secure_round(fedsgd, participants, client)  # threshold 3 of 5
    send_masked(fedsgd, participants, collector, [0, 1, 2])
    client.failing.update({1: grpc.StatusCode.UNAVAILABLE, 2: grpc.StatusCode.UNAVAILABLE})  # one reveals, not 3
    out = torch.full((fedsgd.updates[0].numel(),), 7.0)
    outcome = rounds.finish(collector.seal(), members(5), secagg.Quantisation(**dataclasses.asdict(fedsgd.secure)), out)
    summary = collector.close(out, outcome)
    assert "below the threshold" in summary.discarded
    assert bool((out == 7.0).all()), "the mean is left untouched"
    assert collector.round == 1, "the next round opens"


def test_fewer_than_three_committed_completes_the_round_at_once_to_be_discarded(fedsgd):
    participants = parties(3)
    client = FakeClient(participants, {2: grpc.StatusCode.UNAVAILABLE})
    rounds, collector, committed = secure_round(fedsgd, participants, client)
    assert committed == [] and collector.wait_complete(0)
    outcome = rounds.finish(
        collector.seal(), members(3), secagg.Quantisation(**dataclasses.asdict(fedsgd.secure)), torch.zeros(1)
    )
    assert "fewer than 3" in collector.close(torch.zeros(1), outcome).discarded


def test_a_learner_of_the_seed_protos_is_told_apart_and_left_out(fedsgd):
    participants = parties(5)
    client = FakeClient(participants, {4: grpc.StatusCode.UNIMPLEMENTED})
    rounds = SecureRounds(client, 0.5, secagg.Ring(secagg.BITS, fedsgd.updates[0].numel()), timeout=5)
    unable = []
    committed = rounds.begin(0, members(5), lambda member, why: unable.append((member.learner_id, why)))
    assert committed == [0, 1, 2, 3]
    assert unable == [(4, f"learner 4 {UNIMPLEMENTED_WHY}")]


def test_wrong_length_foreign_and_replayed_masked_inputs_are_refused_and_the_round_goes_on(fedsgd):
    participants = parties(5)
    rounds, collector, _ = secure_round(fedsgd, participants, FakeClient(participants))
    size = fedsgd.updates[0].numel() + 2

    def zeros(length: int) -> dict[str, torch.Tensor]:
        return {secagg.MASKED_TENSOR: torch.zeros(length, dtype=torch.int32)}

    assert "refused" in collector.submit_masked(0, 0, zeros(size - 1), 0)
    assert "refused" in collector.submit_masked(7, 0, zeros(size), 0)  # not committed
    send_masked(fedsgd, participants, collector, [0, 1, 2, 3, 4])
    assert "already sent" in collector.submit_masked(0, 0, zeros(size), 0)
    out = torch.zeros(size - 2)
    outcome = rounds.finish(collector.seal(), members(5), secagg.Quantisation(**dataclasses.asdict(fedsgd.secure)), out)
    collector.close(out, outcome)
    assert outcome.discarded is None
    assert_within_bound(out, fedsgd, range(5))
    replayed = collector.submit_masked(1, 0, zeros(size), 0)
    assert "round 1 is open" in replayed


def falsify_reveals(reply: learner_pb2.SecAggReply) -> None:
    """A phase-5 reply whose shares are well-formed but false (other phases' replies have no reveals)."""
    for reveal in reply.reveals:
        reveal.share = (int.from_bytes(reveal.share, "big") ^ 1).to_bytes(len(reveal.share), "big")


def test_a_false_revealer_is_outvoted_not_benched_and_a_replayed_real_input_is_refused(fedsgd):
    """Not benched: without verifiable secret sharing its false reveals look like a false dealer's shares to it."""
    participants = parties(5)
    client = FakeClient(participants)
    client.tamper[4] = falsify_reveals
    rounds, collector, committed = secure_round(fedsgd, participants, client)
    captured = participants[0].masked_input(0, fedsgd.updates[0], fedsgd.samples[0], fedsgd.losses[0], fedsgd.secure)
    assert captured is not None and collector.submit_masked(0, 0, captured, 0) is None
    send_masked(fedsgd, participants, collector, [1, 2, 3, 4])
    quantisation = secagg.Quantisation(**dataclasses.asdict(fedsgd.secure))
    out = torch.zeros(fedsgd.updates[0].numel())
    outcome = rounds.finish(collector.seal(), members(5), quantisation, out)
    collector.close(out, outcome)
    assert outcome.discarded is None
    assert_within_bound(out, fedsgd, range(5))
    collector.expect(list(range(5)))
    committed = rounds.begin(1, members(5))  # learner 4 takes part in the next round as any other
    assert committed == [0, 1, 2, 3, 4]
    collector.commit(committed)
    assert "round 1 is open" in collector.submit_masked(0, 0, captured, 0)  # round 0's, replayed
    for learner in committed:
        masked = participants[learner].masked_input(
            1, fedsgd.updates[learner], fedsgd.samples[learner], fedsgd.losses[learner], fedsgd.secure
        )
        assert masked is not None and collector.submit_masked(learner, 1, masked, 0) is None
    outcome = rounds.finish(collector.seal(), members(5), quantisation, out)
    assert outcome.discarded is None
    assert_within_bound(out, fedsgd, committed)


def test_a_masked_input_the_protocol_refuses_is_refused_with_its_cause_not_taken_for_a_later_round(fedsgd):
    """The learner logs the cause (learner/app.py); a None would read as "the leader started the next round"."""
    participants = parties(4)
    _, collector, committed = secure_round(fedsgd, participants, FakeClient(participants))
    send_masked(fedsgd, participants, collector, committed)
    with pytest.raises(secagg.Refused, match="once per round"):
        participants[0].masked_input(0, fedsgd.updates[0], fedsgd.samples[0], fedsgd.losses[0], fedsgd.secure)


def cut_short(reply: learner_pb2.SecAggReply) -> None:
    """A phase-2 reply whose first encrypted share is cut short (other phases' replies have none)."""
    for share in reply.shares[:1]:
        share.ciphertext = share.ciphertext[:-1]


def test_malformed_shares_leave_their_sender_out_and_the_round_goes_on(fedsgd):
    participants = parties(5)
    client = FakeClient(participants)
    client.tamper[4] = cut_short
    rounds, collector, committed = secure_round(fedsgd, participants, client)
    assert committed == [0, 1, 2, 3]
    send_masked(fedsgd, participants, collector, committed)
    out = torch.zeros(fedsgd.updates[0].numel())
    outcome = rounds.finish(collector.seal(), members(5), secagg.Quantisation(**dataclasses.asdict(fedsgd.secure)), out)
    assert outcome.discarded is None
    assert_within_bound(out, fedsgd, committed)


def test_a_learner_answering_for_another_is_left_out(fedsgd):
    participants = parties(5)
    participants[4].bind(3)  # learner 4's replies speak for learner 3
    assert secure_round(fedsgd, participants, FakeClient(participants))[2] == [0, 1, 2, 3]


def chi_square_p(data: bytes) -> float:
    """The p-value of the bytes' counts against the uniform distribution over 256 values."""
    counts = torch.bincount(torch.frombuffer(bytearray(data), dtype=torch.uint8), minlength=256)
    return float(stats.chisquare(counts.numpy()).pvalue)


def largest_correlation(data: bytes, update: torch.Tensor) -> float:
    """The largest rank correlation of the bytes, read as int32 or as float32 words, with the update's values."""
    words = torch.frombuffer(bytearray(data[: update.numel() * 4]), dtype=torch.int32)
    found = 0.0
    for view in (words.double(), words.view(torch.float32).double()):
        finite = torch.isfinite(view)
        rho = stats.spearmanr(view[finite].numpy(), update[finite].numpy()).statistic
        found = max(found, abs(float(rho)))
    return found


def test_every_byte_the_leader_receives_from_one_learner_looks_uniform_and_plain_bytes_do_not(fedsgd):
    participants = parties(5)
    client = FakeClient(participants)
    secure_round(fedsgd, participants, client)
    learner, update = 0, fedsgd.updates[0]
    masked = participants[learner].masked_input(0, update, fedsgd.samples[0], fedsgd.losses[0], fedsgd.secure)
    payload = codec.decode(codec.encode(masked, messages.MaskedInfo(0, 0).to_metadata()))
    ciphertexts = b"".join(
        share.ciphertext for sender, reply in client.received if sender == learner for share in reply.shares
    )
    assert ciphertexts, "the learner's encrypted shares were captured"
    captured = payload.tensors[secagg.MASKED_TENSOR].numpy().tobytes() + ciphertexts
    assert chi_square_p(captured) > 1e-6  # (uniform bytes fail it once in a million runs)
    assert largest_correlation(captured, update) < 5 / update.numel() ** 0.5
    plain = codec.encode({"update": update}, {"learner_id": "0", "round": "0", "samples": "8", "loss": "1"})
    plain_bytes = b"".join(tensor.numpy().tobytes() for tensor in codec.decode(plain).tensors.values())
    assert chi_square_p(plain_bytes) < 1e-6
    assert largest_correlation(plain_bytes, update) > 0.99


@pytest.mark.parametrize(
    "flags, refused",
    [
        (["--aggregator", "median"], "--aggregator median weighs each update"),
        (["--clip-norm", "1"], "--clip-norm clips each update at the leader"),
        (["--learners", "2"], "needs at least 3 learners a round"),
        (["--learners", "5", "--learners-per-round", "2"], "needs at least 3 learners a round"),
        (["--min-learners", "2"], "--min-learners 2 under --secure-aggregation"),
    ],
)
def test_what_the_leader_cannot_do_without_seeing_single_updates_is_refused(flags, refused, capsys):
    with pytest.raises(SystemExit):
        leader_config(["--dataset", "synthetic", "--learners", "4", "--secure-aggregation", *flags])
    assert refused in capsys.readouterr().err


def test_secure_rounds_wait_for_three_and_the_flag_table_knows_the_protocols_minimum():
    assert leader_flags.LEAST_SECURE == secagg.MIN_LEARNERS
    assert (
        leader_flags.min_learners(leader_config(["--dataset", "synthetic", "--learners", "5", "--secure-aggregation"]))
        == 3
    )


def test_distributed_dp_the_noise_shares_of_the_fewest_survivors_sum_to_at_least_the_calibrated_deviation():
    # --dp distributed: each learner adds sigma C / sqrt(t) (t: the round's threshold, 3 of 5), so that any sum the
    # leader can unmask (of t + 1 survivors or more: learners reveal nothing for fewer) carries at least
    # N(0, (sigma C)^2); the leader dequantises alike
    sigma, clip, size = 1.2, 0.5, 20000
    secure = SecureRound(clip_range=8.0, weight_unit=1.0, summands=5)
    participants = parties(5)
    rounds = SecureRounds(FakeClient(participants), 0.5, secagg.Ring(secagg.BITS, size), timeout=5)
    collector = RoundCollector(size, add_masked=rounds.add_masked)
    collector.expect(sorted(participants))
    collector.commit(rounds.begin(0, members(5)))
    for learner in (0, 1, 2, 3):  # 4 never sends: the sum has t + 1 = 4 noise shares, the fewest it can have
        masked = participants[learner].masked_input(0, torch.zeros(size), 1.0, 0.0, secure, (sigma, clip))
        assert masked is not None and collector.submit_masked(learner, 0, masked, 0) is None
    out = torch.zeros(size)
    outcome = rounds.finish(
        collector.seal(), members(5), secagg.Quantisation(**dataclasses.asdict(secure)), out, (sigma, clip)
    )
    assert outcome.discarded is None and outcome.samples == 4
    noise_sum = out * 4  # the mean of 4 equally weighted inputs, each of zeros plus its share of the noise
    assert noise_sum.std().item() == pytest.approx(sigma * clip * (4 / 3) ** 0.5, rel=0.05)
    assert abs(noise_sum.mean().item()) < 0.05 * sigma * clip


def test_a_round_discarded_after_unmasking_was_revealed_one_discarded_before_was_not(fedsgd):
    participants = parties(5)
    rounds, collector, _ = secure_round(fedsgd, participants, FakeClient(participants))
    send_masked(fedsgd, participants, collector, range(5))
    out = torch.zeros(fedsgd.updates[0].numel())
    # the leader expects distributed DP's noise, whose room shrinks the scale: the learners' sum (quantised without
    # it) weighs more than honest inputs at that scale can, and is refused once unmasked
    quantisation = secagg.Quantisation(**dataclasses.asdict(fedsgd.secure))
    outcome = rounds.finish(collector.seal(), members(5), quantisation, out, noise=(100.0, 1.0))
    summary = collector.close(out, outcome)
    assert summary.discarded and summary.released  # refused after unmasking: the leader saw the sum
    rounds, collector, _ = secure_round(fedsgd, participants, FakeClient(participants))
    outcome = rounds.finish([], members(5), quantisation, out)
    assert not collector.close(out, outcome).released  # nothing unmasked: nothing to charge


def test_a_learner_waiting_for_its_commit_stops_waiting_when_the_run_ends():
    # a leader that stops mid-round (or at --dp-target-epsilon) commits nobody: the learner's wait ends with the run,
    # not after --wait-timeout (it had waited the whole 10 minutes)
    party, ended, result = SecureParty(), threading.Event(), []
    party.bind(0)
    waiting = threading.Thread(target=lambda: result.append(party.wait_committed(3, 600.0, stop=ended.is_set)))
    waiting.start()
    ended.set()
    waiting.join(30)
    assert not waiting.is_alive() and result == [False]


def test_a_learner_waiting_for_a_commit_stops_waiting_when_a_commit_of_a_later_round_comes():
    # within an epoch no phase 1 marks a new round: a commit of a later round ends the wait for an earlier one
    participants = parties(4)
    rounds = SecureRounds(FakeClient(participants), 0.5, secagg.Ring(secagg.BITS, 64), timeout=5)
    run_rounds(rounds, participants, 0, 0)
    result: list[bool] = []
    waiting = threading.Thread(target=lambda: result.append(participants[3].wait_committed(1, 600.0)))
    waiting.start()
    run_rounds(rounds, participants, 2, 2)  # round 1 never committed it: the leader went on to round 2
    waiting.join(30)
    assert not waiting.is_alive() and result == [False]
