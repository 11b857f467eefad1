"""amqtt with identities bound to sessions, as the secured mosquitto binds them.

mosquitto's setup (``security init``) takes the identity from the client certificate's CN
(``use_identity_as_username``) or the username with its password, makes it the client id
(``use_username_as_clientid``) and lets the ACL decide what that identity may read and write.
amqtt 0.12 has no such binding and three habits that would defeat the ACL: before it checks
any credential it deletes the session of the CONNECT's client id (clean session) or hands the
new connection that session (persistent session), so a stranger could cost a device its
subscriptions; it publishes a Last Will without any topic check; and it keeps a session for
every refused CONNECT. ``IdentityBroker`` checks the credentials as soon as the CONNECT is
read and replaces the client id with the identity (or, refused, with a throwaway id that names
no session, dropped afterwards); ``IdentityAuthPlugin`` accepts only a bound identity whose
Will is on a topic it may write; ``IdentityAclPlugin`` checks every publish, subscribe and
delivery against the role's rules. The override copies amqtt 0.12's
``_initialize_client_session`` with the binding added (amqtt is pinned to 0.12; the secured
broker tests fail if a takeover, a session deletion or a Will gets through).
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.plugins.topic_checking import TopicAccessControlListPlugin
from amqtt.session import Session
from cryptography import x509
from cryptography.x509.oid import NameOID

from iotoffload.deploy.lab import check_mosquitto_password


def _cn(der: bytes) -> str | None:
    """The CN of a certificate the TLS layer verified against the listener's CA."""
    names = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def _password_db(path: str | None) -> dict[str, str]:
    """``user:$7$...`` lines (the file mosquitto reads); unreadable lines are skipped."""
    if path is None:
        return {}
    out: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        user, sep, entry = line.strip().partition(":")
        if sep and user and not user.startswith("#"):
            out[user] = entry
    return out


REFUSED = "refused-"  # client ids of refused CONNECTs (names no one's session)
# A CONNECT is one small packet sent right after the TLS handshake. amqtt waits for it without
# end (a connection that sends nothing holds a slot for good), and it misreads an MQTT 5
# CONNECT with a Will (its properties) and waits for bytes that never come: closing instead
# lets the client fall back to 3.1.1 at once.
CONNECT_TIMEOUT_S = 3.0


def identity_of(session: Session, users: dict[str, str] | None) -> str | None:
    """Who the CONNECT proves to be: the verified client certificate's CN (``users`` None)
    or the username whose password matches the password file."""
    if users is None:
        ssl_object = session.ssl_object
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        return _cn(der) if der else None
    who, password = session.username, session.password
    if not who or password is None or who not in users:
        return None
    pw = password.decode() if isinstance(password, bytes) else str(password)
    return who if check_mosquitto_password(pw, users[who]) else None


class IdentityBroker(Broker):  # type: ignore[misc]  # amqtt ships no type information
    """amqtt's broker with the identity bound to the client id before any session lookup."""

    def __init__(self, config: dict[str, Any], *, password_file: str | None, **kw: Any) -> None:
        super().__init__(config, **kw)
        self._users = _password_db(password_file) if password_file else None
        self.refused = 0  # CONNECTs whose credentials failed

    def _bind(self, session: Session) -> None:
        who = identity_of(session, self._users)
        if who is None:
            self.refused += 1
            session.client_id = f"{REFUSED}{secrets.token_hex(8)}"
            session.username = None
        else:
            session.client_id = who
            session.username = who

    async def _initialize_client_session(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        remote_address: str,
        remote_port: int,
    ) -> tuple[BrokerProtocolHandler, Session]:
        # amqtt 0.12's own, with _bind() between reading the CONNECT and the session cache
        try:
            handler, client_session = await asyncio.wait_for(
                BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager),
                CONNECT_TIMEOUT_S,
            )
        except TimeoutError:
            await writer.close()
            raise AMQTTError("no CONNECT in time") from None
        except AMQTTError as exc:
            raise AMQTTError(exc) from exc
        except MQTTError as exc:
            await writer.close()
            raise MQTTError(exc) from exc
        except NoDataError as exc:
            raise AMQTTError(exc) from exc
        self._bind(client_session)
        if client_session.clean_session:
            await self._delete_session(client_session.client_id)
            client_session.parent = 0
        elif client_session.client_id in self._sessions:
            existing, _ = self._sessions[client_session.client_id]
            existing.will_flag = client_session.will_flag
            existing.will_message = client_session.will_message
            existing.will_topic = client_session.will_topic
            existing.will_qos = client_session.will_qos
            existing.keep_alive = client_session.keep_alive
            existing.username = client_session.username
            existing.password = client_session.password
            client_session = existing
            client_session.parent = 1
        else:
            client_session.parent = 0
        delay = self.config.get("timeout-disconnect-delay", 0)
        if client_session.keep_alive > 0 and isinstance(delay, int):
            client_session.keep_alive += delay
        return handler, client_session

    async def _handle_client_session(self, *args: Any, **kw: Any) -> None:
        session: Session = args[2] if len(args) > 2 else kw["client_session"]
        try:
            await super()._handle_client_session(*args, **kw)
        finally:
            # amqtt keeps a refused client's session for good: one per refused CONNECT
            if session.client_id and session.client_id.startswith(REFUSED):
                self._sessions.pop(session.client_id, None)


class IdentityAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """Accepts a CONNECT whose identity ``IdentityBroker`` bound, that has rights in the ACL,
    and whose Will (if any) is on a topic the identity may write."""

    @dataclass
    class Config:
        publish_acl: dict[str, list[str]] = field(default_factory=dict)  # identity -> topics

    async def authenticate(self, *, session: Session) -> bool | None:
        who = session.username
        if who is None or session.client_id != who:
            return False
        writes = self.config.publish_acl.get(who, [])
        will_ok = not session.will_flag or any(
            TopicAccessControlListPlugin.topic_ac(session.will_topic or "", t) for t in writes
        )
        return bool(writes) and will_ok


class IdentityAclPlugin(TopicAccessControlListPlugin):  # type: ignore[misc]
    """amqtt's ACL check (by username, which the auth plugin set to the identity) with all
    three of its tables configurable: amqtt 0.12's own Config has no receive table."""

    @dataclass
    class Config:
        publish_acl: dict[str, list[str]] = field(default_factory=dict)
        subscribe_acl: dict[str, list[str]] = field(default_factory=dict)
        receive_acl: dict[str, list[str]] = field(default_factory=dict)
