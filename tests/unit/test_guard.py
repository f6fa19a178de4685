"""The guard's watchdog on its own: it cancels what overstays its deadline, and nothing else."""

import time

import pytest

from federated.net import guard


def test_the_watchdog_cancels_only_what_overstays():
    cancelled = []
    with guard.WATCHDOG.deadline(0.3, lambda: cancelled.append("slow")):
        time.sleep(0.8)
    with guard.WATCHDOG.deadline(5, lambda: cancelled.append("quick")):
        pass
    time.sleep(0.5)
    assert cancelled == ["slow"]


@pytest.mark.parametrize(
    "host, network",
    [
        ("10.1.2.3", "10.1.2.0/24"),
        ("10.1.2.250", "10.1.2.0/24"),  # a neighbour: the same caller
        ("10.1.3.3", "10.1.3.0/24"),
        ("::ffff:10.1.2.9", "10.1.2.0/24"),  # IPv4-mapped: IPv4
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # the other end of one subscriber's /64
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("127.0.0.1", "127.0.0.0/24"),  # every test's callers: one, as before
        ("::1", "::/64"),
        (None, "?"),  # no IP address (a Unix socket)
        ("leader.example", "?"),
    ],
)
def test_callers_without_a_credential_count_as_their_network(host, network):
    assert guard.caller_network(host) == network
