"""Prometheus metrics: families rendered in the text exposition format (0.0.4), served over HTTP.

``exposition``: ``MetricFamily``, ``Registry``, ``render``. ``server``: the ``[metrics]`` section
and ``MetricsServer``. ``edge``: what an edge exposes, read from its live objects at every scrape.
See docs/metrics.md. Nothing here polls, and nothing here changes what it reads.
"""

from evcore.metrics.exposition import (
    CONTENT_TYPE,
    Collector,
    Counter,
    MetricFamily,
    Registry,
    render,
)
from evcore.metrics.server import MetricsConfig, MetricsConfigError, MetricsServer

__all__ = [
    "CONTENT_TYPE",
    "Collector",
    "Counter",
    "MetricFamily",
    "MetricsConfig",
    "MetricsConfigError",
    "MetricsServer",
    "Registry",
    "render",
]
