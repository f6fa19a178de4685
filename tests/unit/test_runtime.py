"""Process setup: the open-files limit a leader or a process of many learners raises for its sockets."""

import resource

import pytest

from federated.common import runtime

UNLIMITED = resource.RLIM_INFINITY


def test_the_soft_limit_rises_to_what_is_needed_and_never_falls():
    assert runtime.soft_open_files(2064, 1024, 524288) == 2064
    assert runtime.soft_open_files(2064, 4096, 524288) == 4096
    assert runtime.soft_open_files(2064, 1024, UNLIMITED) == 2064
    assert runtime.soft_open_files(2064, UNLIMITED, UNLIMITED) == UNLIMITED


def test_a_hard_limit_below_the_need_is_refused_saying_how_to_raise_it():
    with pytest.raises(SystemExit, match=r"needs about 2064 open files.*at most 1024.*ulimit -n 2064"):
        runtime.soft_open_files(2064, 1024, 1024)


def test_allow_open_files_raises_this_process_soft_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = 256 if hard == UNLIMITED else min(256, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        runtime.allow_open_files(1000)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 1000 + runtime.OPEN_FILES_SLACK
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
