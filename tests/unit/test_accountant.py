"""The accountant reports what Opacus' RDP analysis computes for the same schedule, and resumes from its state."""

import math

from federated.privacy.accountant import Accountant
from tests.support.privacy import independent_epsilon


def test_no_step_spends_nothing() -> None:
    assert Accountant(1e-5).epsilon() == 0.0


def test_epsilon_equals_opacus_analysis_without_sampling() -> None:
    accountant = Accountant(1e-5)
    for _ in range(20):
        accountant.step(1.1, 1.0)
    assert math.isclose(accountant.epsilon(), independent_epsilon([(1.1, 1.0, 20)], 1e-5), rel_tol=1e-12)


def test_epsilon_equals_opacus_analysis_with_sampling_and_changing_noise() -> None:
    accountant = Accountant(1e-6)
    accountant.step(0.9, 0.3, steps=7)
    accountant.step(1.3, 0.3)
    accountant.step(1.3, 0.3)
    accountant.step(0.9, 0.1, steps=5)
    schedule = [(0.9, 0.3, 7), (1.3, 0.3, 2), (0.9, 0.1, 5)]
    assert accountant.state() == schedule
    assert math.isclose(accountant.epsilon(), independent_epsilon(schedule, 1e-6), rel_tol=1e-12)


def test_epsilon_after_predicts_without_charging() -> None:
    accountant = Accountant(1e-5)
    accountant.step(1.0, 0.5, steps=3)
    predicted = accountant.epsilon_after(1.0, 0.5, steps=2)
    assert accountant.state() == [(1.0, 0.5, 3)]
    accountant.step(1.0, 0.5, steps=2)
    assert accountant.epsilon() == predicted > 0


def test_resumed_accountant_reports_the_same_epsilon() -> None:
    uninterrupted = Accountant(1e-5)
    for _ in range(6):
        uninterrupted.step(1.2, 0.4)
    first_half = Accountant(1e-5)
    for _ in range(3):
        first_half.step(1.2, 0.4)
    resumed = Accountant(1e-5, history=first_half.state())
    for _ in range(3):
        resumed.step(1.2, 0.4)
    assert resumed.state() == uninterrupted.state()
    assert resumed.epsilon() == uninterrupted.epsilon()
