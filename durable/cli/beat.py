"""``durable beat``: run the timer service and the recovery sweep in the foreground."""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType
from wsgiref.simple_server import WSGIServer

import click

from durable import metrics
from durable.beat import Beat
from durable.cli._common import CommandFailed, Seconds, app_option, require_app
from durable.runtime import Durable
from durable.store import engine as store_engine


@click.command()
@app_option
@click.option(
    "--sweep-interval",
    type=Seconds(positive=True),
    default=1.0,
    show_default=True,
    show_envvar=True,
    help="Seconds between sweeps of PostgreSQL for overdue timers and lost dispatches.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=1, max=65535),
    metavar="PORT",
    show_envvar=True,
    help="Serve Prometheus metrics on this port at /metrics (default: no metrics).",
)
@click.option(
    "--metrics-address",
    default="127.0.0.1",
    show_default=True,
    metavar="ADDRESS",
    show_envvar=True,
    help="Address the metrics server listens on.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
    show_envvar=True,
    help="Level of the log lines written to stderr.",
)
@click.pass_context
def beat(
    ctx: click.Context,
    app: str | None,
    sweep_interval: float,
    metrics_port: int | None,
    metrics_address: str,
    log_level: str,
) -> None:
    """Run the timer service and the recovery sweep until SIGTERM or SIGINT.

    Run two or more for availability: every beat fires timers exactly once. With
    --metrics-port it also serves Prometheus metrics (see docs/operations.md).
    """
    durable = require_app(ctx, app)
    _ = durable.settings  # fail now on a missing setting, not later in the loop
    logging.basicConfig(
        level=log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    service = Beat(durable, sweep_interval=sweep_interval)

    def stop(signum: int, frame: FrameType | None) -> None:
        logging.getLogger(__name__).info("%s received; stopping", signal.Signals(signum).name)
        service.stopping.set()

    server = None
    if metrics_port is not None:
        server = _serve_metrics(durable, metrics_port, metrics_address, service)
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        service.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if server is not None:
            server.shutdown()
            server.server_close()
        store_engine.dispose_all()


def _serve_metrics(durable: Durable, port: int, address: str, service: Beat) -> WSGIServer:
    try:
        server = metrics.serve(durable, port, address, service.stats)
    except OSError as exc:
        raise CommandFailed(f"cannot serve metrics on {address}:{port}: {exc.strerror}") from None
    logging.getLogger(__name__).info("metrics at http://%s:%d/metrics", address, port)
    return server
