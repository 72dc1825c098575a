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
import re
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
    "time_offset_microseconds",
    "shift_date",
    "shift_time",
    "shift_instant",
    "shift_datetime",
]

KEY_FILE = "pseudonym.key"
KEY_BYTES = 32
# Dates move back by 200 to 210 years: intervals within a patient stay exact, and a shifted
# date can never equal a real study or birth date (so leak scans have no false positives).
_SHIFT_MIN_DAYS = 73_048
_SHIFT_SPAN_DAYS = 3_653
_DAY_MICROSECONDS = 86_400_000_000
# TM (PS3.5 6.2): HH, HHMM, HHMMSS or HHMMSS.F{1,6}; the ACR-NEMA form with ':' separators is read too.
_TIME = re.compile(r"^(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?$")
# The UTC offset suffix of a DT value (&ZZXX).
_UTC_OFFSET = re.compile(r"[+-]\d{4}$")


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


def time_offset_microseconds(key: bytes, subject: str) -> int:
    """The sub-day part of a patient's time shift (whole seconds under 24 h, in microseconds), keyed
    like the day offset.

    Together with :func:`date_offset_days` it moves every instant (date + time) of a patient back by
    one amount, so times change as well as dates and every interval between two instants stays exact.
    Whole seconds: a time given to the second or finer moves exactly (its fraction digits stay), and
    only a time coarser than a second (HH, HHMM) is truncated to its precision after the shift.
    """
    digest = hmac.new(key, b"time\x00" + subject.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") % 86_400 * 1_000_000


def _parse_time(value: str) -> tuple[int, int] | None:
    """``(microseconds since midnight, precision)`` of a TM value; precision: 1 HH, 2 HHMM, 3 HHMMSS, 4+ fraction digits + 3."""
    text = value.strip().replace(":", "")
    match = _TIME.match(text)
    if match is None:
        return None
    hours, minutes, seconds, fraction = match.groups()
    if int(hours) > 23 or int(minutes or 0) > 59 or int(seconds or 0) > 60:
        return None
    seconds_value = min(int(seconds or 0), 59)  # a leap second (60) is kept as the last second of its minute
    micros = ((int(hours) * 60 + int(minutes or 0)) * 60 + seconds_value) * 1_000_000
    if fraction:
        micros += int(fraction.ljust(6, "0"))
    precision = 1 if minutes is None else 2 if seconds is None else 3 if fraction is None else 3 + len(fraction)
    return micros, precision


def _format_time(micros: int, precision: int) -> str:
    """A TM value of ``precision`` (as :func:`_parse_time` gives it) for a time of day (truncated, never rounded)."""
    seconds, fraction = divmod(micros, 1_000_000)
    text = f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"
    if precision <= 3:
        return text[: 2 * precision]
    digits = precision - 3
    return f"{text}.{f'{fraction:06d}'[:digits]}"


def shift_time(value: str, microseconds: int) -> str | None:
    """Shift a TM value with no date beside it back by ``microseconds`` (modulo a day); None if unparsable."""
    parsed = _parse_time(value)
    if parsed is None:
        return None
    micros, precision = parsed
    return _format_time((micros - microseconds) % _DAY_MICROSECONDS, precision)


def shift_instant(date: str, time: str, days: int, microseconds: int) -> tuple[str, str] | None:
    """Shift a date and its time as one instant (``days`` + ``microseconds`` back); None if either is unparsable.

    The date can change with the time (an instant shifted across midnight), which is what keeps the
    interval between any two instants of a patient exact.
    """
    day = _parse_date(date)
    parsed = _parse_time(time)
    if day is None or parsed is None:
        return None
    micros, precision = parsed
    try:
        moment = _dt.datetime.combine(day, _dt.time()) + _dt.timedelta(microseconds=micros)
        moment -= _dt.timedelta(days=days, microseconds=microseconds)
    except OverflowError:
        return None
    since_midnight = ((moment.hour * 60 + moment.minute) * 60 + moment.second) * 1_000_000 + moment.microsecond
    return moment.strftime("%Y%m%d").rjust(8, "0"), _format_time(since_midnight, precision)


def _parse_date(value: str) -> _dt.date | None:
    text = value.strip()
    if len(text) == 10 and text[4] == "." and text[7] == ".":  # ACR-NEMA style YYYY.MM.DD
        text = text.replace(".", "")
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return _dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def shift_date(value: str, days: int) -> str | None:
    """Shift a DA value (``YYYYMMDD``, or a ``A-B`` range) back by ``days``; None if unparsable."""
    text = value.strip()
    if "-" in text:
        parts = text.split("-")
        if len(parts) != 2:
            return None
        shifted = [shift_date(part, days) if part else "" for part in parts]
        return None if any(item is None for item in shifted) else "-".join(shifted)  # type: ignore[arg-type]
    day = _parse_date(text)
    if day is None:
        return None
    try:
        return (day - _dt.timedelta(days=days)).strftime("%Y%m%d").rjust(8, "0")
    except OverflowError:
        return None


def shift_datetime(value: str, days: int, microseconds: int = 0) -> str | None:
    """Shift a DT value back by ``days`` + ``microseconds`` as one instant; the UTC offset and the
    precision stay. A DT with a date only moves by whole days. None if unparsable (or a range)."""
    text = value.strip()
    suffix = ""
    match = _UTC_OFFSET.search(text)
    if match is not None and match.start() >= 8:
        text, suffix = text[: match.start()], match.group()
    if len(text) < 8:
        return None
    if len(text) == 8:
        date = shift_date(text, days)
        return None if date is None else date + suffix
    shifted = shift_instant(text[:8], text[8:], days, microseconds)
    return None if shifted is None else shifted[0] + shifted[1] + suffix
