"""The web dashboard: server-rendered pages over the round ledger, read-only.

Pages: ``/`` lists the runs; ``/runs/{run}`` shows one run (ledger or Flower run id) with SVG charts
of its rounds, the rounds table, the client results of one round (``?round=N``, the last by default),
its differential privacy (epsilon per round and per user, when it has any) and its events; ``/runs/{run}/export.json`` and ``.csv`` download what ``fedgraft-ops export`` writes.

With a token, every request needs ``Authorization: Bearer <token>`` or ``?token=<token>``, else 401;
pages reached with ``?token=`` keep it in their links, so a browser can follow them.
"""

from __future__ import annotations

import hmac
import io
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from sqlalchemy.exc import DBAPIError
from starlette.applications import Starlette
from starlette.datastructures import Headers, QueryParams
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Receive, Scope, Send

from server.ledger import Ledger, LedgerError
from server.ledger.records import RoundRecord

from . import formatting as fmt
from .charts import Series, line_chart
from .export import write_csv, write_json
from .queries import (checkpoints, open_ledger, resolve_run, round_seconds, run_duration, run_overviews, user_budget,
                      users_privacy)

TEMPLATES = Path(__file__).resolve().parent / "templates"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
REFRESH_SECONDS = 15  # a running run's page reloads itself this often


def create_app(ledger_url: str, token: str | None = None) -> Starlette:
    """The dashboard over the ledger at ``ledger_url``, opened read-only now (LedgerError if not)."""
    ledger = open_ledger(ledger_url)
    pages = Pages(ledger, _templates())

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        ledger.close()

    routes = [
        Route("/", pages.runs, name="runs"),
        Route("/runs/{run}", pages.run, name="run"),
        Route("/runs/{run}/export.{format:str}", pages.export, name="export"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    if token:
        app.add_middleware(BearerToken, token=token)
    return app


def serve(ledger_url: str, host: str = "127.0.0.1", port: int = 8765, token: str | None = None) -> None:
    """Run the dashboard with uvicorn until interrupted."""
    import uvicorn

    if host not in LOOPBACK and not token:
        print(f"warning: serving the ledger on {host} without --token: anyone who can reach it can read it",
              file=sys.stderr)  # fmt: skip
    uvicorn.run(create_app(ledger_url, token), host=host, port=port, log_level="info")


class BearerToken:
    """ASGI middleware: 401 unless the request carries the token (header or ``?token=``)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        response = PlainTextResponse(
            "401 Unauthorized: send 'Authorization: Bearer <token>' or add ?token=<token> to the URL\n",
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="fedgraft"'},
        )
        await response(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        header = Headers(scope=scope).get("authorization", "")
        scheme, _, credentials = header.partition(" ")
        offered = [QueryParams(scope["query_string"]).get("token", "")]
        if scheme.lower() == "bearer":
            offered.append(credentials.strip())
        return any(candidate and hmac.compare_digest(candidate.encode(), self.token) for candidate in offered)


class Pages:
    """The request handlers. They are plain functions: Starlette runs them in its thread pool."""

    def __init__(self, ledger: Ledger, templates: Jinja2Templates) -> None:
        self.ledger = ledger
        self.templates = templates

    def runs(self, request: Request) -> Response:
        try:
            overviews = run_overviews(self.ledger)
        except DBAPIError as error:
            return self._error(request, error, status=503)
        return self._page(request, "runs.html", overviews=list(reversed(overviews)), where=self.ledger.masked_url)

    def run(self, request: Request) -> Response:
        try:
            return self._page(request, "run.html", **self._run_context(request))
        except LedgerError as error:
            return self._error(request, error, status=404)
        except DBAPIError as error:
            return self._error(request, error, status=503)

    def export(self, request: Request) -> Response:
        fmt_ = request.path_params["format"]
        if fmt_ not in ("json", "csv"):
            return PlainTextResponse(f"unknown export format {fmt_!r}: use export.json or export.csv", 404)
        try:
            run = resolve_run(self.ledger, request.path_params["run"])
            rounds, results = self.ledger.rounds(run.id), self.ledger.client_results(run.id)
        except LedgerError as error:
            return PlainTextResponse(str(error), 404)
        except DBAPIError as error:
            return PlainTextResponse(f"reading the ledger failed: {error.orig}", 503)
        stream = io.StringIO()
        if fmt_ == "json":
            write_json(stream, run, rounds, results)
        else:
            write_csv(stream, rounds, results)
        media = "application/json" if fmt_ == "json" else "text/csv"
        disposition = f'attachment; filename="fedgraft-run-{run.id}.{fmt_}"'
        return Response(stream.getvalue(), media_type=media, headers={"Content-Disposition": disposition})

    def _run_context(self, request: Request) -> dict[str, Any]:
        run = resolve_run(self.ledger, request.path_params["run"])
        rounds = self.ledger.rounds(run.id)
        selected = _selected_round(request, rounds)
        results = self.ledger.client_results(run.id, selected) if selected is not None else []
        return {
            "run": run,
            "duration": run_duration(run),
            "rounds": rounds,
            "selected": selected,
            "results": results,
            "events": self.ledger.events(run.id),
            "checkpoints": checkpoints(self.ledger, run.id),
            "privacy_rounds": self.ledger.privacy_rounds(run.id),
            "privacy_users": users_privacy(self.ledger.privacy_charges(run.id)),
            "budget": user_budget(run),
            "charts": round_charts(rounds),
            "refresh": REFRESH_SECONDS if run.status == "running" else None,
        }

    def _page(self, request: Request, template: str, status: int = 200, **values: Any) -> Response:
        values |= {"href": _href_for(request), "token": request.query_params.get("token")}
        return self.templates.TemplateResponse(request, template, values, status_code=status)

    def _error(self, request: Request, error: Exception, status: int) -> Response:
        message = str(error) if isinstance(error, LedgerError) else f"reading the ledger failed: {error}"
        return self._page(request, "error.html", status=status, message=message, code=status)


def round_charts(rounds: Sequence[RoundRecord]) -> list[Any]:
    """The run page's charts: losses, adapter bytes moved and participation, per round."""

    def series(label: str, value: Callable[[RoundRecord], float | None]) -> Series:
        return Series(label, [(r.number, value(r)) for r in rounds])

    unit, scale = byte_unit(max((max(r.bytes_down, r.bytes_up) for r in rounds), default=0))
    return [
        line_chart("loss", "Loss per round", [
            series("train", lambda r: r.metrics.get("train-loss")),
            series("held-out, before local training", lambda r: r.metrics.get("eval-loss-before")),
            series("held-out, after", lambda r: r.metrics.get("eval-loss")),
        ]),
        line_chart("bytes", f"Adapter bytes per round, all clients ({unit})", [
            series("down", lambda r: r.bytes_down / scale),
            series("up", lambda r: r.bytes_up / scale),
        ], y_from_zero=True),
        line_chart("participation", "Clients per round", [
            series("sampled", lambda r: r.clients_sampled),
            series("replied", lambda r: r.clients_replied),
            series("failed", lambda r: r.clients_failed),
        ], y_from_zero=True, y_integer=True),
    ]  # fmt: skip


def byte_unit(largest: int) -> tuple[str, int]:
    """The binary unit that shows ``largest`` bytes as a number below 1024, and its size."""
    for power, unit in enumerate(("B", "KiB", "MiB", "GiB")):
        if largest < 1024 ** (power + 1) or unit == "GiB":
            return unit, 1024**power
    raise AssertionError("unreachable")


def _selected_round(request: Request, rounds: Sequence[RoundRecord]) -> int | None:
    """The round whose client results to show: ``?round=N`` if it exists, else the last one."""
    numbers = [r.number for r in rounds]
    asked = request.query_params.get("round", "")
    if asked.isdecimal() and int(asked) in numbers:
        return int(asked)
    return numbers[-1] if numbers else None


def _href_for(request: Request) -> Callable[..., str]:
    """``href(path, **params)``: a link that keeps the request's ``?token=``, if it had one."""
    token = request.query_params.get("token")

    def href(path: str, **params: Any) -> str:
        query = {key: value for key, value in params.items() if value is not None}
        if token:
            query["token"] = token
        return f"{path}?{urlencode(query)}" if query else path

    return href


def _templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(TEMPLATES))
    templates.env.filters.update(
        number=fmt.number, size=fmt.size, seconds=fmt.seconds, duration=fmt.duration,
        timestamp=fmt.timestamp, short_hash=fmt.short_hash,
    )  # fmt: skip
    templates.env.globals |= {"round_seconds": round_seconds, "client_metrics": fmt.CLIENT_METRICS}
    return templates
