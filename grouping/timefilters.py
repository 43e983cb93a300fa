"""Grafana OnCall's time filters, as they behave there: in UTC, whatever the host's TZ.

OnCall runs under Django with TIME_ZONE = "UTC", and Django exports that as the process
TZ, so everything Python does with "local time" is UTC there. tocsin must not set the
process TZ (logs, other threads), so the datetimes templates get are `UtcDatetime`s:
every method whose answer depends on local time treats local time as UTC.
"""
from __future__ import annotations

import calendar
import re
import time as _time
from datetime import datetime, timedelta, timezone

import pytz

_EXPECTED = (ValueError, AttributeError, TypeError)
_DEFAULT_FORMAT = "%H:%M / %d-%m-%Y"
# `%s` is the one strftime directive the C library computes from the local TZ (mktime);
# `%%` is matched first so that `%%s` stays a literal.
_EPOCH_DIRECTIVE = re.compile(r"%%|%s")


class UtcDatetime(datetime):
    """A datetime whose "local time" is UTC, as in Grafana OnCall's process.

    Arithmetic and replace() keep the class (CPython returns the subclass), so a
    template can compute with it and still get OnCall's answers.
    """

    def __repr__(self) -> str:
        # What OnCall's plain datetimes show (pprint, lists printed whole).
        return "datetime." + super().__repr__().replace(type(self).__name__, "datetime", 1)

    def timestamp(self) -> float:
        if self.tzinfo is None:
            return calendar.timegm(self.timetuple()) + self.microsecond / 1e6
        return super().timestamp()

    def astimezone(self, tz=None):
        if tz is None:
            tz = timezone.utc
        base = self.replace(tzinfo=timezone.utc) if self.utcoffset() is None else self
        return datetime.astimezone(base, tz)

    def strftime(self, format):
        if isinstance(format, str) and "%s" in format:
            epoch = str(calendar.timegm(self.timetuple()))
            format = _EPOCH_DIRECTIVE.sub(lambda m: m.group() if m.group() == "%%" else epoch, format)
        return super().strftime(format)

    @classmethod
    def now(cls, tz=None):
        now = datetime.now(tz if tz is not None else timezone.utc)
        return cls._of(now if tz is not None else now.replace(tzinfo=None))

    @classmethod
    def today(cls):
        return cls.now()

    @classmethod
    def fromtimestamp(cls, t, tz=None):
        moment = datetime.fromtimestamp(t, tz if tz is not None else timezone.utc)
        return cls._of(moment if tz is not None else moment.replace(tzinfo=None))

    @classmethod
    def strptime(cls, date_string, format):
        return cls._of(_strptime(date_string, format))

    @classmethod
    def _of(cls, value: datetime) -> "UtcDatetime":
        return cls(value.year, value.month, value.day, value.hour, value.minute, value.second,
                   value.microsecond, value.tzinfo, fold=value.fold)


def _strptime(value, format) -> datetime:
    parsed = datetime.strptime(value, format)
    if isinstance(format, str) and "%Z" in format:
        # strptime's %Z accepts UTC, GMT and the host's own zone names; OnCall's host is UTC.
        zone = _time.strptime(value, format).tm_zone
        if zone is not None and zone.lower() not in ("utc", "gmt"):
            raise ValueError(f"time zone name {zone!r} is not UTC or GMT")
    return parsed


# Django's parse_datetime fallback grammar, for what fromisoformat rejects (single-digit
# fields, comma fractions, space before the offset). Not ASCII-only: Django's isn't either.
_LOOSE_DATETIME = re.compile(
    r"(?P<year>\d{4})-(?P<month>\d{1,2})-(?P<day>\d{1,2})"
    r"[T ](?P<hour>\d{1,2}):(?P<minute>\d{1,2})"
    r"(?::(?P<second>\d{1,2})(?:[.,](?P<fraction>\d{1,6})\d{0,6})?)?"
    r"\s*(?P<tz>Z|[+-]\d{2}(?::?\d{2})?)?$"
)


def _fixed_zone(minutes: int) -> timezone:
    # Django's get_fixed_timezone: named "+HHMM", so %Z prints "+0530", not "UTC+05:30".
    sign = "-" if minutes < 0 else "+"
    return timezone(timedelta(minutes=minutes), "%s%02d%02d" % (sign, *divmod(abs(minutes), 60)))


def parse_datetime(value) -> UtcDatetime | None:
    """Django's parse_datetime (fromisoformat first, then its looser grammar)."""
    try:
        return UtcDatetime.fromisoformat(value)
    except ValueError:
        pass
    match = _LOOSE_DATETIME.match(value)
    if match is None:
        return None
    parts = match.groupdict()
    tz = parts.pop("tz")
    fraction = parts.pop("fraction")
    fields = {k: int(v) for k, v in parts.items() if v is not None}
    if fraction:
        fields["microsecond"] = int(fraction.ljust(6, "0"))
    tzinfo = None
    if tz == "Z":
        tzinfo = timezone.utc
    elif tz is not None:
        minutes = int(tz[1:3]) * 60 + (int(tz[-2:]) if len(tz) > 3 else 0)
        tzinfo = _fixed_zone(-minutes if tz[0] == "-" else minutes)
    return UtcDatetime(**fields, tzinfo=tzinfo)


def iso8601_to_time(value):
    try:
        return parse_datetime(value)
    except _EXPECTED:
        return None


def _as_utc_datetime(value):
    # Datetimes reaching a filter from elsewhere (a plain datetime) get the same rules.
    if type(value) is datetime:
        return UtcDatetime._of(value)
    return value


def datetimeformat(value, format=_DEFAULT_FORMAT):
    # OnCall catches AttributeError only: a bad format is a Template Warning there.
    try:
        return _as_utc_datetime(value).strftime(format)
    except AttributeError:
        return None


def datetimeformat_as_timezone(value, format=_DEFAULT_FORMAT, tz="UTC"):
    # pytz as in OnCall: zone names are case-insensitive, and an unknown one raises
    # UnknownTimeZoneError (a KeyError, so a Template Warning).
    try:
        return _as_utc_datetime(value).astimezone(pytz.timezone(tz)).strftime(format)
    except _EXPECTED:
        return None


def datetimeparse(value, format=_DEFAULT_FORMAT):
    try:
        return UtcDatetime.strptime(value, format)
    except _EXPECTED:
        return None


_TIMEDELTA = re.compile(r"^([-+]?)(\d+)([smhdwMQy])$")
_TIMEDELTA_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def timedeltaparse(value):
    try:
        match = _TIMEDELTA.match(value)
        if match is None:
            return None
        sign, amount, unit = match.groups()
        if unit not in _TIMEDELTA_UNITS:
            return None  # months, quarters and years have no fixed length
        amount = -int(amount) if sign == "-" else int(amount)
        return timedelta(**{_TIMEDELTA_UNITS[unit]: amount})
    except _EXPECTED:
        return None


def timestamp_to_datetime(value):
    try:
        return UtcDatetime.fromtimestamp(value)
    except _EXPECTED:
        return None


def now() -> UtcDatetime:
    """The `time()` global: an aware UTC datetime (Django's timezone.now)."""
    return UtcDatetime.now(timezone.utc)
