"""How an agent proves who it is to a broker and checks the broker is the right one: TLS
(``mqtts://``, a CA file, hostname verification), a client certificate (mutual TLS) and a
username with a password from a file or the environment.

Every client of the project (device, edge, edge-to-edge, the bench, the examples) takes one
``MqttSecurity``; ``configure`` applies it to a paho client. Settings come from a config
file's ``[mqtt]`` table, ``IOTOFFLOAD_MQTT_*`` variables and flags, like every other setting.
The password is never a flag (a command line is visible to every user of the machine) and
never printed: it is a ``SecretStr`` read from ``password_file`` or
``IOTOFFLOAD_MQTT_PASSWORD``.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from iotoffload.ids import is_id

__all__ = ["BrokerAuthError", "MqttSecurity", "SecurityConfigError"]


class SecurityConfigError(ValueError):
    """The security settings themselves are wrong (a missing file, a key without its
    certificate, TLS settings on a plain ``mqtt://`` URL)."""


class BrokerAuthError(ConnectionError):
    """The broker and this client do not trust each other: a certificate that fails
    verification, a refused client certificate, a wrong username or password. Retrying does
    not help, so it is never retried."""


class MqttSecurity(BaseSettings):
    """Credentials and trust for broker connections."""

    model_config = SettingsConfigDict(env_prefix="IOTOFFLOAD_MQTT_", extra="forbid", frozen=True)

    ca_file: Path | None = Field(
        default=None,
        description="CA certificates (PEM) that verify the broker on mqtts://; "
        "default: the system's",
    )
    cert_file: Path | None = Field(
        default=None, description="this client's certificate (PEM), for mutual TLS"
    )
    key_file: Path | None = Field(
        default=None, description="the private key of cert_file (PEM); default: in cert_file"
    )
    username: str | None = Field(default=None, min_length=1, max_length=256)
    password_file: Path | None = Field(
        default=None, description="file whose first line is the password"
    )
    password: SecretStr | None = Field(
        default=None, description="the password (IOTOFFLOAD_MQTT_PASSWORD); prefer a file"
    )
    tls_insecure: bool = Field(
        default=False,
        description="skip the broker's hostname check (labs only: anyone with a certificate "
        "from the CA can then pose as the broker)",
    )

    @field_validator("ca_file", "cert_file", "key_file", "password_file")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return None if v is None else Path(v).expanduser()

    @model_validator(mode="after")
    def _consistent(self) -> MqttSecurity:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file (the certificate the key belongs to)")
        if self.password_file is not None and self.password is not None:
            raise ValueError("give the password once: password_file or IOTOFFLOAD_MQTT_PASSWORD")
        if (self.password_file is not None or self.password is not None) and not self.username:
            raise ValueError("a password needs a username")
        return self

    @classmethod
    def load(cls, table: dict[str, Any] | None = None, **overrides: Any) -> MqttSecurity:
        """From a config file's ``[mqtt]`` table, the environment and non-None flags."""
        data = dict(table or {})
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)

    @property
    def uses_tls_settings(self) -> bool:
        return any(v is not None for v in (self.ca_file, self.cert_file, self.key_file)) or bool(
            self.tls_insecure
        )

    def describe(self) -> str:
        """What this client presents (for logs: never the password)."""
        parts = []
        if self.cert_file:
            parts.append(f"certificate {self.cert_file}")
        if self.username:
            parts.append(f"user {self.username}" + (" with a password" if self._has_pw() else ""))
        return ", ".join(parts) or "no credentials"

    def _has_pw(self) -> bool:
        return self.password is not None or self.password_file is not None

    def identity(self) -> str | None:
        """Who the broker will take this client for, when the settings say it: the username,
        else the common name of the client certificate (mosquitto's
        ``use_identity_as_username``). Agents use it as their id by default (protocol v2 topics
        carry it, and the broker's ACL checks it). None when it is not a valid agent id."""
        who = self.username
        if who is None and self.cert_file is not None:
            from cryptography import x509
            from cryptography.x509.oid import NameOID

            try:
                cert = x509.load_pem_x509_certificate(self.cert_file.read_bytes())
            except (OSError, ValueError) as e:
                raise SecurityConfigError(f"{self.cert_file}: not a PEM certificate: {e}") from e
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            who = str(names[0].value) if names else None
        return who if is_id(who) else None

    def read_password(self) -> str | None:
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is None:
            return None
        try:
            text = self.password_file.read_text(encoding="utf-8")
        except OSError as e:
            raise SecurityConfigError(
                f"cannot read the password file {self.password_file}: {e.strerror or e}"
            ) from e
        lines = text.splitlines()
        if not lines or not lines[0]:
            raise SecurityConfigError(f"the password file {self.password_file} is empty")
        return lines[0]

    def ssl_context(self) -> ssl.SSLContext:
        """A client context: the CA (or the system's), hostname verification unless
        ``tls_insecure``, the client certificate when given. Raises SecurityConfigError
        naming the file that is wrong."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.ca_file is not None:
            _readable(self.ca_file, "CA file")
            try:
                ctx.load_verify_locations(cafile=str(self.ca_file))
            except ssl.SSLError as e:
                raise SecurityConfigError(
                    f"the CA file {self.ca_file} holds no usable certificate ({e.reason})"
                ) from e
        if self.cert_file is not None:
            _readable(self.cert_file, "certificate file")
            if self.key_file is not None:
                _readable(self.key_file, "key file")
            try:
                ctx.load_cert_chain(
                    str(self.cert_file), None if self.key_file is None else str(self.key_file)
                )
            except ssl.SSLError as e:
                raise SecurityConfigError(
                    f"the certificate {self.cert_file} and its key do not load ({e.reason})"
                ) from e
        if self.tls_insecure:
            ctx.check_hostname = False
        return ctx


def _readable(p: Path, what: str) -> None:
    if not os.access(p, os.R_OK) or not p.is_file():
        raise SecurityConfigError(f"the {what} {p} does not exist or cannot be read")


def tls_failure(e: ssl.SSLError, url: str, security: MqttSecurity) -> BrokerAuthError:
    """A one-line reason for a failed TLS handshake with the broker at ``url``."""
    if isinstance(e, ssl.SSLCertVerificationError):
        ca = security.ca_file or "the system's CA certificates"
        why = e.verify_message or e.reason or str(e)
        return BrokerAuthError(
            f"TLS: the broker {url} presented a certificate that fails verification against "
            f"{ca}: {why}"
        )
    reason = (e.reason or str(e)).lower().replace("_", " ")
    if "certificate" in reason:  # the broker refused ours (expired, unknown CA, missing)
        return BrokerAuthError(
            f"TLS: the broker {url} refused this client's certificate ({reason}); "
            f"it presented {security.describe()}"
        )
    return BrokerAuthError(f"TLS handshake with the broker {url} failed: {reason}")
