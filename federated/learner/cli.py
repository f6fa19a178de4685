"""learner.py's command line: parse the flags before torch loads, then configure and run the learner."""

import logging
import signal
from collections.abc import Sequence

from federated.learner import config as flags

log = logging.getLogger("learner")


def main(argv: Sequence[str] | None = None) -> int:
    config = flags.configure(flags.command_line(argv))  # a wrong flag is refused before torch is imported
    import grpc

    import utils
    from federated.common import runtime
    from federated.learner.app import Learner
    from federated.learner.session import GradientRefused, LeaderLost, LeaderUnreachable
    from federated.net import rpc
    from federated.wire import codec

    runtime.tune_allocator()
    runtime.allow_open_files(2 * config.virtual)  # a port a learner, and the leader's connection to it
    runtime.configure_logging("learner", config.verbose)
    log.info(
        "using %d torch threads; training on %s",
        runtime.set_threads(config.threads),
        runtime.pick_device(config.device),
    )
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops cleanly, like Ctrl-C
    try:
        Learner(config).run()
    except KeyboardInterrupt:
        log.info("stopping on signal")
    except GradientRefused as refused:
        log.error("%s", refused)
        return 2
    except LeaderUnreachable as unreachable:  # its message asks whether the leader runs where --leader says
        log.error("%s", unreachable)
        return 1
    except (grpc.RpcError, LeaderLost) as error:
        reason = f"{error.code().name} {error.details()}" if isinstance(error, grpc.RpcError) else str(error)
        log.error("gave up on the leader at %s: %s", config.leader, reason)
        return 1
    except rpc.ListenError as error:
        log.error(
            "%s%s", error, " (another learner?): choose another --port, or 0 for any free one" if error.in_use else ""
        )
        return 2
    except (codec.PayloadError, utils.DatasetError, rpc.SecurityError) as error:
        log.error("%s", error)
        return 2
    return 0
