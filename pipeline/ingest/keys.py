"""The pseudonymization key and everything derived from it with a keyed HMAC.

One secret key (32 random bytes, created on the first run) lives in the private folder. Every
pseudonym is an HMAC-SHA256 of a domain-separated input under that key, so:

* the same key and the same original give the same pseudonym, in any run and any worker;
* without the key a pseudonym cannot be linked back (nor guessed by hashing candidate IDs);
* a different key gives unrelated pseudonyms.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from pipeline.core.errors import InputError

__all__ = [
    "KEY_FILE",
    "KEY_BYTES",
    "load_or_create_key",
    "demo_key",
    "keyed_hex",
    "subject_pseudonym",
    "sample_pseudonym",
    "file_reference",
    "keyed_uid",
    "date_offset_days",
    "shift_date",
    "shift_datetime",
]

KEY_FILE = "pseudonym.key"
KEY_BYTES = 32
# Dates move back by 200 to 210 years: intervals within a patient stay exact, and a shifted
# date can never equal a real study or birth date (so leak scans have no false positives).
_SHIFT_MIN_DAYS = 73_048
_SHIFT_SPAN_DAYS = 3_653


def load_or_create_key(private: Path, new_key: bytes | None = None) -> bytes:
    """Read the key from ``private/pseudonym.key``, creating the folder and key on first use.

    Args:
        private: the private folder.
        new_key: the key to store when there is none yet; None (always, for real data): 32
            random bytes. Only the phantom demo passes one (:func:`demo_key`).

    Raises:
        InputError: the key file exists but is not a key written by medsynth.
    """
    path = Path(private) / KEY_FILE
    if path.is_file():
        text = path.read_text(encoding="ascii", errors="replace").strip()
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) != KEY_BYTES:
            raise InputError(
                f"{path}: not a medsynth pseudonymization key (expected {KEY_BYTES * 2} hex digits). "
                "Fix: restore the key from your backup, or point --private at a new folder (new pseudonyms)."
            )
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(path.parent, 0o700)
    except OSError:
        pass
    key = new_key if new_key is not None else secrets.token_bytes(KEY_BYTES)
    if len(key) != KEY_BYTES:
        raise ValueError(f"a pseudonymization key has {KEY_BYTES} bytes")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(key.hex() + "\n")
    os.replace(tmp, path)
    return key


def demo_key(seed: int) -> bytes:
    """The phantom demo's key, derived from its seed: the same pseudonyms, hence the same split
    and the same figures, in every fresh demo. Never for real data: anyone can derive it."""
    return hashlib.sha256(f"medsynth phantom demo key\x00{int(seed)}".encode()).digest()


def keyed_hex(key: bytes, domain: str, value: str) -> str:
    """Hex HMAC-SHA256 of ``domain + NUL + value`` under ``key``."""
    return hmac.new(key, f"{domain}\x00{value}".encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()


def subject_pseudonym(key: bytes, original: str) -> str:
    """``sub-<16 hex>`` for a PatientID (DICOM) or a subject's source path (NIfTI)."""
    return "sub-" + keyed_hex(key, "subject", original)[:16]


def sample_pseudonym(key: bytes, original: str) -> str:
    """``img-<16 hex>`` for a SeriesInstanceUID (DICOM) or a NIfTI file's source path."""
    return "img-" + keyed_hex(key, "sample", original)[:16]


def file_reference(key: bytes, original: str) -> str:
    """``q-<16 hex>``: the pseudonymous reference of a quarantined input file."""
    return "q-" + keyed_hex(key, "file", original)[:16]


def keyed_uid(key: bytes, uid: str) -> str:
    """A new UID in the ``2.25.<128-bit integer>`` form (PS3.5 B.2), keyed and deterministic."""
    digest = hmac.new(key, b"uid\x00" + uid.strip().encode("ascii", "replace"), hashlib.sha256).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def date_offset_days(key: bytes, patient: str) -> int:
    """Days every date of this patient moves back (200-210 years; same for all of the patient's dates)."""
    digest = hmac.new(key, b"date\x00" + patient.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()
    return _SHIFT_MIN_DAYS + int.from_bytes(digest[:8], "big") % _SHIFT_SPAN_DAYS


def shift_date(value: str, days: int) -> str | None:
    """Shift a DA value (``YYYYMMDD``, or a ``A-B`` range) back by ``days``; None if unparsable."""
    text = value.strip()
    if "-" in text:
        parts = text.split("-")
        if len(parts) != 2:
            return None
        shifted = [shift_date(part, days) if part else "" for part in parts]
        return None if any(item is None for item in shifted) else "-".join(shifted)  # type: ignore[arg-type]
    if len(text) == 10 and text[4] == "." and text[7] == ".":  # ACR-NEMA style YYYY.MM.DD
        text = text.replace(".", "")
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        day = _dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None
    try:
        return (day - _dt.timedelta(days=days)).strftime("%Y%m%d").rjust(8, "0")
    except OverflowError:
        return None


def shift_datetime(value: str, days: int) -> str | None:
    """Shift the date part of a DT value back by ``days``; time and UTC offset stay; None if unparsable."""
    text = value.strip()
    if len(text) < 8:
        return None
    date = shift_date(text[:8], days)
    if date is None:
        return None
    rest = text[8:]
    if rest and not all(char.isdigit() or char in ".+-" for char in rest):
        return None
    return date + rest
