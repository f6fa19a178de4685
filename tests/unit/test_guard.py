"""The guard's watchdog on its own: it cancels what overstays its deadline, and nothing else."""

import time

from federated.net import guard


def test_the_watchdog_cancels_only_what_overstays():
    cancelled = []
    with guard.WATCHDOG.deadline(0.3, lambda: cancelled.append("slow")):
        time.sleep(0.8)
    with guard.WATCHDOG.deadline(5, lambda: cancelled.append("quick")):
        pass
    time.sleep(0.5)
    assert cancelled == ["slow"]
