"""Compressed updates at a live leader: every hostile payload refused with INVALID_ARGUMENT, the round's sum and the
model as they were (tests/support/live.py's reference model steps with exactly the updates the test counts)."""

import re
from functools import partial

import grpc
import pytest
import torch

from federated.core import compression
from federated.core.compression.codecs import INDEX_OFFSET
from federated.leader.servicer import decode_update
from tests.support.live import LiveLeader

# What each refusal says (its cause, not just any refusal)
REASONS = {
    "a missing entry": r"missing \['",
    "an extra entry": r"unexpected \['fc.weight:extra",
    "a part longer than the header's codec says": r"is \w+ \[[0-9, ]+\], expected",
    "a length that disagrees with the header": "data bytes but its tensors describe",
    "another codec than the leader's": r"compressed with \w+, but this leader asks for",
    "an entry out of order": "not in the model's order",
    "an index out of range": "an index outside",
    "the top int16 index": "an index outside",
    "a repeated index": "a repeated index",
    "a NaN value": "NaN or Inf",
    "a rank larger than the tensor's": r"\[16, 3\], expected BF16 \[16, 2\]",
    "an infinite factor": "NaN or Inf",
    "factors whose product overflows": "overflows float32",
    "a NaN scale": "NaN or Inf",
    "an infinite scale": "NaN or Inf",
    "a negative scale": "a negative scale",
    "a level beyond the codec's": "a level below -127",
    "a level of -8": r"a level of -8",
    "a NaN sign scale": "a scale of nan",
    "a negative sign scale": "a scale of -1.0",
    "an infinite value": "NaN or Inf",
}
CODECS = {
    "topk": ["--compress-ratio", "0.05"],
    "randk": ["--compress-ratio", "0.05"],
    "powersgd": ["--compress-rank", "2"],
    "int8": [],
    "int4": [],
    "sign": [],
}


@pytest.fixture(params=list(CODECS))
def compressed(request, tmp_path, port):
    """A live leader (capacity 2) that asks for updates compressed with the parametrised codec."""
    name = request.param
    live = LiveLeader.start(
        tmp_path, port, "--learners", "2", "--batch-size", "8", "--image-size", "16", "--compress", name, *CODECS[name]
    )
    yield live
    live.stop()


def settings(live: LiveLeader) -> tuple[str, float, int]:
    config = live.leader.config
    return config.compress, config.compress_ratio, config.compress_rank


def entries(live: LiveLeader, seed: int) -> dict[str, torch.Tensor]:
    """An honest learner's compressed update (positive values: its running variances must be)."""
    layout = live.leader.global_model.layout
    update = torch.rand(layout.size, generator=torch.Generator().manual_seed(seed)) * 0.01
    return compression.Compressor(*settings(live), layout.shapes, seed=0).compress(layout.views(update))


def send_counted(live: LiveLeader, tensors: dict[str, torch.Tensor], credential: str, learner_id: int) -> None:
    """Send a compressed update the leader must count, and count its decoding in the reference too."""
    reply = live.accumulate(live.gradient(learner_id, tensors=tensors, compress=settings(live)[0]), credential)
    assert reply.success, reply.message
    live.counted.add_decoded(partial(decode_update, live.reference.layout, tensors, settings(live)), 8, 1.5)


def part(tensors: dict[str, torch.Tensor], suffix: str) -> str:
    return next(name for name in tensors if name.endswith(suffix))


def changed(tensors: dict[str, torch.Tensor], suffix: str, change) -> dict[str, torch.Tensor]:
    """The entries with the first entry ending in suffix replaced by change(a copy of it)."""
    name = part(tensors, suffix)
    return {**tensors, name: change(tensors[name].clone(memory_format=torch.contiguous_format))}


def set_at(tensor: torch.Tensor, index: int, value: float) -> torch.Tensor:
    tensor.view(-1)[index] = value
    return tensor


def hostile(live: LiveLeader, good: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor] | bytes]:
    """Payloads (entries, or bytes) a hostile learner 1 might send the live leader's codec."""
    name = settings(live)[0]
    first = next(key for key in good if ":" in key)  # a compressed tensor's first part
    numel = live.leader.global_model.layout.shapes[first.split(":")[0]]
    cases: dict[str, dict[str, torch.Tensor] | bytes] = {
        "a missing entry": {key: value for key, value in good.items() if key != first},
        "an extra entry": {**good, "fc.weight:extra": torch.zeros(4)},
        "a part longer than the header's codec says": {**good, first: torch.cat([good[first], good[first][:1]])},
        "a length that disagrees with the header": live.gradient(1, tensors=good, compress=name)[:-4],
        "another codec than the leader's": live.gradient(
            1, tensors=good, compress="int8" if name == "sign" else "sign"
        ),
        "an entry out of order": dict(reversed(list(good.items()))),
    }
    if name == "topk":
        # int16 positions (the tensor has at most 2^16 values) travel as position - INDEX_OFFSET: none is negative
        beyond = torch.Size(numel).numel() - INDEX_OFFSET
        cases["an index out of range"] = changed(good, ":indices", lambda t: set_at(t, 0, beyond))
        cases["the top int16 index"] = changed(good, ":indices", lambda t: set_at(t, 0, 2**15 - 1))
        cases["a repeated index"] = changed(good, ":indices", lambda t: set_at(t, 0, int(t[1])))
        cases["a NaN value"] = changed(good, ":values", lambda t: set_at(t, 0, float("nan")))
    if name == "powersgd":
        cases["a rank larger than the tensor's"] = changed(good, ":P", lambda t: torch.cat([t, t[:, :1]], dim=1))
        cases["an infinite factor"] = changed(good, ":Q", lambda t: set_at(t, 0, float("inf")))
        overflowing = changed(good, ":P", lambda t: set_at(t, 0, 1e30))
        cases["factors whose product overflows"] = changed(overflowing, ":Q", lambda t: set_at(t, 0, 1e30))
    if name == "randk":
        cases["a NaN value"] = changed(good, ":values", lambda t: set_at(t, 0, float("nan")))
        cases["an infinite value"] = changed(good, ":values", lambda t: set_at(t, 1, float("-inf")))
    if name == "sign":
        cases["a NaN sign scale"] = changed(good, ":scale", lambda t: set_at(t, 0, float("nan")))
        cases["a negative sign scale"] = changed(good, ":scale", lambda t: set_at(t, 0, -1.0))
    if name == "int4":
        cases["a NaN scale"] = changed(good, ":scales", lambda t: set_at(t, 0, float("nan")))
        cases["a negative scale"] = changed(good, ":scales", lambda t: set_at(t, 0, -1.0))
        cases["a level of -8"] = changed(good, ":packed", lambda t: set_at(t, 0, 0x80))  # low nibble 0: -8
    if name == "int8":
        cases["a NaN scale"] = changed(good, ":scales", lambda t: set_at(t, 0, float("nan")))
        cases["an infinite scale"] = changed(good, ":scales", lambda t: set_at(t, 0, float("inf")))
        cases["a negative scale"] = changed(good, ":scales", lambda t: set_at(t, 0, -1.0))
        cases["a level beyond the codec's"] = changed(good, ":levels", lambda t: set_at(t, 0, -128))
    return cases


def test_hostile_compressed_updates_are_refused_and_leave_the_sum_and_model_as_they_were(compressed, monkeypatch):
    live = compressed
    credentials = live.enrol(2)
    submitted = []  # what reached the collector: a hostile update is refused before its lock (checked_update)
    submit = live.leader.collector.submit
    monkeypatch.setattr(
        live.leader.collector, "submit", lambda learner, *rest: submitted.append(learner) or submit(learner, *rest)
    )
    for case, payload in hostile(live, entries(live, 1)).items():
        send_counted(live, entries(live, 0), credentials[0], 0)
        chunk = payload if isinstance(payload, bytes) else live.gradient(1, tensors=payload, compress=settings(live)[0])
        with pytest.raises(grpc.RpcError) as error:
            live.accumulate(chunk, credentials[1])
            pytest.fail(f"{case}: accepted")
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, error.value.details())
        assert re.search(REASONS[case], error.value.details() or ""), (case, error.value.details())
        summary, refused = live.close_round()  # the reference counted learner 0's update alone
        assert (summary.learners, refused) == (1, None), case
        assert 1 not in submitted, case
    send_counted(live, entries(live, 1), credentials[1], 1)  # the leader still counts the learner it refused
    send_counted(live, entries(live, 2), credentials[0], 0)
    summary, _ = live.close_round()
    assert summary.learners == 2 and summary.bytes_in < live.leader.global_model.gradient_payload_bytes()
