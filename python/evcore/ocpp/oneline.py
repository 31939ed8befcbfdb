"""Strings a station chooses, made safe for one-line places: bus event ids and log lines.

Owns: ``id_part`` (a station's string as part of a bus event id), ``OneLineFilter`` (the
``evcore.ocpp`` logger's lines) and ``can_keep`` / ``keepable`` (a string the store and protobuf
can hold). A station picks its 2.0.1 transaction ids, its security event
types and its message ids, and may put CR/LF or other control characters in them: the bus
refuses an event id of more than one line (the station's message got InternalError on every
retry and was lost), and a log line naming one was split, a line forged after it. The record
(the bus message, the store, the wire) keeps what the station sent; only these copies change.
"""

from __future__ import annotations

import logging


def _escape(c: str) -> str:
    n = ord(c)
    if n < 0x100:
        return f"%{n:02X}"
    if n < 0x10000:
        return f"%u{n:04X}"
    return f"%U{n:08X}"


def id_part(text: str) -> str:
    """``text`` with ``%`` and every character that is not printable (``str.isprintable``:
    controls, line and paragraph separators, format characters, lone surrogates) written as
    ``%XX`` / ``%uXXXX`` / ``%UXXXXXXXX``: one line, and no two strings alike (``%`` escaped
    too, so a station's literal ``%0A`` is not its line feed)."""
    if text.isprintable() and "%" not in text:
        return text
    return "".join(_escape(c) if c == "%" or not c.isprintable() else c for c in text)


def can_keep(text: str) -> bool:
    """No NUL character and no lone surrogate: what the store (PostgreSQL refuses NUL) and
    protobuf (UTF-8 only) can hold. A station may send either (JSON ``"\\u0000"``,
    ``"\\ud800"``)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def keepable(text: str) -> str:
    """``text``, or ``id_part(text)`` when no record can hold it (``can_keep``): for a label
    kept for operators (an id tag, a security event's type), not for an id the station is
    answered with."""
    return text if can_keep(text) else id_part(text)


def _printable(text: str) -> str:
    """``text`` with characters that are not printable as ``repr`` writes them (``\\n``,
    ``\\x1b``, ``\\u2028``), for a reader; not necessarily reversible."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class OneLineFilter(logging.Filter):
    """Every ``evcore.ocpp`` log line as one line: its message, with the station's strings in
    it, has its characters that are not printable escaped (a traceback, logged apart from the
    message, keeps its lines)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.isprintable():
            record.msg, record.args = _printable(message), None
        return True


def install(logger: logging.Logger) -> None:
    """Add the filter to ``logger`` once."""
    if not any(isinstance(f, OneLineFilter) for f in logger.filters):
        logger.addFilter(OneLineFilter())
