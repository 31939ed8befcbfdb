"""Metric families and their rendering in the Prometheus text exposition format (version 0.0.4).

What this module owns: ``MetricFamily`` (one named gauge, counter or summary and its labelled
samples), ``Registry`` (the collectors a scrape calls, and a few push-style counters for code
that has no state to read them from), and ``render``: ``# HELP`` / ``# TYPE`` lines, label values
escaped (``\\``, ``"``, newline), NaN and infinities as ``NaN`` / ``+Inf`` / ``-Inf``.

What it must never do: keep a polling loop or a copy of another room's state. Families are built
at scrape time from the live objects (see ``evcore.metrics.edge``), so a value is never older
than the scrape that shows it.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

__all__ = [
    "CONTENT_TYPE",
    "Collector",
    "Counter",
    "MetricFamily",
    "Registry",
    "render",
]

#: What a scrape answers with (the text format, version 0.0.4).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Kind = Literal["counter", "gauge", "summary", "untyped"]
_KINDS: frozenset[str] = frozenset({"counter", "gauge", "summary", "untyped"})
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
#: Label names a summary adds itself.
_RESERVED = {"summary": frozenset({"quantile"})}

Labels = Mapping[str, str]
#: (type, label names) already checked.
_CHECKED_NAMES: set[tuple[str, tuple[str, ...]]] = set()
_LabelPairs = tuple[tuple[str, str], ...]


class MetricFamily:
    """One metric (``name``, ``kind``, ``help``) and its samples, one per label set.

    A counter's name ends in ``_total``; a summary's samples are ``name{quantile="q"}`` and,
    when known, ``name_sum`` and ``name_count``."""

    __slots__ = ("help", "kind", "name", "samples")

    def __init__(self, name: str, kind: Kind, help: str) -> None:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"metric name {name!r} is not a Prometheus metric name")
        if kind not in _KINDS:
            raise ValueError(f"metric {name}: unknown type {kind!r}")
        if kind == "counter" and not name.endswith("_total"):
            raise ValueError(f"counter {name}: a counter's name ends in _total")
        self.name = name
        self.kind: Kind = kind
        self.help = help
        #: (suffix appended to ``name``, label pairs, value), in the order added.
        self.samples: list[tuple[str, _LabelPairs, float]] = []

    def add(self, value: float, labels: Labels | None = None) -> MetricFamily:
        """One sample (a gauge, counter or untyped value) with ``labels``."""
        if self.kind == "summary":
            raise ValueError(f"summary {self.name}: use add_summary")
        self.samples.append(("", self._pairs(labels), _number(self.name, value)))
        return self

    def add_summary(
        self,
        quantiles: Mapping[float, float],
        labels: Labels | None = None,
        *,
        sum_value: float | None = None,
        count: float | None = None,
    ) -> MetricFamily:
        """A summary's samples for one label set: ``quantiles`` (φ → value) and, when given,
        ``_sum`` and ``_count`` (cumulative, as Prometheus expects of them)."""
        if self.kind != "summary":
            raise ValueError(f"{self.kind} {self.name}: add_summary is for a summary")
        pairs = self._pairs(labels)
        for q, value in quantiles.items():
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"summary {self.name}: quantile {q!r} is not in [0, 1]")
            self.samples.append(
                ("", (*pairs, ("quantile", _format(float(q)))), _number(self.name, value))
            )
        if sum_value is not None:
            self.samples.append(("_sum", pairs, _number(self.name, sum_value)))
        if count is not None:
            self.samples.append(("_count", pairs, _number(self.name, count)))
        return self

    def _pairs(self, labels: Labels | None) -> _LabelPairs:
        if not labels:
            return ()
        pairs = tuple(labels.items())
        names = (self.kind, tuple(k for k, _ in pairs))
        if names not in _CHECKED_NAMES:
            # A scrape adds the same few label name sets thousands of times: check each once.
            reserved = _RESERVED.get(self.kind, frozenset())
            for key in names[1]:
                if not _LABEL_NAME.match(key) or key.startswith("__") or key in reserved:
                    raise ValueError(f"metric {self.name}: {key!r} cannot be a label name here")
            if len(_CHECKED_NAMES) < 1024:
                _CHECKED_NAMES.add(names)
        for key, value in pairs:
            if type(value) is not str:
                raise ValueError(f"metric {self.name}: label {key} must be a str, got {value!r}")
        return pairs


def _number(name: str, value: float) -> float:
    if isinstance(value, bool):
        return int(value)
    if not isinstance(value, int | float):
        raise ValueError(f"metric {name}: sample value must be a number, got {value!r}")
    return value


def _format(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if isinstance(value, int):
        return str(value)
    # repr is the shortest text that reads back as the same double (Go's ParseFloat takes it).
    return repr(float(value))


def _escape_label(value: str) -> str:
    if "\\" not in value and '"' not in value and "\n" not in value:
        return value
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def render(families: Iterable[MetricFamily]) -> str:
    """The families in the text exposition format, each family's samples together, ending in a
    newline. A name given twice, or a series (name and label set) twice, is an error: Prometheus
    would refuse the whole scrape."""
    lines: list[str] = []
    seen: set[str] = set()
    for fam in families:
        if fam.name in seen:
            raise ValueError(f"metric {fam.name} is given twice")
        seen.add(fam.name)
        lines.append(f"# HELP {fam.name} {_escape_help(fam.help)}")
        lines.append(f"# TYPE {fam.name} {fam.kind}")
        series: set[tuple[str, _LabelPairs]] = set()
        for suffix, pairs, value in fam.samples:
            key = (suffix, pairs if len(pairs) < 2 else tuple(sorted(pairs)))
            if key in series:
                raise ValueError(f"metric {fam.name}{suffix}: series {dict(pairs)} given twice")
            series.add(key)
            if pairs:
                body = ",".join(f'{k}="{_escape_label(v)}"' for k, v in pairs)
                lines.append(f"{fam.name}{suffix}{{{body}}} {_format(value)}")
            else:
                lines.append(f"{fam.name}{suffix} {_format(value)}")
    return "\n".join(lines) + "\n" if lines else ""


#: Called at every scrape, in the event loop: it reads what it shows then and there. The
#: iterable it returns is iterated later, in a worker thread (``MetricsServer``): a generator
#: that builds families must only touch what the collector copied before returning it.
Collector = Callable[[], Iterable[MetricFamily]]


class Counter:
    """A push-style counter, for code whose events leave no state to read at scrape time
    (``inc`` where they happen). Thread-safe; the label names are fixed when it is made."""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        MetricFamily(name, "counter", help)._pairs(dict.fromkeys(labelnames, ""))
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()
        if not self.labelnames:
            self._values[()] = 0

    def inc(self, amount: float = 1, **labels: str) -> None:
        if amount < 0 or math.isnan(amount):
            raise ValueError(f"counter {self.name}: cannot increase by {amount!r}")
        if set(labels) != set(self.labelnames):
            raise ValueError(
                f"counter {self.name}: labels {sorted(labels)}, expected {list(self.labelnames)}"
            )
        key = tuple(str(labels[n]) for n in self.labelnames)
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def value(self, **labels: str) -> float:
        key = tuple(str(labels[n]) for n in self.labelnames)
        with self._lock:
            return self._values.get(key, 0.0)

    def collect(self) -> list[MetricFamily]:
        fam = MetricFamily(self.name, "counter", self.help)
        with self._lock:
            items = sorted(self._values.items())
        for key, value in items:
            fam.add(value, dict(zip(self.labelnames, key, strict=True)))
        return [fam]


class Registry:
    """The collectors one endpoint serves, called in the order registered at every scrape."""

    def __init__(self) -> None:
        self._collectors: list[Collector] = []

    def register(self, collector: Collector) -> None:
        self._collectors.append(collector)

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        """A push-style counter served by this registry."""
        c = Counter(name, help, labelnames)
        self.register(c.collect)
        return c

    def read(self) -> list[Iterable[MetricFamily]]:
        """Call every collector (in the event loop); what each returned, not yet iterated."""
        return [collector() for collector in self._collectors]

    def collect(self) -> list[MetricFamily]:
        return [fam for part in self.read() for fam in part]

    def render(self) -> str:
        return render(self.collect())
