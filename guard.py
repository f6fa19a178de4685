"""Bounds on what a peer can hold: per-method permits, deadlines on silent peers, and the shared token.

grpcio gives every call a thread of the server's pool, and the call keeps it while its request
arrives and while each streamed reply is sent. Unbounded, a few clients that open GetData streams
and never read them (or start a unary call and never finish sending it) hold every thread, and
registration and gradients wait behind them. The Gate admits each call with a permit of its method
or refuses it at once with RESOURCE_EXHAUSTED, reads even unary requests inside the handler (where
a deadline can end the wait), and cancels any call whose peer sends or reads nothing for
idle_timeout seconds. The pool holds a thread for every permit, so an admitted call never queues.
"""

import hmac
import itertools
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import grpc
from grpc_health.v1 import health

IDLE_TIMEOUT_S = 60.0
DEFAULT_LIMIT = 2  # concurrent calls of a method that has no limit of its own (health Watch, reflection)
OTHER_METHODS = 4  # health Check and Watch, reflection v1 and v1alpha: the pool has room for them too
SPARE_THREADS = 4  # for refusals, which take a thread for an instant
UNAUTHENTICATED_SERVICES = (health.SERVICE_NAME,)  # probes need no token; they reveal nothing
TOKEN_VARIABLE = "FL_TOKEN"  # where both entry points look for the token when --token is not given
TICK_S = 0.25


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
    while True:
        with WATCHDOG.deadline(seconds, cancel):
            try:
                item = next(items)
            except StopIteration:
                return
        yield item


class Gate(grpc.ServerInterceptor):
    """Admits each call with a permit of its method, checks the token before anything is read, and
    bounds how long a call may wait on its peer."""

    def __init__(self, limits: Mapping[str, int], idle_timeout: float = IDLE_TIMEOUT_S,
                 token: str | None = None) -> None:
        """limits: concurrent calls allowed per full method name ("/package.Service/Method")."""
        self.limits, self.idle_timeout = dict(limits), idle_timeout
        self.expected = f"Bearer {token}".encode() if token else None
        self._permits: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()

    def threads_needed(self) -> int:
        """A pool thread for every permit, so that an admitted call never waits for one."""
        return sum(self.limits.values()) + DEFAULT_LIMIT * OTHER_METHODS + SPARE_THREADS

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return None
        if self.expected and not method.lstrip("/").startswith(UNAUTHENTICATED_SERVICES):
            given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
            if not hmac.compare_digest(given.encode(), self.expected):
                return _refusal(grpc.StatusCode.UNAUTHENTICATED,
                                f"missing or wrong token: pass --token or set {TOKEN_VARIABLE}")
        permits = self._permits_of(method)
        if not permits.acquire(blocking=False):
            limit = self.limits.get(method, DEFAULT_LIMIT)
            return _refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"{limit} {method.rsplit('/', 1)[-1]} calls are already in progress; retry shortly")
        return self._admitted(handler, permits.release)

    def _permits_of(self, method: str) -> threading.BoundedSemaphore:
        with self._lock:  # methods come from the server's own handlers: a finite set
            if method not in self._permits:
                self._permits[method] = threading.BoundedSemaphore(self.limits.get(method, DEFAULT_LIMIT))
            return self._permits[method]

    def _admitted(self, handler: grpc.RpcMethodHandler, release: Callable[[], None]) -> grpc.RpcMethodHandler:
        """The handler, served as request-streaming: grpcio then calls it as soon as a thread takes the call,
        instead of first waiting, without a deadline, for a unary request to arrive."""
        behaviour = (handler.stream_stream or handler.stream_unary if handler.request_streaming
                     else handler.unary_stream or handler.unary_unary)

        def arguments(requests: Iterator, context: grpc.ServicerContext):
            if not context.add_callback(release):  # the permit goes back when the call ends, however it ends
                release()
            if handler.request_streaming:
                return idle_bounded(requests, self.idle_timeout, context.cancel)
            with WATCHDOG.deadline(self.idle_timeout, context.cancel):
                request = next(requests, None)
            if request is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a unary call carries exactly one request message")
            return request

        if handler.response_streaming:
            def serve_stream(requests: Iterator, context: grpc.ServicerContext) -> Iterator:
                for response in behaviour(arguments(requests, context), context):
                    with WATCHDOG.deadline(self.idle_timeout, context.cancel):
                        yield response  # resumes once gRPC has sent it: a peer that reads nothing stalls here

            return grpc.stream_stream_rpc_method_handler(serve_stream, handler.request_deserializer,
                                                         handler.response_serializer)

        def serve_unary(requests: Iterator, context: grpc.ServicerContext):
            return behaviour(arguments(requests, context), context)

        return grpc.stream_unary_rpc_method_handler(serve_unary, handler.request_deserializer,
                                                    handler.response_serializer)


def _refusal(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that ends the call with code and message without reading its request."""

    def refuse(requests: Iterator, context: grpc.ServicerContext) -> None:
        context.abort(code, message)

    return grpc.stream_unary_rpc_method_handler(refuse)
