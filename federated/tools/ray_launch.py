"""Learners as actors on a Ray cluster, spread over its nodes by a placement group, with the leader here: on a
node of the cluster, or off it through Ray Client (launch.py --ray; docs/ray.md).

Each actor runs learner.py as a child process rather than the learner's code in the actor itself: the learner
keeps its own main thread, signal handlers (SIGTERM stops it cleanly), logging set-up and torch threads, as
when it runs alone, and Ray's worker process stays what Ray expects. The launcher stops each learner (SIGTERM)
before it kills its actor; a learner whose actor dies otherwise goes with it, as Ray kills the child processes
of the workers it ends (seen with Ray 2.60: with the launcher's SIGTERMs left out, the learners of the killed
actors were gone at once).

Ray is an optional extra (requirements-ray.txt, `make ray`): it is imported only when a run asks for it.
"""

import ipaddress
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from federated.tools import launch

INSTALL = "make ray (pip install -r requirements-ray.txt)"
CLIENT = "ray://"  # an address of Ray Client's server on the head: launch.py may run off the cluster
REACH_TIMEOUT_S = 5.0  # for the head's port to accept a connection
PLACEMENT_TIMEOUT_S = 120.0  # for the cluster to reserve every learner's CPUs, and to start their actors
POLL_S = 1.0  # how often the learners are asked whether they have ended
STOP_WAIT_S = 10.0  # for a learner to stop on SIGTERM before it is killed
CALL_TIMEOUT_S = 30.0  # for an actor to answer a call that does not wait on its learner
LISTENING = re.compile(r"LeaderService listening on \S+:(\d+) ")  # the leader's log line with its port
LOST = -1  # the exit code counted for a learner whose actor was lost (its process went with it)
GIVE_ADDRESS = "give --ray-leader-address HOST, an IPv4 address or host name of this machine that the nodes reach"


class RayUnavailable(Exception):
    """Why the learners cannot run on the Ray cluster; the message says what to do."""


def import_ray() -> Any:
    """The ray module, or RayUnavailable saying how to install it."""
    try:
        import ray
    except ImportError as error:
        raise RayUnavailable(f"launch.py --ray needs Ray, an optional extra: {INSTALL}") from error
    return ray


class LearnerActor:
    """One learner.py process on this actor's node, listening on every interface and advertising the node's
    address; its output goes to a file on the node until the launcher fetches it. Ray makes this class an
    actor; its calls run one at a time, so none of them waits on the learner (the launcher polls)."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        descriptor, name = tempfile.mkstemp(prefix="learner-", suffix=".log")
        os.close(descriptor)
        self.log_path = Path(name)

    def start(self, leader: str, threads: int, args: Sequence[str]) -> str:
        """Start the learner process of the leader at leader (HOST:PORT) with its flags args; the host it
        advertises (its node's address), with the ports its learners listen on (free ones, found by the learner
        itself: a process of --virtual K learners takes K)."""
        import ray

        host = ray.util.get_node_ip_address()
        command = [
            sys.executable,
            str(launch.ROOT / "learner.py"),
            "--leader",
            leader,
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--advertise",
            host,
            "--threads",
            str(threads),
            *args,
        ]
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                command,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return host

    def poll(self) -> int | None:
        """The learner's exit code, None while it runs."""
        assert self.process is not None
        return self.process.poll()

    def stop(self) -> None:
        """Stop the learner if it runs (stop_process: SIGTERM, then SIGKILL)."""
        if self.process is not None:
            stop_process(self.process)

    def take_log(self) -> str:
        """What the learner wrote (stdout and stderr); its file on the node is removed."""
        text = self.log_path.read_text(errors="replace")
        self.log_path.unlink()
        return text


def head(address: str) -> tuple[str, int] | None:
    """The head's host and port in address (HEAD:PORT or ray://HEAD:PORT); None for auto (Ray finds it)."""
    if address == "auto":
        return None
    host, _, port = address.removeprefix(CLIENT).rpartition(":")
    if not host or not port.isdigit():
        raise RayUnavailable(
            f"--ray {address!r}: give the head's HOST:6379 (launch.py on a node of the cluster), "
            "ray://HOST:10001 (anywhere else), or auto"
        )
    return host.strip("[]"), int(port)  # [IPv6]:PORT


def check_reachable(address: str) -> None:
    """RayUnavailable unless something listens at address: Ray itself retries an address where nothing
    answers for minutes, saying little."""
    if (found := head(address)) is None:
        return
    try:
        with socket.create_connection(found, timeout=REACH_TIMEOUT_S):
            pass
    except OSError as error:
        raise RayUnavailable(
            f"no Ray cluster answers at {address} ({error}): start one (ray start --head on its first node, ray "
            "start --address HEAD:6379 on the others), and give its head's address"
        ) from error


def route_address(host: str) -> str:
    """This machine's IPv4 address on the route to host (no packet is sent): the leader listens on IPv4."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))
            return probe.getsockname()[0]
    except OSError as error:  # socket.gaierror for a head with no IPv4 address (an IPv6 one)
        raise RayUnavailable(
            f"no IPv4 route to the head {host} ({error}), where the leader's address for the nodes is looked for "
            f"(the leader listens on IPv4, 0.0.0.0): {GIVE_ADDRESS}"
        ) from error


def check_nodes_reach(host: str, head_host: str) -> str:
    """host, this machine's address on the route to the head at head_host, unless the nodes cannot reach the
    leader there: a loopback address (the head reached through a tunnel or port-forward, ray://localhost:10001,
    would have each node dial itself) or a link-local one (not routed beyond this machine's link)."""
    ip = ipaddress.ip_address(host)
    if ip.is_loopback or ip.is_link_local:
        kind = "loopback" if ip.is_loopback else "link-local"
        raise RayUnavailable(
            f"this machine's address on the route to the head {head_host} is {host}, a {kind} address: the nodes "
            f"would not reach the leader there (through a tunnel to the head, each would dial itself); {GIVE_ADDRESS}"
        )
    return host


def leader_host(address: str, given: str | None) -> str | None:
    """The leader's address as the nodes reach it, where it is known before joining the cluster at address:
    given (--ray-leader-address, used as given), or with ray:// this machine's address on the route to the head
    (check_nodes_reach); None where Ray's address of this node is (launch.py on a node of the cluster)."""
    if given is not None:
        if ":" in given:
            raise RayUnavailable(
                f"--ray-leader-address {given!r}: give an IPv4 address or host name without a port (the leader "
                "listens on IPv4, on a port it finds free)"
            )
        return given
    found = head(address)
    if found and address.startswith(CLIENT):
        return check_nodes_reach(route_address(found[0]), found[0])
    return None


def connect(ray: Any, address: str, given: str | None = None) -> str:
    """Join the cluster at address as its driver: on one of its nodes (HEAD:PORT, auto), or from anywhere
    through Ray Client (ray://HEAD:PORT). This machine's address as the nodes reach it, where the leader
    listens: given (--ray-leader-address), Ray's address of this node, or the address on the route to the head
    (leader_host). The actors import this project from where it lies here: every node has it at the same path,
    as it has Ray."""
    check_reachable(address)
    host = leader_host(address, given)
    try:
        ray.init(
            address=address,
            runtime_env={"env_vars": {"PYTHONPATH": str(launch.ROOT)}},
            log_to_driver=False,  # the learners' output goes to out/learnerN.log
            logging_level="WARNING",
        )
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise RayUnavailable(
            f"cannot join the Ray cluster at {address} ({error}); start one (ray start --head on its first node, "
            "ray start --address HEAD:6379 on the others), and give --ray HEAD:6379 or auto on one of its nodes, "
            "ray://HEAD:10001 elsewhere"
        ) from error
    return host or ray.util.get_node_ip_address()


def reserve(ray: Any, learners: int, cpus: int) -> Any:
    """A placement group of one bundle of cpus CPUs per learner, spread over the nodes (SPREAD: on as many
    nodes as there are, several on one where there are fewer), once the cluster has reserved it."""
    have = ray.cluster_resources().get("CPU", 0)
    if have < learners * cpus:
        raise RayUnavailable(
            f"{learners} learners of {cpus} CPUs need {learners * cpus} CPUs; the cluster has {have:g}: add nodes "
            "(ray start --address HEAD:6379), or lower --learners or --ray-cpus"
        )
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group([{"CPU": cpus}] * learners, strategy="SPREAD")
    try:
        ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError as error:
        remove_placement_group(group)
        raise RayUnavailable(
            f"the cluster did not reserve {learners} x {cpus} CPUs in {PLACEMENT_TIMEOUT_S:.0f} s: are its CPUs "
            "taken by other jobs? (ray status)"
        ) from error
    return group


def place(ray: Any, group: Any, learners: int, cpus: int) -> list[Any]:
    """A LearnerActor in each bundle of group."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    actor = ray.remote(num_cpus=cpus, max_restarts=0)(LearnerActor)
    return [
        actor.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)
        ).remote()
        for index in range(learners)
    ]


def wait_for_end(ray: Any, leader: subprocess.Popen, actors: list[Any], timeout: float) -> list[int | None]:
    """Exit codes of the leader and the learners once all have ended, or after timeout seconds or at Ctrl-C
    (None for those still running; LOST for a learner whose actor was lost: the run goes on without it, as the
    leader drops it)."""
    deadline = time.monotonic() + timeout
    leader_code: int | None = None
    learners: list[int | None] = [None] * len(actors)
    try:
        while (leader_code is None or None in learners) and time.monotonic() < deadline:
            time.sleep(POLL_S)
            leader_code = leader.poll()
            poll_learners(ray, actors, learners)
    except KeyboardInterrupt:
        print("stopping on Ctrl-C", file=sys.stderr, flush=True)
    return [leader_code, *learners]


def poll_learners(ray: Any, actors: list[Any], codes: list[int | None]) -> None:
    """Ask each learner still running (None in codes) whether it has ended, each call on its own, and write its
    exit code into codes. An actor that has not answered within CALL_TIMEOUT_S of the poll, or is out of reach
    for now, counts as still running (asked again at the next poll); one that was lost (its worker or node died)
    counts as ended with LOST, its learner process gone with it. Neither stops the others."""
    calls = {index: actors[index].poll.remote() for index, code in enumerate(codes) if code is None}
    deadline = time.monotonic() + CALL_TIMEOUT_S
    for index, call in calls.items():
        try:
            codes[index] = ray.get(call, timeout=max(0.0, deadline - time.monotonic()))
        except (ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
            pass
        except ray.exceptions.RayActorError as error:
            print(
                f"NOTICE: learner {index}'s actor was lost; counted as ended (exit code {LOST}): {error}",
                file=sys.stderr,
                flush=True,
            )
            codes[index] = LOST


def stop_process(process: subprocess.Popen) -> None:
    """Stop process if it runs: SIGTERM (the leader and the learners stop cleanly on it), then SIGKILL after
    STOP_WAIT_S."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()  # (SIGKILL: it ends; the wait only reaps it)


def collect(ray: Any, actors: list[Any], out: Path) -> None:
    """Stop each learner still running, copy its log to out/learnerN.log and kill its actor (and so its
    learner, should it not have stopped)."""
    for index, actor in enumerate(actors):
        try:
            ray.get(actor.stop.remote(), timeout=STOP_WAIT_S + CALL_TIMEOUT_S)
            (out / f"learner{index}.log").write_text(ray.get(actor.take_log.remote(), timeout=CALL_TIMEOUT_S))
        except ray.exceptions.RayError as error:
            print(f"NOTICE: no log from learner {index}: {error}", file=sys.stderr, flush=True)
        finally:
            ray.kill(actor)


def run(
    address: str,
    learners: int,
    cpus: int,
    leader_args: list[str],
    learner_args: Sequence[str],
    out: Path,
    timeout: float,
    virtual: int = 1,
    given_host: str | None = None,
) -> list[int | None]:
    """A leader here, listening on every interface, and `learners` learner actors of cpus CPUs each spread over
    the cluster at address (each a process of `virtual` learners: learner_args says --virtual), to the run's end,
    timeout seconds or Ctrl-C; then nothing is left on the cluster. The nodes reach the leader at given_host
    (--ray-leader-address) if given, else at the address connect finds.
    Exit codes, the leader's first (None for a process still running at the timeout or Ctrl-C, then stopped)."""
    ray = import_ray()
    host = connect(ray, address, given_host)
    try:
        group = reserve(ray, learners, cpus)
        try:
            return run_placed(ray, group, host, learners, cpus, leader_args, learner_args, out, timeout, virtual)
        finally:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(group)
    finally:
        ray.shutdown()


def run_placed(
    ray: Any,
    group: Any,
    host: str,
    learners: int,
    cpus: int,
    leader_args: list[str],
    learner_args: Sequence[str],
    out: Path,
    timeout: float,
    virtual: int,
) -> list[int | None]:
    """run's leader and learners once their CPUs are reserved in group: the learners start once the leader
    listens, and timeout counts from the leader's start."""
    deadline = time.monotonic() + timeout
    leader = launch.start_leader(learners * virtual, leader_args, "0.0.0.0", 0, out, piped=True)
    console = LeaderConsole(leader)
    actors: list[Any] = []
    try:
        port = console.port_within(timeout)
        if port is None:  # it stopped before it listened (its log says why), or is stopped now
            if leader.poll() is None:
                print(f"NOTICE: the leader does not listen after --timeout {timeout:g} s; stopping it", flush=True)
            return [leader.poll(), *[None] * learners]
        actors = place(ray, group, learners, cpus)
        started = [actor.start.remote(f"{host}:{port}", cpus, learner_args) for actor in actors]
        advertised = ray.get(started, timeout=PLACEMENT_TIMEOUT_S)
        print(f"the leader listens on {host}:{port}; learners on {', '.join(advertised)}", flush=True)
        return wait_for_end(ray, leader, actors, deadline - time.monotonic())
    finally:
        stop_process(leader)  # on SIGTERM it gives up the open round, checkpoints and tells its learners
        console.finish()
        collect(ray, actors, out)


class LeaderConsole:
    """The leader's output, echoed to this console line by line from a thread, and the port it listens on, read
    from its log: the leader is started on port 0 and binds a free port itself, so no other program can take the
    port between the launcher's choice and the leader's bind."""

    def __init__(self, leader: subprocess.Popen) -> None:
        self.port: int | None = None
        self.known = threading.Event()  # the port is read, or the leader's output has ended without it
        self.thread = threading.Thread(target=self.echo, args=(leader.stdout,), daemon=True)
        self.thread.start()

    def echo(self, output: IO[str]) -> None:
        for line in output:
            print(line, end="", flush=True)
            if self.port is None and (found := LISTENING.search(line)):
                self.port = int(found.group(1))
                self.known.set()
        self.known.set()

    def port_within(self, timeout: float) -> int | None:
        """The leader's port once it listens; None if it ended first or still does not listen after timeout
        seconds."""
        self.known.wait(timeout)
        return self.port

    def finish(self) -> None:
        """Wait for the rest of the output of the leader, which has ended."""
        self.thread.join(STOP_WAIT_S)
