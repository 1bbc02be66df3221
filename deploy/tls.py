"""A private certificate authority and the SuperLink's server certificate, made with ``openssl``.

Devices verify the SuperLink with ``ca.crt`` (``--root-certificates``); the server certificate names
every host devices and the operator's CLI use to reach it (subjectAltName: IP or DNS entries).
Keys are elliptic-curve (P-256): fast to make and accepted by Python's TLS (uvicorn, httpx, grpc).
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from deploy.flower import FlowerError, executable

DEFAULT_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_folder(cls, folder: Path) -> "TlsFiles":
        folder = Path(folder).resolve()
        return cls(folder / "ca.crt", folder / "ca.key", folder / "server.crt", folder / "server.key")

    def exist(self) -> bool:
        return all(path.exists() for path in (self.ca_cert, self.ca_key, self.server_cert, self.server_key))


def subject_alt_names(hosts: list[str] | tuple[str, ...]) -> str:
    """``['127.0.0.1', 'localhost']`` -> ``IP:127.0.0.1,DNS:localhost``."""
    if not hosts:
        raise FlowerError("the server certificate needs at least one host name or IP address")
    entries = []
    for host in hosts:
        try:
            entries.append(f"IP:{ipaddress.ip_address(host)}")
        except ValueError:
            if not host or any(c in host for c in " ,/:") :
                raise FlowerError(f"{host!r} is neither an IP address nor a DNS name") from None
            entries.append(f"DNS:{host}")
    return ",".join(entries)


def _openssl(*args: str) -> None:
    result = subprocess.run([executable("openssl"), *args], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise FlowerError(f"openssl {args[0]} failed (exit {result.returncode}): {result.stderr.strip()[-600:]}")


def make_certificates(folder: Path, hosts: list[str] | tuple[str, ...] = DEFAULT_HOSTS, days: int = 825,
                      ca_name: str = "fedgraft federation CA") -> TlsFiles:
    """Create ``ca.key``/``ca.crt`` and a server key and certificate for ``hosts`` in ``folder``.

    An existing CA is reused (devices already trust it); the server certificate is always remade, so
    running this again with more hosts is how the operator adds a name.
    """
    files = TlsFiles.in_folder(folder)
    folder = files.ca_cert.parent
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    san = subject_alt_names(hosts)
    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")
    if not (files.ca_cert.exists() and files.ca_key.exists()):
        _openssl("req", "-x509", *curve, "-nodes", "-sha256", "-days", str(max(days, 3650)),
                 "-keyout", str(files.ca_key), "-out", str(files.ca_cert), "-subj", f"/CN={ca_name}",
                 "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    csr = folder / "server.csr"
    extensions = folder / "server.ext"
    extensions.write_text(f"subjectAltName = {san}\nbasicConstraints = critical,CA:FALSE\n"
                          "keyUsage = critical,digitalSignature,keyEncipherment\nextendedKeyUsage = serverAuth\n")
    _openssl("req", "-new", *curve, "-nodes", "-sha256", "-keyout", str(files.server_key), "-out", str(csr),
             "-subj", f"/CN={hosts[0]}")
    _openssl("x509", "-req", "-sha256", "-days", str(days), "-in", str(csr), "-CA", str(files.ca_cert),
             "-CAkey", str(files.ca_key), "-CAcreateserial", "-out", str(files.server_cert), "-extfile", str(extensions))
    for key in (files.ca_key, files.server_key):
        os.chmod(key, 0o600)
    csr.unlink(missing_ok=True)
    return files


def certificate_hosts(cert: Path) -> str:
    """The subjectAltName line of a certificate, as openssl prints it (for messages and checks)."""
    result = subprocess.run([executable("openssl"), "x509", "-in", str(cert), "-noout", "-ext", "subjectAltName"],
                            capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise FlowerError(f"cannot read {cert}: {result.stderr.strip()}")
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    return lines[-1] if lines else ""
