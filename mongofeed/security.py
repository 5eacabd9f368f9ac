"""Keeping secrets: CurveZMQ for traffic that leaves the machine (key files, the daemon's
allow-list of client keys, and the socket options on both sides), a password of each daemon
run for its internal sockets on tcp, and the passwords of MongoDB URIs kept out of logs,
status and messages (``redact_uri``).

Loopback endpoints need nothing. Binding any other address without keys would hand the
training data (and the control socket) to anyone on the network, so the daemon refuses it
unless the user says ``--insecure`` on purpose.

The internal sockets (tasks and batches between the supervisor and its workers) are in a
folder only the daemon's user can enter where ipc exists. Over tcp (Windows, or
``serve.internal_transport = "tcp"``) they are loopback ports any local user could connect
to, to take tasks (the training data) or push forged batches into a trainer's stream; there
they use ZeroMQ's PLAIN mechanism with a random password of this run, which its workers
get through ``spawn``'s pipe (never a command line). PLAIN costs nothing per message, as
the batch bytes on the sink need; the password crosses only loopback, which other users
cannot read.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from dataclasses import dataclass
from urllib.parse import unquote_plus

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from .errors import ConfigError
from .wire.endpoints import endpoint_host

LOOPBACK_NAMES = ("localhost",)


def keygen(folder: str, name: str) -> tuple[str, str]:
    """Write ``name.key`` (public, give it to the other side) and ``name.key_secret``
    (keep it private) in ``folder``; returns both paths."""
    os.makedirs(folder, exist_ok=True)
    public, secret = zmq.auth.create_certificates(folder, name)
    os.chmod(secret, 0o600)
    return public, secret


def is_loopback(endpoint: str) -> bool:
    """True for ipc:// and tcp:// on a loopback address; a name other than localhost is not
    trusted to stay on the machine."""
    host = endpoint_host(endpoint)
    if host is None or host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(serve, where: str):
    """Refuse a non-loopback bind without keys (unless insecure), and half a key setup."""
    if serve.server_key and not serve.client_keys:
        raise ConfigError(f"{where}: serve.server_key needs serve.client_keys, the folder of "
                          f"client public keys the daemon accepts")
    if serve.client_keys and not serve.server_key:
        raise ConfigError(f"{where}: serve.client_keys needs serve.server_key")
    exposed = [e for e in (serve.bind, serve.control) if not is_loopback(e)]
    if exposed and not serve.server_key and not serve.insecure:
        raise ConfigError(f"{where}: serve.bind/serve.control {exposed[0]} is not a loopback "
                          f"address: give CurveZMQ keys (--server-key, --client-keys; create "
                          f"them with 'mongofeed keygen') or pass --insecure on purpose")


def _load(path: str, what: str, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what} {path}: cannot read a CurveZMQ key file ({exc}); create "
                          f"one with 'mongofeed keygen'") from None
    if secret and secret_key is None:
        raise ConfigError(f"{what} {path} holds only a public key; give the .key_secret file")
    return public, secret_key


def start_authenticator(context: zmq.Context) -> ThreadAuthenticator:
    """The daemon's ZAP handler (one per ZeroMQ context), which ``CurveServer`` and
    ``internal_password`` configure; stop it when the context ends."""
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    return authenticator


class CurveServer:
    """The daemon side: its key pair on the public sockets, and the authenticator admitting
    only the client public keys found in ``client_keys`` (a folder of ``*.key``)."""

    def __init__(self, authenticator: ThreadAuthenticator, server_key: str, client_keys: str):
        self.public, self.secret = _load(server_key, "serve.server_key", secret=True)
        if not os.path.isdir(client_keys) or not zmq.auth.load_certificates(client_keys):
            raise ConfigError(f"serve.client_keys {client_keys}: no client public keys "
                              f"(*.key) in that folder")
        authenticator.configure_curve(domain="*", location=client_keys)

    def apply(self, socket: zmq.Socket):
        """Call before bind."""
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_server = True


INTERNAL_ZAP_DOMAIN = b"mongofeed-internal"
INTERNAL_USER = b"worker"


def internal_password(authenticator: ThreadAuthenticator) -> str:
    """A new random password that the authenticator asks of internal tcp connections."""
    password = secrets.token_hex(16)
    authenticator.configure_plain(INTERNAL_ZAP_DOMAIN.decode(),
                                  {INTERNAL_USER.decode(): password})
    return password


def guard_internal(socket: zmq.Socket):
    """An internal socket on tcp: peers must give the run's password (call before bind)."""
    socket.zap_domain = INTERNAL_ZAP_DOMAIN
    socket.plain_server = True


@dataclass(frozen=True)
class InternalEndpoints:
    """Where a worker connects (the supervisor's task and sink sockets), and the password
    they ask for on tcp (None on ipc)."""

    tasks: str
    sink: str
    password: str | None = None

    def connect(self, socket: zmq.Socket, endpoint: str):
        """Connect ``socket`` to ``endpoint`` (``tasks`` or ``sink``) with the password."""
        if self.password is not None:
            socket.plain_username = INTERNAL_USER
            socket.plain_password = self.password.encode()
        socket.connect(endpoint)


def client_options(server_key: str | None, client_key: str | None) -> dict:
    """Socket options for a consumer of a daemon that uses CurveZMQ (empty when it does not):
    ``server_key`` is the daemon's public key file, ``client_key`` our .key_secret file."""
    if server_key is None and client_key is None:
        return {}
    if server_key is None or client_key is None:
        raise ValueError("CurveZMQ needs both server_key (the daemon's .key file) and "
                         "client_key (this client's .key_secret file)")
    server_public, _ = _load(server_key, "server_key", secret=False)
    public, secret = _load(client_key, "client_key", secret=True)
    return {zmq.CURVE_SERVERKEY: server_public, zmq.CURVE_PUBLICKEY: public,
            zmq.CURVE_SECRETKEY: secret}


# -- secrets in logs and messages -------------------------------------------------------

def redact_uri(text: str) -> str:
    """``text`` with the secrets of every URI in it replaced by ***, for logs, status and
    error messages (a driver's message may embed the whole connection string): the
    password, the options that carry secrets (``SECRET_URI_OPTIONS``) and the values of
    ``authMechanismProperties`` other than the harmless ones (``AWS_SESSION_TOKEN`` is not)."""
    return _URI.sub(lambda match: _redact_one(match[0]), text)


# The URI options spec's sensitive options (pymongo.common.SENSITIVE_OPTIONS_FOR_REPR, which
# a test compares with this) and older drivers' names for the key file password.
SECRET_URI_OPTIONS = frozenset((
    "tlscertificatekeyfilepassword", "proxyusername", "proxypassword",
    "sslpemkeypassword", "ssl_pem_passphrase",
))
# authMechanismProperties that name things rather than prove identity (pymongo's list).
PUBLIC_MECHANISM_PROPERTIES = frozenset((
    "ALLOWED_HOSTS", "CANONICALIZE_HOST_NAME", "ENVIRONMENT", "SERVICE_HOST", "SERVICE_NAME",
    "SERVICE_REALM", "TOKEN_RESOURCE",
))
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def _redact_one(uri: str) -> str:
    scheme, _, rest = uri.partition("://")
    # The user information ends at the last @ before the options (or, for a password with a
    # ? in it, before the first /); when unsure, more is hidden rather than less.
    before_query = rest.split("?", 1)[0]
    at = before_query.rfind("@")
    if at < 0:
        at = rest.split("/", 1)[0].rfind("@")
    userinfo, hosts = (rest[:at], rest[at:]) if at >= 0 else ("", rest)
    if ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    path, question, query = hosts.partition("?")
    if question:
        query = "&".join(_redact_option(option) for option in query.split("&"))
    return f"{scheme}://{userinfo}{path}{question}{query}"


def _redact_option(option: str) -> str:
    name, equals, value = option.partition("=")
    if name.lower() in SECRET_URI_OPTIONS:
        return f"{name}{equals}***"
    if name.lower() == "authmechanismproperties":
        properties = []
        for prop in unquote_plus(value).split(","):
            key, colon, prop_value = prop.partition(":")
            public = key.upper() in PUBLIC_MECHANISM_PROPERTIES
            properties.append(f"{key}{colon}{prop_value if public else '***'}")
        return f"{name}{equals}{','.join(properties)}"
    return option
