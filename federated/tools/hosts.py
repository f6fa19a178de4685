"""Test hosts: network namespaces with addresses of their own on a bridge, so that a leader and its learners
run as on separate machines (for tests/e2e/test_hosts.py and the benchmark's links figure).

Nothing here touches the root namespace's interfaces or routes: the bridge lives in a namespace of its own,
each host's veth pair is created inside that namespace with its other end placed straight into the host's,
and the hosts have no route beyond their subnet, so traffic stays among the namespaces made here. Each set
of hosts is named after this process (PREFIX + pid + a counter), so that parallel runs do not collide and
leftovers of dead runs can be recognised and removed. Every command and wait is bounded.
"""

import atexit
import itertools
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

PREFIX = "flhost"
SUBNET = "10.47.0"  # host i has SUBNET.(i + 1)/24; each set of hosts has a bridge of its own, so sets may share it
UNUSED_ADDRESS = f"{SUBNET}.250"  # on the subnet, yet no host has it: nothing answers there
COMMAND_TIMEOUT_S = 15.0
KILL_WAIT_S = 10.0
_sets = itertools.count()


def run(*command: str) -> str:
    """Run an ip/tc command (bounded); its output. Raises CalledProcessError with its stderr on failure."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    if done.returncode:
        raise subprocess.CalledProcessError(done.returncode, command, done.stdout, done.stderr)
    return done.stdout


def unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None: tried for real, since a container may refuse
    them even to root."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"network-namespace hosts need {' and '.join(missing)} (iproute2), which this machine lacks"
    if os.geteuid() != 0:
        return "network-namespace hosts need root (ip netns add)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        run("ip", "netns", "add", probe)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        return f"cannot make a network namespace here: {getattr(error, 'stderr', '') or error}".strip()
    run("ip", "netns", "delete", probe)
    return None


def burst_bytes(rate_bits: int) -> int:
    """The token bucket of a tbf at rate_bits per second: two 64 KiB GSO packets, and at least 1 ms of traffic.
    Smaller buckets cap the link below its rate: 64 KiB carried 865 Mbit/s of payload on a 1 Gbit/s link here,
    128 KiB 957 and 1.25 MB 964 (100 Mbit/s: 96 either way). After an idle spell a full bucket lets this many
    bytes through at once, so links with small buckets are the closest to a real wire."""
    return max(rate_bits // 8 // 1000, 128 << 10)


def rate_bits(rate: str) -> int:
    """'100mbit' or '1gbit' (tc's units) in bits per second."""
    units = {"gbit": 10**9, "mbit": 10**6, "kbit": 10**3, "bit": 1}
    for unit, factor in units.items():
        if rate.endswith(unit):
            return int(float(rate[: -len(unit)]) * factor)
    raise ValueError(f"rate {rate!r}: give a number with gbit, mbit or kbit")


@dataclass(frozen=True)
class Host:
    """One namespace: its name, its address, and the command prefix that runs a program inside it."""

    name: str
    address: str
    device: str = "eth0"

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]


class Hosts:
    """count hosts on one bridge, each outgoing link limited to rate (tc's units, e.g. '100mbit') if given.
    A context manager: leaving it (or remove()) kills every process in the namespaces and deletes them."""

    def __init__(self, count: int, rate: str | None = None) -> None:
        if not 0 < count < 250:  # SUBNET.250 is UNUSED_ADDRESS
            raise ValueError(f"{count} hosts: make 1 to 249")
        self.tag = f"{PREFIX}{os.getpid()}-{next(_sets)}"
        self.bridge = f"{self.tag}-br"
        self.hosts = [Host(f"{self.tag}-h{index}", f"{SUBNET}.{index + 1}") for index in range(count)]
        self.rate = rate

    def __enter__(self) -> "Hosts":
        self.create()
        atexit.register(self.remove)  # a run ended by SIGTERM (below) or sys.exit still removes them
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _exit_on_sigterm)  # unwinds through __exit__ and pytest's teardown
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def __getitem__(self, index: int) -> Host:
        return self.hosts[index]

    def create(self) -> None:
        """Make the bridge and the hosts (after removing dead runs' leftovers); on failure, remove what was made."""
        remove_leftovers()
        try:
            self._make()
        except BaseException:
            self.remove()
            raise

    def _make(self) -> None:
        run("ip", "netns", "add", self.bridge)
        run("ip", "-n", self.bridge, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.bridge, "link", "set", "br0", "up")
        for index, host in enumerate(self.hosts):
            run("ip", "netns", "add", host.name)
            port = f"port{index}"  # the bridge's side of this host's cable
            run(
                "ip",
                "-n",
                self.bridge,
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                host.device,
                "netns",
                host.name,
            )
            run("ip", "-n", self.bridge, "link", "set", port, "master", "br0", "up")
            run("ip", "-n", host.name, "addr", "add", f"{host.address}/24", "dev", host.device)
            run("ip", "-n", host.name, "link", "set", "lo", "up")
            run("ip", "-n", host.name, "link", "set", host.device, "up")
            if self.rate:
                self.limit(host, self.rate)

    def limit(self, host: Host, rate: str) -> None:
        """Limit what host sends to rate: a token bucket (tbf) on its interface, queueing up to 50 ms of
        traffic before it drops (enough for TCP to keep the link busy)."""
        run(
            "tc",
            "-n",
            host.name,
            "qdisc",
            "replace",
            "dev",
            host.device,
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            str(burst_bytes(rate_bits(rate))),
            "latency",
            "50ms",
        )

    def link(self, host: Host, up: bool) -> None:
        """Take host's link down (as if its cable were pulled) or bring it back up."""
        run("ip", "-n", host.name, "link", "set", host.device, "up" if up else "down")

    def remove(self) -> None:
        """Kill every process in these namespaces and delete them (those never made are skipped); one that
        cannot be removed does not keep the others, and its error is raised at the end."""
        errors = []
        for name in [host.name for host in self.hosts] + [self.bridge]:
            try:
                remove_namespace(name)
            except (subprocess.SubprocessError, OSError) as error:
                errors.append(f"{name}: {error}")
        if errors:
            raise RuntimeError("could not remove " + "; ".join(errors))


def namespace_pids(name: str) -> list[int]:
    try:
        return [int(pid) for pid in run("ip", "netns", "pids", name).split()]
    except subprocess.CalledProcessError:  # no such namespace
        return []


def remove_namespace(name: str) -> None:
    """Kill the processes in namespace name (only ours live there), wait for them, and delete it."""
    deadline = time.monotonic() + KILL_WAIT_S
    while (pids := namespace_pids(name)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    try:
        run("ip", "netns", "delete", name)
    except subprocess.CalledProcessError as error:
        if "No such file" not in error.stderr:
            raise


def remove_leftovers() -> None:
    """Delete namespaces of this helper left by runs whose process is gone (killed before it cleaned up)."""
    for line in run("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        owner = name[len(PREFIX) :].split("-")[0] if name.startswith(PREFIX) else ""
        if owner.isdigit() and not _alive(int(owner)):
            remove_namespace(name)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
