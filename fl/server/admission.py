"""Which verified certificates the server admits: none on the project's revocation list, and, when
the server has an allow-list, only the sites on it.

The revocation list is a CRL signed by the project CA (``fl provision --revoke`` writes it). The
server re-reads it on SIGHUP and every ``refresh`` seconds. A list that is unreadable, not signed by
the project CA, or older than the one in force is refused: the server keeps the list it has and logs
why. A list past its next-update time is still enforced (revocations never lapse, and a server that
refused to start on it would crash-loop a year after provisioning), with a warning at load and at
every refresh until it is renewed. When a new list revokes a certificate that a connected site uses, that site's
session ends at once (its in-flight work is failed, as for a lost site).
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from fl.log import adapter
from fl.transport import PeerCertificate

__all__ = ["MAX_CRL_BYTES", "Admission", "RevocationList", "RevocationListError", "parse_revocation_list"]

log = adapter("fl.server", site="server")

#: A revocation list larger than this is refused unread (fl's own hold ~40 bytes per certificate).
MAX_CRL_BYTES = 16 * 1024 * 1024
#: Tolerated clock difference between the machine that signed a list and the server.
CLOCK_SKEW = datetime.timedelta(minutes=5)


class RevocationListError(ValueError):
    """A revocation list the server will not use; the message says which file and why."""


@dataclass(frozen=True)
class RevocationList:
    """The revoked serials of one issuer, as loaded from a CRL the project CA signed."""

    issuer: bytes = b""
    serials: frozenset[int] = frozenset()
    number: int = -1
    next_update: datetime.datetime | None = None
    source: bytes = field(default=b"", repr=False)

    def revokes(self, cert: PeerCertificate) -> bool:
        return cert.serial in self.serials and cert.issuer == self.issuer

    def expired(self, now: datetime.datetime | None = None) -> bool:
        """Whether the list is past its next-update time (it is enforced all the same)."""
        now = now or datetime.datetime.now(datetime.timezone.utc)
        return self.next_update is not None and self.next_update < now

    def expiry_warning(self) -> str:
        """What the server logs while it enforces an expired list."""
        assert self.next_update is not None
        return (
            f"revocation list expired on {self.next_update.isoformat()}; it is still enforced "
            "(revocations never lapse); renew it with `fl provision --out DIR` (the CA's folder)"
        )

    def describe(self) -> str:
        if self.number < 0:
            return "no revocation list"
        next_update = self.next_update.isoformat() if self.next_update else "never"
        return f"{len(self.serials)} revoked, number {self.number}, next update {next_update}"


def parse_revocation_list(pem: bytes, ca_pem: bytes, *, now: datetime.datetime | None = None) -> RevocationList:
    """Check that ``pem`` is a CRL signed by a CA of ``ca_pem``; raise :class:`RevocationListError` if not.

    An expired list passes (see :meth:`RevocationList.expired`): its revocations still hold.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from fl.provision import crl_number

    if len(pem) > MAX_CRL_BYTES:
        raise RevocationListError(f"it is {len(pem)} bytes, over the limit of {MAX_CRL_BYTES}")
    try:
        crl = x509.load_pem_x509_crl(pem)
    except ValueError as exc:
        raise RevocationListError(f"it is not a PEM certificate revocation list ({exc})") from None
    issuers = [ca for ca in x509.load_pem_x509_certificates(ca_pem) if ca.subject == crl.issuer]
    if not issuers:
        raise RevocationListError(f"it is issued by {crl.issuer.rfc4514_string()!r}, not by the project CA")
    key = issuers[0].public_key()
    if not isinstance(key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)) or not crl.is_signature_valid(key):
        raise RevocationListError(f"its signature does not verify with the project CA {crl.issuer.rfc4514_string()!r}")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if crl.next_update_utc is None:
        raise RevocationListError("it has no next-update time")
    if crl.last_update_utc > now + CLOCK_SKEW:
        raise RevocationListError(f"it is dated in the future ({crl.last_update_utc.isoformat()})")
    return RevocationList(
        crl.issuer.public_bytes(),
        frozenset(entry.serial_number for entry in crl),
        crl_number(crl),
        crl.next_update_utc,
        pem,
    )


class Admission:
    """The server's certificate checks beyond TLS: revocation list (reloaded) and site allow-list."""

    def __init__(
        self,
        ca_pem: bytes,
        crl_path: Path,
        *,
        required: bool = False,
        refresh: float = 60.0,
        allowed_sites: Collection[str] | None = None,
        on_revoked: Callable[[str, str], object] = lambda name, reason: None,
    ) -> None:
        self.ca_pem = ca_pem
        self.crl_path = crl_path
        #: An explicitly named list must exist at start; the default one (the TLS folder's) may not.
        self.required = required
        self.refresh = refresh
        self.allowed_sites = frozenset(allowed_sites) if allowed_sites else None
        self.on_revoked = on_revoked
        self.current = RevocationList()
        self._latest: dict[str, PeerCertificate] = {}  # by name: the certificate last admitted
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ checks
    def refusal(self, cert: PeerCertificate) -> str | None:
        """Why ``cert`` is not admitted, or None when it is (then it is remembered as its name's latest)."""
        if self.current.revokes(cert):
            return f"certificate of {cert.name!r} (serial {cert.serial:x}) is revoked"
        if self.allowed_sites is not None and cert.role == "site" and cert.name not in self.allowed_sites:
            allowed = ", ".join(sorted(self.allowed_sites))
            return f"site {cert.name!r} is not on this server's allowed sites ({allowed})"
        with self._lock:
            self._latest[cert.name] = cert
        return None

    # ------------------------------------------------------------------ loading
    def load_initial(self) -> None:
        """Load the list at start; a bad (or, when required, missing) list raises, so the server does not start."""
        if not self.crl_path.exists():
            if self.required:
                raise RevocationListError(f"revocation list {self.crl_path}: no such file")
            log.info("no revocation list at %s: no certificate is revoked", self.crl_path)
            return
        try:
            self._install(parse_revocation_list(self._read(), self.ca_pem), "loaded")
        except (OSError, RevocationListError) as exc:
            raise RevocationListError(f"revocation list {self.crl_path}: {exc}") from None

    def reload(self, why: str) -> bool:
        """Re-read the list; a refused one leaves the current list in force. True when a new list was installed."""
        try:
            pem = self._read()
        except FileNotFoundError:
            if self.current.number >= 0:
                log.error("revocation list %s is gone (%s); keeping the one in force", self.crl_path, why)
            return False
        except OSError as exc:
            log.error("cannot read revocation list %s (%s): %s; keeping the one in force", self.crl_path, why, exc)
            return False
        if pem == self.current.source and why != "SIGHUP":
            self._warn_if_expired()
            return False
        try:
            new = parse_revocation_list(pem, self.ca_pem)
            if new.number < self.current.number:
                raise RevocationListError(
                    f"it is older than the list in force (number {new.number} < {self.current.number})"
                )
        except RevocationListError as exc:
            log.error(
                "REFUSED revocation list %s (%s): %s; keeping the one in force (%s)",
                self.crl_path,
                why,
                exc,
                self.current.describe(),
            )
            return False
        self._install(new, f"reloaded ({why})")
        return True

    def _read(self) -> bytes:
        with open(self.crl_path, "rb") as f:
            return f.read(MAX_CRL_BYTES + 1)

    def _warn_if_expired(self) -> None:
        if self.current.expired():
            log.warning("%s: %s", self.crl_path, self.current.expiry_warning())

    def _install(self, new: RevocationList, what: str) -> None:
        """Put ``new`` in force, log it, and end the sessions of sites whose latest certificate it revokes."""
        self.current = new
        log.info("revocation list %s %s: %s", self.crl_path, what, new.describe())
        self._warn_if_expired()
        with self._lock:
            revoked = [cert for cert in self._latest.values() if new.revokes(cert)]
            for cert in revoked:
                del self._latest[cert.name]
        for cert in revoked:
            self.on_revoked(cert.name, f"its certificate (serial {cert.serial:x}) was revoked")

    # ------------------------------------------------------------------ reloading
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fl-crl-refresh", daemon=True)
        self._thread.start()

    def request_reload(self) -> None:
        """Re-read the list now (from a SIGHUP handler: only sets an event)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        while True:
            woken = self._wake.wait(self.refresh)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.reload("SIGHUP" if woken else "refresh")
            except Exception:  # a bug here must not end reloading; the list in force stays
                log.exception("reloading revocation list %s failed", self.crl_path)
