"""Certificates for gRPC over TLS: a private CA, one server certificate, one client certificate per edge device.

`make_certs(out_dir)` writes everything a deployment (or a test) needs:

    ca.pem, ca.key                 the CA that signs everything below (keep ca.key offline in a real deployment)
    server.pem, server.key         the cloud's certificate, with SubjectAltNames for every name/IP it is reached by
    <client>.pem, <client>.key     one per edge device: CN = the client's name, ExtendedKeyUsage clientAuth

Keys are ECDSA P-256 (fast to make, supported by gRPC's BoringSSL) and are written with mode 0600.
`load_server_credentials` / `load_channel_credentials` turn the folder into gRPC credentials; with mutual TLS the
server learns who is calling from the client certificate, which `peer_client_name(context)` reads.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from privacy.security.files import write_atomic, write_private_key

VALID_DAYS = 365


@dataclass
class CertPaths:
    """Where `make_certs` put each file. `clients` maps a client name to its (certificate, key) paths."""
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]] = field(default_factory=dict)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key) -> None:
    """Write a private key, readable by the owner only, replacing one made before (with its certificate)."""
    write_private_key(path, key, overwrite=True)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    write_atomic(path, cert.public_bytes(serialization.Encoding.PEM))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tandem"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew between machines
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS)))


def _san_entry(name: str) -> x509.GeneralName:
    """An IP address becomes an IPAddress SAN (what TLS checks for IPs), anything else a DNSName."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_ca(common_name: str = "Tandem CA") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate that may sign leaf certificates only (path length 0)."""
    key = _new_key()
    name = _name(common_name)
    cert = (_builder(name, name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def make_leaf(ca_cert: x509.Certificate, ca_key, common_name: str, usage: x509.ObjectIdentifier,
              san: list[str] = ()) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for `common_name`, signed by the CA, usable only for `usage` (serverAuth or clientAuth)."""
    key = _new_key()
    b = (_builder(_name(common_name), ca_cert.subject, key.public_key())
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                      data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                      crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName([_san_entry(n) for n in san]), critical=False)
    return b.sign(ca_key, hashes.SHA256()), key


def make_certs(out_dir: str | Path, server_names: tuple[str, ...] = ("localhost", "127.0.0.1"),
               clients: tuple[str, ...] = ("edge-0",)) -> CertPaths:
    """Write a CA, a server certificate valid for `server_names`, and one client certificate per name in `clients`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not server_names:
        raise ValueError("need at least one server name (DNS name or IP address)")
    for c in clients:
        if not c or "/" in c or c.startswith(".") or c in ("ca", "server"):
            raise ValueError(f"bad client name {c!r}: it names the files <name>.pem and <name>.key")
    ca_cert, ca_key = make_ca()
    paths = CertPaths(out / "ca.pem", out / "ca.key", out / "server.pem", out / "server.key")
    _write_cert(paths.ca_cert, ca_cert)
    _write_key(paths.ca_key, ca_key)
    srv_cert, srv_key = make_leaf(ca_cert, ca_key, server_names[0], ExtendedKeyUsageOID.SERVER_AUTH,
                                  list(server_names))
    _write_cert(paths.server_cert, srv_cert)
    _write_key(paths.server_key, srv_key)
    for c in clients:
        cert, key = make_leaf(ca_cert, ca_key, c, ExtendedKeyUsageOID.CLIENT_AUTH)
        paths.clients[c] = (out / f"{c}.pem", out / f"{c}.key")
        _write_cert(paths.clients[c][0], cert)
        _write_key(paths.clients[c][1], key)
    return paths


def _read(path: Path) -> bytes:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: create the certificates with privacy.security.certs.make_certs")
    return path.read_bytes()


def load_server_credentials(cert_dir: str | Path, require_client_cert: bool = False) -> grpc.ServerCredentials:
    """TLS for the cloud server. With `require_client_cert`, only clients holding a CA-signed certificate connect
    (mutual TLS) and `peer_client_name(context)` names them; without, any client that trusts the CA may connect."""
    d = Path(cert_dir)
    pair = (_read(d / "server.key"), _read(d / "server.pem"))
    if require_client_cert:
        return grpc.ssl_server_credentials([pair], root_certificates=_read(d / "ca.pem"), require_client_auth=True)
    return grpc.ssl_server_credentials([pair])


def load_channel_credentials(cert_dir: str | Path, client_name: str | None = None) -> grpc.ChannelCredentials:
    """TLS for an edge client: trust only the CA in `cert_dir`, and present `<client_name>.pem` when given."""
    d = Path(cert_dir)
    root = _read(d / "ca.pem")
    if client_name is None:
        return grpc.ssl_channel_credentials(root_certificates=root)
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=_read(d / f"{client_name}.key"),
                                        certificate_chain=_read(d / f"{client_name}.pem"))


def peer_client_name(context: grpc.ServicerContext) -> str | None:
    """The CN of the client certificate of the peer calling this RPC (mutual TLS), or None without one."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode() if names else None
