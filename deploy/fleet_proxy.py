"""Expose only the Fleet API to devices: a TLS reverse proxy in front of a loopback SuperLink.

In Flower 1.42 the SuperLink serves the Fleet API (what SuperNodes use), the Control API (submit and
stop runs, register nodes: unauthenticated in open-source Flower) and the Runtime API (the
ServerApp's) on ONE port. Binding that port to 127.0.0.1 keeps Control private but also keeps
devices out. This proxy listens where devices can reach it and forwards only ``POST /v1/fleet/*``
to the SuperLink over TLS on loopback; every other path gets 404 without reaching the SuperLink.

    python -m deploy.fleet_proxy --dir DEPLOY_DIR --host 0.0.0.0 --port 9443

It presents the deployment's server certificate (so ``prepare --san`` must name the public host)
and verifies the SuperLink with the deployment's CA. SuperNode authentication passes through
unchanged: a SuperNode signs a timestamp in request headers, which are forwarded as they are.
Any reverse proxy that forwards only ``/v1/fleet/`` does the same job (nginx, Caddy, Envoy).
"""

from __future__ import annotations

import argparse
import contextlib
import ssl
import sys
from pathlib import Path

# Connection-level headers a proxy must not forward; content-* are recomputed by the framework.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "trailers", "transfer-encoding", "upgrade", "host", "content-length", "content-encoding"})
FLEET_PREFIX = "/v1/fleet/"


def create_app(upstream: str, ca_cert: Path, timeout: float = 300.0):
    """A Starlette app forwarding ``POST /v1/fleet/*`` to ``https://upstream`` (verified with ``ca_cert``)."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    context = ssl.create_default_context(cafile=str(ca_cert))
    client = httpx.AsyncClient(base_url=f"https://{upstream}", verify=context, timeout=timeout)

    async def forward(request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            reply = await client.request(request.method, request.url.path, params=request.query_params,
                                         content=await request.body(), headers=headers)
        except httpx.HTTPError as error:
            return Response(f"SuperLink unreachable: {type(error).__name__}\n", status_code=502)
        reply_headers = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP}
        return Response(reply.content, status_code=reply.status_code, headers=reply_headers)

    async def refuse(request: Request) -> Response:
        return Response("Not found: only the Fleet API (/v1/fleet/) is served here.\n", status_code=404)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route(FLEET_PREFIX + "{rest:path}", forward, methods=["POST"]),
                             Route("/{rest:path}", refuse, methods=methods)], lifespan=lifespan)


def main(argv: list[str] | None = None) -> int:
    from deploy.flower import FlowerError
    from deploy.superlink import Settings

    parser = argparse.ArgumentParser(prog="python -m deploy.fleet_proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="the deployment folder (from deploy.superlink prepare)")
    parser.add_argument("--host", default="0.0.0.0", help="address devices reach (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=9443)
    args = parser.parse_args(argv)
    try:
        settings = Settings.load(args.dir)
        if settings.insecure:
            raise FlowerError("the fleet proxy needs a TLS deployment (prepare without --insecure)")
    except FlowerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    import uvicorn

    tls = settings.tls
    print(f"Forwarding https://{args.host}:{args.port}{FLEET_PREFIX}* -> https://{settings.address} "
          f"(certificate for {', '.join(settings.hosts)}); everything else: 404", file=sys.stderr, flush=True)
    uvicorn.run(create_app(settings.address, tls.ca_cert), host=args.host, port=args.port, log_level="warning",
                ssl_certfile=str(tls.server_cert), ssl_keyfile=str(tls.server_key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
