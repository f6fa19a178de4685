"""gRPC plumbing shared by leader and learner: generated stubs, TLS and tokens, servers, channels, credentials."""

import errno
import hashlib
import ipaddress
import logging
import os
import secrets
import socket
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from federated.common.flags import option
from federated.net import guard

try:
    from protos import leader_pb2, leader_pb2_grpc, learner_pb2, learner_pb2_grpc
except ImportError as error:  # the generated modules are build outputs, not sources
    raise SystemExit(f"generated gRPC code is missing ({error}); run `make proto` first") from None

LEADER_SERVICE = leader_pb2.DESCRIPTOR.services_by_name["LeaderService"].full_name
LEARNER_SERVICE = learner_pb2.DESCRIPTOR.services_by_name["LearnerService"].full_name

__all__ = ["Security", "channel", "leader_pb2", "leader_pb2_grpc", "learner_pb2", "learner_pb2_grpc", "start_server"]

log = logging.getLogger("rpc")

# Headroom above a payload's exact size for the protobuf envelope and the JSON header's metadata.
ENVELOPE_BYTES = 1 << 20
# Replies to the learner's channel are stream chunks and acks; this bounds any single one.
CHUNK_MESSAGE_LIMIT = 8 << 20
# A learner's slot is bound to a secret the leader returns at registration (AckWithMetadata.credential);
# both sides send it in this call header: the learner to act as its slot, the leader to prove it is its leader.
CREDENTIAL_HEADER = "fl-credential"
# Health-service name under which each side reports a registration as alive: SESSION_PREFIX + session_id(credential).
SESSION_PREFIX = "fl.session."
SESSIONS_HEADER = "fl-sessions"


class SecurityError(ValueError):
    """Unusable TLS or token settings."""


class ListenError(OSError):
    """A server cannot listen where it was asked to: its port is taken (in_use), or its address is not this
    machine's."""

    def __init__(self, message: str, in_use: bool) -> None:
        super().__init__(message)
        self.in_use = in_use


@dataclass(frozen=True)
class SecurityFlags:
    """The TLS and token flags, the same on both entry points (each configuration includes them)."""

    tls_cert: str | None = option(
        None, "this {role}'s certificate (enables TLS on its server and channels)", group="security", metavar="PEM"
    )
    tls_key: str | None = option(None, "this {role}'s private key", group="security", metavar="PEM")
    tls_ca: str | None = option(
        None,
        "CA certificate: verify peers against it and require client certificates from it (mutual TLS)",
        group="security",
        metavar="PEM",
    )
    token: str | None = option(
        None,
        "shared secret every RPC must carry as 'authorization: Bearer TOKEN'; prefer the variable: a flag shows in ps",
        group="security",
        default_text=f"${guard.TOKEN_VARIABLE}",
        secret=True,
    )


@dataclass(frozen=True)
class Security:
    """TLS material (PEM bytes) and the shared token; all None means plaintext without authentication."""

    certificate: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None
    token: str | None = None

    @staticmethod
    def of(flags: "SecurityFlags") -> "Security":
        """From the security flags; the token from --token, else from $FL_TOKEN."""
        if bool(flags.tls_cert) != bool(flags.tls_key):
            raise SecurityError("--tls-cert and --tls-key go together")
        if flags.tls_ca and not flags.tls_cert:
            raise SecurityError("--tls-ca needs --tls-cert and --tls-key: mutual TLS presents a certificate both ways")
        read = lambda path: Path(path).read_bytes() if path else None
        token = flags.token or os.environ.get(guard.TOKEN_VARIABLE) or None
        try:
            return Security(read(flags.tls_cert), read(flags.tls_key), read(flags.tls_ca), token)
        except OSError as error:
            raise SecurityError(f"cannot read TLS file: {error}") from None

    def describe(self) -> str:
        tls = "mutual TLS" if self.ca else "TLS" if self.certificate else "plaintext"
        return f"{tls}, {'token required' if self.token else 'no token'}"


class TokenHeader(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the shared token to every outgoing call."""

    def __init__(self, token: str) -> None:
        self.header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return details._replace(metadata=[*(details.metadata or ()), self.header])

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)


def _limits(max_receive_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_receive_bytes),
        ("grpc.max_send_message_length", -1),
    ]


# gRPC's servers set SO_REUSEPORT by default: a second leader (or learner) on a taken port would start
# without a word and share the callers with the first. Without it, binding a taken port fails.
SERVER_OPTIONS = [("grpc.so_reuseport", 0)]


def start_server(
    bind: str,
    register: list,
    service_names: list[str],
    max_receive_bytes: int,
    security: Security = Security(),
    limits: Mapping[str, guard.Limit] | None = None,
    idle_timeout: float = guard.IDLE_TIMEOUT_S,
    sessions: Callable[[str], int | None] | None = None,
    identify: Callable[[guard.Headers], str | None] = lambda headers: None,
    named_callers: int = 0,
) -> tuple[grpc.Server, int]:
    """Start a server with the given servicers plus health checking and reflection; return it and its port.

    register holds (add_XServicer_to_server, servicer) pairs. Messages over max_receive_bytes are refused
    with RESOURCE_EXHAUSTED before they are buffered; limits says how each method's calls are admitted
    (guard.Gate, which names callers with identify); sessions(session_id) answers health checks of
    SESSION_PREFIX services."""
    server, [port] = start_server_on(
        [bind],
        register,
        service_names,
        max_receive_bytes,
        security,
        limits,
        idle_timeout,
        sessions,
        identify,
        named_callers,
    )
    return server, port


def start_server_on(
    binds: list[str],
    register: list,
    service_names: list[str],
    max_receive_bytes: int,
    security: Security = Security(),
    limits: Mapping[str, guard.Limit] | None = None,
    idle_timeout: float = guard.IDLE_TIMEOUT_S,
    sessions: Callable[[str], int | None] | None = None,
    identify: Callable[[guard.Headers], str | None] = lambda headers: None,
    named_callers: int = 0,
) -> tuple[grpc.Server, list[int]]:
    """start_server listening on every HOST:PORT of binds (one server, one thread pool, for a process's learners:
    --virtual); the ports it got, in order."""
    gate = guard.Gate(limits or {}, idle_timeout, security.token, identify, named_callers)
    workers = gate.threads_needed()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        options=_limits(max_receive_bytes) + SERVER_OPTIONS,
        interceptors=[gate],
        maximum_concurrent_rpcs=workers,
    )
    for add_to_server, servicer in register:
        add_to_server(servicer, server)
    health_servicer = SessionHealth(sessions or (lambda session: None))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in service_names:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    ports = [_add_port(server, bind, security) for bind in binds]
    server.start()
    host = binds[0].rsplit(":", 1)[0]
    if not _is_loopback(host):  # once: every port is on the same host
        warn_if_open(f"{host}:{ports[0]}", ports[0], security)  # the port it got: port 0 asks for any free one
    return server, ports


def _add_port(server: grpc.Server, bind: str, security: Security) -> int:
    """Listen on bind (HOST:PORT); the port it got. ListenError, saying why, when it cannot."""
    try:
        if security.certificate:
            credentials = grpc.ssl_server_credentials(
                [(security.key, security.certificate)],
                root_certificates=security.ca,
                require_client_auth=security.ca is not None,
            )
            port = server.add_secure_port(bind, credentials)
        else:
            port = server.add_insecure_port(bind)
    except RuntimeError:  # (grpcio returns 0 or raises, by version)
        port = 0
    if port == 0:
        raise listen_error(bind)
    return port


def listen_error(bind: str) -> ListenError:
    """Why a server could not listen on bind (HOST:PORT), which gRPC does not say: the system's answer to a
    socket bound there."""
    return bind_problem(bind) or ListenError(f"cannot listen on {bind}", in_use=False)


def check_can_listen(bind: str) -> None:
    """Raise ListenError at once when a server could not listen on bind (HOST:PORT): a program asks before it
    touches anything (a second leader on a taken port would set aside the first one's run folder)."""
    if problem := bind_problem(bind):
        raise problem


def bind_problem(bind: str) -> ListenError | None:
    """Why a socket cannot be bound at bind (HOST:PORT; port 0, any free one), or None."""
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no owner
            probe.bind((host, int(port)))
    except (OSError, ValueError) as error:
        if isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
            return ListenError(f"port {port} is already in use", in_use=True)
        return ListenError(f"cannot listen on {bind}: {getattr(error, 'strerror', None) or error}", in_use=False)
    return None


def warn_if_open(bind: str, port: int, security: Security) -> None:
    """Say who can call a server reachable beyond this machine, when that is anyone."""
    if not (security.token or security.ca):
        log.warning(
            "listening on %s without a token or client certificates: anyone who can reach port %d can join, "
            "read the model and send updates; use --token and --tls-cert/--tls-key/--tls-ca (docs/security.md)",
            bind,
            port,
        )
    elif not security.certificate:
        log.warning(
            "listening on %s in plaintext: the token crosses the network readable by anyone on the way; "
            "add --tls-cert/--tls-key (docs/security.md)",
            bind,
        )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


class SessionHealth(health.HealthServicer):
    """The standard health service, which also reports registrations: SESSION_PREFIX + session id is
    SERVING while the registration holds, NOT_SERVING once the leader has dropped it, and unknown
    (NOT_FOUND, with the trailing header SESSIONS_HEADER, which tells it from a server that knows no
    sessions at all) when this process does not hold it. Ids are hashes of secrets: they reveal nothing."""

    def __init__(self, sessions: Callable[[str], int | None]) -> None:
        super().__init__()
        self.sessions = sessions

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        if not request.service.startswith(SESSION_PREFIX):
            return super().Check(request, context)
        status = self.sessions(request.service[len(SESSION_PREFIX) :])
        if status is None:
            context.set_trailing_metadata([(SESSIONS_HEADER, "1")])
            context.set_code(grpc.StatusCode.NOT_FOUND)
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=status)

    def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext, send_response_callback=None
    ) -> Iterator[health_pb2.HealthCheckResponse]:
        """The current status, once, then the end of the stream: a watch held open would hold a server thread
        for as long as the caller likes."""
        return iter([self.Check(request, context)])


def knows_sessions(error: grpc.RpcError) -> bool:
    """Whether a NOT_FOUND answer to a session check came from a server that reports sessions (so the session
    is really not there), rather than from one that knows none (a peer built from the article's protos)."""
    return any(key == SESSIONS_HEADER for key, _ in error.trailing_metadata() or ())


def channel(
    address: str, security: Security = Security(), max_receive_bytes: int = CHUNK_MESSAGE_LIMIT
) -> grpc.Channel:
    """A channel to address with deliberate message limits, TLS when configured, and the token on every call."""
    # Subchannels of its own: channels share the process's pool by default, and with it a failed address's
    # reconnect backoff, so a channel made afresh could still answer with an old connection error (seen in CI)
    options = [*_limits(max_receive_bytes), ("grpc.use_local_subchannel_pool", 1)]
    if security.certificate or security.ca:
        credentials = grpc.ssl_channel_credentials(security.ca, security.key, security.certificate)
        opened = grpc.secure_channel(address, credentials, options=options)
    else:
        opened = grpc.insecure_channel(address, options=options)
    return grpc.intercept_channel(opened, TokenHeader(security.token)) if security.token else opened


def peer_common_name(context: grpc.ServicerContext) -> str | None:
    """The common name in the TLS client certificate of the caller, if any."""
    names = context.auth_context().get("x509_common_name")
    return names[0].decode() if names else None


def peer_certificate(context: grpc.ServicerContext) -> str | None:
    """A fingerprint (SHA-256) of the caller's TLS client certificate, if it presented one."""
    certificates = context.auth_context().get("x509_pem_cert")
    return hashlib.sha256(certificates[0]).hexdigest() if certificates else None


def new_credential() -> str:
    """A fresh secret for one registration (192 random bits)."""
    return secrets.token_urlsafe(24)


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with code and message (context.abort raises; this says so to type checkers)."""
    context.abort(code, message)
    raise AssertionError("grpc's context.abort returned")


def credential_of(context: grpc.ServicerContext) -> str | None:
    """The credential the caller sent in the CREDENTIAL_HEADER header, if any."""
    return dict(context.invocation_metadata() or ()).get(CREDENTIAL_HEADER) or None


def with_credential(credential: str | None) -> list[tuple[str, str]]:
    """Call metadata that carries the credential (none without one)."""
    return [(CREDENTIAL_HEADER, credential)] if credential else []


def session_id(credential: str) -> str:
    """The public name of a registration: a hash of its credential, safe to send in the clear."""
    return hashlib.sha256(credential.encode()).hexdigest()[:32]
