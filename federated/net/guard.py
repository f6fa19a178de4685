"""Bounds on what a caller can hold: per-method (and per-caller) permits, deadlines on silent callers, the token.

grpcio gives every call a thread of the server's pool, and the call keeps it while its request
arrives and while each streamed reply is sent. Unbounded, a few clients that open GetData streams
and never read them (or start a unary call and never finish sending it) hold every thread, and
registration and gradients wait behind them. The Gate admits each call with a permit of its method
(for methods that name their callers, a permit of that caller) or refuses it at once with
RESOURCE_EXHAUSTED, before reading anything; it reads even unary requests inside the handler, where
a deadline ends the wait, and cancels any call whose peer sends or reads nothing for too long. The
pool holds a thread for every permit, so an admitted call never queues. A request that does not
parse is refused with INVALID_ARGUMENT.

Callers without a credential count by network (caller_network: an IPv4 /24, an IPv6 /64), not by address,
and their reply streams must keep up a minimal rate (MIN_ANONYMOUS_RATE) once their first idle timeout is
over: four addresses of one network hold one caller's turns, and four networks hold their turns only for as
long as a stream of that size takes at that rate, not for as long as they read a chunk per idle timeout.
"""

import hmac
import ipaddress
import itertools
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health

IDLE_TIMEOUT_S = 60.0
SMALL_REQUEST_S = 5.0  # a request of a few bytes (a registration, a health check) arrives within this, or never
DEFAULT_LIMIT = 2  # concurrent calls without a credential of a method with no Limit of its own (reflection)
OTHER_METHODS = 3  # health Watch, reflection v1 and v1alpha: the pool has room for them too
SPARE_THREADS = 4  # for refusals, which take a thread for an instant
UNAUTHENTICATED_SERVICES = (health.SERVICE_NAME,)  # probes need no token; they reveal nothing
TOKEN_VARIABLE = "FL_TOKEN"  # where both entry points look for the token when --token is not given
TICK_S = 0.25
# Bytes a second a reply stream to a caller without a credential must average after its first idle timeout
# (GetModel before registering): 512 kbit/s, so a 45 MB model (resnet18) may take 12 minutes, not days of a
# chunk a minute.
MIN_ANONYMOUS_RATE = 64 << 10
IPV4_NETWORK, IPV6_NETWORK = 24, 64  # prefix lengths of the networks whose addresses one party commonly holds


class Watchdog:
    """Calls cancel() of whatever is armed and not disarmed in time; one thread serves every deadline."""

    def __init__(self) -> None:
        self._deadlines: dict[int, tuple[float, Callable[[], None]]] = {}
        self._keys = itertools.count()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def deadline(self, seconds: float, cancel: Callable[[], None]) -> Iterator[None]:
        """Run the body; if it takes longer than seconds, call cancel (from the watchdog's thread)."""
        key = next(self._keys)
        with self._lock:
            self._deadlines[key] = (time.monotonic() + seconds, cancel)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._deadlines.pop(key, None)

    def _run(self) -> None:
        while True:  # a daemon thread for the life of the process, waking every TICK_S
            time.sleep(TICK_S)
            now = time.monotonic()
            with self._lock:
                expired = [key for key, (deadline, _) in self._deadlines.items() if deadline <= now]
                cancels = [self._deadlines.pop(key)[1] for key in expired]
            for cancel in cancels:
                cancel()


WATCHDOG = Watchdog()


def idle_bounded(items: Iterator, seconds: float, cancel: Callable[[], None]) -> Iterator:
    """The items, calling cancel if waiting for the next one takes more than seconds (a stalled stream)."""
    while True:  # each wait is bounded by the watchdog's deadline; the stream's end returns
        with WATCHDOG.deadline(seconds, cancel):
            try:
                item = next(items)
            except StopIteration:
                return
        yield item


Headers = Mapping[str, str]


@dataclass(frozen=True)
class Limit:
    """How many calls of a method may run at once: for each caller (a learner named by its credential, or
    else its network: caller_network), and in all from callers without a credential."""

    per_caller: int = 1
    anonymous: int = DEFAULT_LIMIT  # 0: a credential is required (UNAUTHENTICATED without one)
    request_s: float = SMALL_REQUEST_S  # seconds a unary request may take to arrive whole


@dataclass(frozen=True)
class Malformed:
    """What a request that does not parse becomes, so that the handler can refuse it properly."""

    error: str


class Gate(grpc.ServerInterceptor):
    """Admits each call within its method's Limit, checks the token before anything is read, and bounds how
    long a call may wait on its peer. Permits are taken inside the handler, where grpcio always runs them,
    and returned when the call ends: a call grpcio turns away itself holds none."""

    def __init__(
        self,
        limits: Mapping[str, Limit],
        idle_timeout: float = IDLE_TIMEOUT_S,
        token: str | None = None,
        identify: Callable[[Headers], str | None] = lambda headers: None,
        named_callers: int = 0,
        min_anonymous_rate: float = MIN_ANONYMOUS_RATE,
    ) -> None:
        """limits: by full method name ("/package.Service/Method"); other methods get Limit() and take no names.
        identify names the caller from its call headers (None: anonymous), among named_callers names at most;
        a reply stream to an anonymous caller is cancelled once it falls below min_anonymous_rate bytes a second
        after its first idle_timeout."""
        self.limits, self.idle_timeout, self.identify, self.named_callers = (
            dict(limits),
            idle_timeout,
            identify,
            named_callers,
        )
        self.min_anonymous_rate = min_anonymous_rate
        self.expected = f"Bearer {token}".encode() if token else None
        self._held: dict[tuple[str, ...], int] = {}  # calls in progress by (method, caller); none kept at zero
        self._lock = threading.Lock()

    def threads_needed(self) -> int:
        """A pool thread for every permit, so that an admitted call never waits for one."""
        listed = sum(limit.per_caller * self.named_callers + limit.anonymous for limit in self.limits.values())
        return listed + DEFAULT_LIMIT * OTHER_METHODS + SPARE_THREADS

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return None
        headers = dict(handler_call_details.invocation_metadata or ())
        if self.expected and not method.lstrip("/").startswith(UNAUTHENTICATED_SERVICES):
            if not hmac.compare_digest(headers.get("authorization", "").encode(), self.expected):
                return _refusal(
                    grpc.StatusCode.UNAUTHENTICATED, f"missing or wrong token: pass --token or set {TOKEN_VARIABLE}"
                )
        limit = self.limits.get(method)
        name = self.identify(headers) if limit else None
        if limit and limit.anonymous == 0 and name is None:
            return _refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                "this call needs the credential of a registered learner (the fl-credential header); register first",
            )
        return self._admitted(handler, method, limit or Limit(), name)

    def _take(self, method: str, limit: Limit, name: str | None, context: grpc.ServicerContext) -> str | None:
        """Take the call's permits, to be returned when it ends; or say why there are none."""
        caller = (method, "learner", name) if name else (method, "network", caller_network(peer_host(context)))
        wanted = [(caller, limit.per_caller)] + ([] if name else [((method, "anonymous"), limit.anonymous)])
        with self._lock:
            full = [key for key, most in wanted if self._held.get(key, 0) >= most]
            if full:
                whom = "from this caller" if full[0] == caller else "from callers without a credential"
                return f"{method.rsplit('/', 1)[-1]} calls {whom} are already in progress; retry shortly"
            for key, _ in wanted:
                self._held[key] = self._held.get(key, 0) + 1

        def release() -> None:
            with self._lock:
                for key, _ in wanted:
                    self._held[key] -= 1
                    if not self._held[key]:
                        del self._held[key]

        if not context.add_callback(release):  # the permits go back when the call ends, however it ends
            release()
        return None

    def _admitted(
        self, handler: grpc.RpcMethodHandler, method: str, limit: Limit, name: str | None
    ) -> grpc.RpcMethodHandler:
        """The handler, served as request-streaming: grpcio then calls it as soon as a thread takes the call,
        instead of first waiting, without a deadline, for a unary request to arrive."""
        behaviour = (
            handler.stream_stream or handler.stream_unary
            if handler.request_streaming
            else handler.unary_stream or handler.unary_unary
        )

        def arguments(requests: Iterator, context: grpc.ServicerContext):
            refusal = self._take(method, limit, name, context)
            if refusal:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
            if handler.request_streaming:
                return (
                    _parsed(request, context) for request in idle_bounded(requests, self.idle_timeout, context.cancel)
                )
            with WATCHDOG.deadline(limit.request_s, context.cancel):
                request = next(requests, None)
            if request is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a unary call carries exactly one request message")
            return _parsed(request, context)

        if handler.response_streaming:

            def serve_stream(requests: Iterator, context: grpc.ServicerContext) -> Iterator:
                # an anonymous caller's stream must be over by then: its first idle timeout, and the time its
                # bytes take at the minimal rate (each reply's size added as it goes)
                over = None if name else time.monotonic() + self.idle_timeout
                for response in behaviour(arguments(requests, context), context):
                    wait = self.idle_timeout
                    if over is not None:
                        over += _size(response) / self.min_anonymous_rate
                        wait = min(wait, over - time.monotonic())
                        if wait <= 0:
                            context.abort(
                                grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"this stream fell below {self.min_anonymous_rate / 1024:g} KiB/s, the least a "
                                "caller without a credential must read at",
                            )
                    with WATCHDOG.deadline(wait, context.cancel):
                        yield response  # resumes once gRPC has sent it: a peer that reads nothing stalls here

            return grpc.stream_stream_rpc_method_handler(
                serve_stream, _tolerant(handler.request_deserializer), handler.response_serializer
            )

        def serve_unary(requests: Iterator, context: grpc.ServicerContext):
            return behaviour(arguments(requests, context), context)

        return grpc.stream_unary_rpc_method_handler(
            serve_unary, _tolerant(handler.request_deserializer), handler.response_serializer
        )


def peer_host(context: grpc.ServicerContext) -> str | None:
    """The caller's IP address as the server sees it ('ipv4:10.0.0.2:5000' gives '10.0.0.2',
    'ipv6:%5B::1%5D:5000' gives '::1'), if it has one."""
    kind, _, rest = context.peer().partition(":")
    return urllib.parse.unquote(rest).rsplit(":", 1)[0].strip("[]") if kind in ("ipv4", "ipv6") else None


def caller_network(host: str | None) -> str:
    """Whom a caller without a credential counts as: the IPv4 /24 or IPv6 /64 network of its address (an
    IPv4-mapped IPv6 address counts as IPv4), for an IPv6 host commonly holds a whole /64 and a party many
    neighbouring IPv4 addresses: four addresses of one network hold the turns of one caller, not four. So
    127.0.0.1 and 127.0.0.2 are one caller, as they are one machine. '?' for a peer without an IP address."""
    try:
        ip = ipaddress.ip_address(host or "")
    except ValueError:
        return "?"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    prefix = IPV4_NETWORK if ip.version == 4 else IPV6_NETWORK
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def _size(response: Any) -> int:
    """Bytes of a reply: serialised chunk messages are bytes already, others are protobuf messages."""
    return len(response) if isinstance(response, bytes | bytearray | memoryview) else response.ByteSize()


def _tolerant(deserializer: Callable[[bytes], object] | None) -> Callable[[bytes], object] | None:
    """deserializer, but returning Malformed instead of raising: grpcio would answer INTERNAL and log a traceback."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> object:
        try:
            return deserializer(data)
        except Exception as error:  # protobuf's DecodeError, framing's ValueError: whatever the parser raises
            return Malformed(f"{type(error).__name__}: {str(error)[:200]}")

    return parse


def _parsed(request: object, context: grpc.ServicerContext) -> object:
    if isinstance(request, Malformed):
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"the request does not parse as its message type ({request.error})"
        )
    return request


def _refusal(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that ends the call with code and message without reading its request."""

    def refuse(requests: Iterator, context: grpc.ServicerContext) -> None:
        context.abort(code, message)

    return grpc.stream_unary_rpc_method_handler(refuse)
