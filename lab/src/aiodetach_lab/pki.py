"""Throwaway X.509 material for a TLS libvirtd on loopback: a CA, a server
certificate naming ``127.0.0.1`` and ``localhost``, client certificates.

Made with ``certtool`` (gnutls-bin, the library libvirt's TLS uses) into
directories laid out as libvirt's client expects under ``?pkipath=DIR``
(``cacert.pem``, ``clientcert.pem``, ``clientkey.pem``).  Keys are small
and certificates short-lived: they exist for one test session and nothing else.
Subprocesses get argument lists, never a shell.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Authority", "make_authority"]

CERTTOOL = "/usr/bin/certtool"


def _certtool(*args: str) -> None:
    subprocess.run([CERTTOOL, *args], check=True, capture_output=True)


def _key(path: Path) -> Path:
    _certtool("--generate-privkey", "--key-type=rsa", "--bits=2048", "--outfile", str(path))
    return path


@dataclass(frozen=True)
class Authority:
    """A CA (its certificate and key under ``root``) that signs what a test needs."""

    root: Path

    @property
    def cert(self) -> Path:
        return self.root / "cacert.pem"

    @property
    def key(self) -> Path:
        return self.root / "cakey.pem"

    def server(self, directory: Path, *, owner: tuple[int, int] | None = None) -> Path:
        """``servercert.pem``/``serverkey.pem``/``cacert.pem`` in ``directory``,
        for 127.0.0.1 and localhost; readable by ``owner`` (the daemon's uid/gid)."""
        directory.mkdir(parents=True, exist_ok=True)
        key = _key(directory / "serverkey.pem")
        self._sign(
            directory / "servercert.pem",
            key,
            'organization = "aiodetach lab"\ncn = "localhost"\n'
            'dns_name = "localhost"\nip_address = "127.0.0.1"\n'
            "tls_www_server\nencryption_key\nsigning_key\n",
        )
        (directory / "cacert.pem").write_bytes(self.cert.read_bytes())
        if owner is not None:
            for path in (directory, *directory.iterdir()):
                os.chown(path, *owner)
        return directory

    def client(self, directory: Path, *, with_ca: Path | None = None) -> Path:
        """A client ``pkipath`` directory: this CA's client certificate; the CA
        certificate it trusts is ``with_ca`` (another CA's, to fail) or ours."""
        directory.mkdir(parents=True, exist_ok=True)
        key = _key(directory / "clientkey.pem")
        self._sign(
            directory / "clientcert.pem",
            key,
            'organization = "aiodetach lab"\ncn = "aiodetach-test-client"\n'
            "tls_www_client\nencryption_key\nsigning_key\n",
        )
        (directory / "cacert.pem").write_bytes((with_ca or self.cert).read_bytes())
        return directory

    def _sign(self, cert: Path, key: Path, template: str) -> None:
        info = cert.with_suffix(".info")
        info.write_text(template + "expiration_days = 2\n")
        _certtool(
            "--generate-certificate",
            "--load-privkey",
            str(key),
            "--load-ca-certificate",
            str(self.cert),
            "--load-ca-privkey",
            str(self.key),
            "--template",
            str(info),
            "--outfile",
            str(cert),
        )


def make_authority(root: Path, name: str = "aiodetach lab CA") -> Authority:
    """A new self-signed CA under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    ca = Authority(root)
    _key(ca.key)
    info = root / "ca.info"
    info.write_text(f'cn = "{name}"\nca\ncert_signing_key\nexpiration_days = 2\n')
    _certtool(
        "--generate-self-signed",
        "--load-privkey",
        str(ca.key),
        "--template",
        str(info),
        "--outfile",
        str(ca.cert),
    )
    return ca
