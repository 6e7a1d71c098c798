"""A throw-away certificate authority for TLS in tests and demos.

:class:`TestCA` wraps :mod:`trustme`: it creates a CA, issues server
certificates for host names and IP addresses, writes everything as PEM files
into one directory and builds client and server :class:`ssl.SSLContext`
objects that trust the CA.  It is used by the Oracle wire test server
(:mod:`deepsec.testing.oracle`) and can be reused by any other local TLS
server of the test suite (for example an identity provider).

A note on python-oracledb's server name check: the thin driver turns
``check_hostname`` off on the SSL context it is given and runs its own
"server DN match" instead, which compares the DSN host with the certificate's
``subjectAltName`` **DNS** entries and with its common name (CN).  IP address
SAN entries are ignored, so a certificate that only carries
``IP:127.0.0.1`` is rejected with DPY-6006 for ``tcps://127.0.0.1:...``.
:meth:`TestCA.issue_server_cert` therefore puts the first identity in the CN
as well (``CN=127.0.0.1`` by default), which the driver accepts while
standard verifiers (``ssl``, httpx, requests) keep using the SAN entries.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

import trustme

__all__ = ["DEFAULT_SERVER_IDENTITIES", "ServerCert", "TestCA"]

#: Identities a default server certificate is valid for.  The first one is
#: also the certificate's common name (see the module docstring).
DEFAULT_SERVER_IDENTITIES: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServerCert:
    """PEM files of one issued server certificate.

    Attributes:
        identities: host names and IP addresses the certificate is valid for.
        cert_path: the leaf certificate followed by its chain (what servers load).
        key_path: the private key (unencrypted PEM).
    """

    identities: tuple[str, ...]
    cert_path: Path
    key_path: Path

    def server_ssl_context(self) -> ssl.SSLContext:
        """A TLS server context presenting this certificate (TLS 1.2+)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.cert_path), str(self.key_path))
        return ctx


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


class TestCA:
    """A local certificate authority whose files live in one directory.

    Args:
        directory: where PEM files are written.  ``None`` creates a private
            temporary directory that :meth:`close` removes.
        organization: organization name in the CA certificate.

    The CA certificate is written at construction time to
    :attr:`ca_pem_path`.  Instances are safe to share between threads once
    created (issuing certificates takes an internal file name counter only).
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        organization: str = "deepsec test CA",
    ) -> None:
        self._owns_dir = directory is None
        if directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="deepsec-ca-"))
        else:
            self.directory = Path(directory)
            self.directory.mkdir(parents=True, exist_ok=True)
        self._ca = trustme.CA(organization_name=organization)
        self.ca_pem_path = self.write_ca_pem(self.directory / "ca.pem")
        self._counter = 0
        self._default_cert: ServerCert | None = None

    @property
    def ca_pem(self) -> bytes:
        """The CA certificate in PEM form."""
        return bytes(self._ca.cert_pem.bytes())

    def write_ca_pem(self, path: str | os.PathLike[str]) -> Path:
        """Write the CA certificate (PEM) to ``path`` and return it as a Path."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(self.ca_pem)
        return target

    def issue_server_cert(
        self,
        *identities: str,
        common_name: str | None = None,
        name: str | None = None,
    ) -> ServerCert:
        """Issue a server certificate and write it to the CA directory.

        Args:
            identities: host names and IP addresses (``DEFAULT_SERVER_IDENTITIES``
                when empty).  Host names become DNS SAN entries, IP addresses
                IP SAN entries.
            common_name: the subject CN; defaults to the first identity, so
                that python-oracledb's server DN match accepts an IP DSN host.
            name: file name stem (``server-N`` when omitted).
        """
        ids = tuple(identities) or DEFAULT_SERVER_IDENTITIES
        cn = common_name if common_name is not None else ids[0]
        leaf = self._ca.issue_cert(*ids, common_name=cn)
        self._counter += 1
        stem = name or f"server-{self._counter}"
        cert_path = self.directory / f"{stem}.pem"
        key_path = self.directory / f"{stem}.key"
        cert_path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key_path))
        os.chmod(key_path, 0o600)
        return ServerCert(identities=ids, cert_path=cert_path, key_path=key_path)

    @property
    def server_cert(self) -> ServerCert:
        """A default server certificate for ``DEFAULT_SERVER_IDENTITIES``."""
        if self._default_cert is None:
            self._default_cert = self.issue_server_cert(name="server")
        return self._default_cert

    def server_ssl_context(self, cert: ServerCert | None = None) -> ssl.SSLContext:
        """A TLS server context for ``cert`` (the default server cert if None)."""
        return (cert or self.server_cert).server_ssl_context()

    def client_ssl_context(self) -> ssl.SSLContext:
        """A fresh client context that trusts only this CA.

        Host name checking stays on (python-oracledb switches it off itself
        and runs its own DN match; other clients verify the SAN entries).
        A new context is returned each time because python-oracledb mutates
        the context it is given.
        """
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ctx.load_verify_locations(cadata=self.ca_pem.decode("ascii"))
        return ctx

    @staticmethod
    def is_ip(value: str) -> bool:
        """Whether ``value`` is an IPv4/IPv6 address literal."""
        return _is_ip(value)

    def close(self) -> None:
        """Remove the directory if this instance created it."""
        if self._owns_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> TestCA:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
