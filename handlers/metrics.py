"""``GET /metrics``: the session manager's figures in Prometheus' text format."""

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from handlers.base import APIHandler


class MetricsHandler(APIHandler):
    """Exports the manager's registry for a Prometheus scraper."""

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.write(generate_latest(self.manager.metrics.registry))
