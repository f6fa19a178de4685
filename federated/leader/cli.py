"""leader.py's command line: parse the flags before torch loads, then configure, build and run the leader."""

import logging
import signal
from collections.abc import Sequence
from typing import TYPE_CHECKING

from federated.common.flags import CommandLine
from federated.leader import config as leader_flags

if TYPE_CHECKING:
    from federated.leader.app import Leader

log = logging.getLogger("leader")


def build(given: CommandLine, serving: bool = False) -> "Leader":
    """The leader a command line asks for: a new run, or the checkpoint of --resume DIR continued (its flags
    restored first, then the defaults that depend on them derived). Raises SystemExit saying what to change.
    serving: it is to listen on its port, so rpc.ListenError at once if it cannot (before a new run sets aside
    the folder of the leader that holds the port)."""
    from federated.leader import (  # torch, once the flags are known to be good
        app,
        checkpoint,
    )
    from federated.net import rpc

    saved = checkpoint.load(given.values["resume"]) if given.values.get("resume") else None
    config = leader_flags.configure(given, saved["config"] if saved else None)
    if serving:
        rpc.check_can_listen(f"{config.host}:{config.port}")
    return app.Leader(config, saved)


def main(argv: Sequence[str] | None = None) -> int:
    given = leader_flags.command_line(argv)  # a wrong flag is refused before torch is imported
    import torch

    import utils
    from federated.common import runtime
    from federated.net import rpc

    runtime.tune_allocator()
    runtime.configure_logging("leader", bool(given.values.get("verbose")))
    torch.set_num_threads(1)
    try:
        leader = build(given, serving=True)
        runtime.allow_open_files(leader.config.learners)  # one socket a learner, at the start and the final push
        for signum in (signal.SIGINT, signal.SIGTERM):  # give up the open round, checkpoint, tell the learners, exit 0
            signal.signal(signum, lambda *_: leader.stopping.set())
        return leader.run()
    except (utils.DatasetError, rpc.SecurityError) as error:
        log.error("%s", error)
        return 2
    except rpc.ListenError as error:
        log.error("%s%s", error, " (another leader?): stop it, or choose another --port" if error.in_use else "")
        return 2
