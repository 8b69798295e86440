"""An HTTP/2 (h2c) front for the embedded moto server, for the KCL's Kinesis client.

The KCL 3 builds its Kinesis client on the Java SDK's Netty client with HTTP/2; against an http://
endpoint that means HTTP/2 with prior knowledge, which moto's werkzeug server does not speak
(`Http2Exception: First received frame was not SETTINGS`, moto answers an HTML page). This proxy
accepts h2c (hypercorn) and forwards each request unchanged to moto over HTTP/1.1; DynamoDB and S3
go to moto directly. LocalStack and AWS speak HTTP/2 themselves and need no proxy.

    python -m cdcflow.archive.h2c_proxy --port 5001 --upstream http://127.0.0.1:5000
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
from urllib.parse import urlsplit

HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "http2-settings"}


def make_app(upstream: str):
    u = urlsplit(upstream)

    def forward(method: str, target: str, headers: list[tuple[str, str]], body: bytes):
        conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=60)
        try:
            conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for k, v in headers:
                conn.putheader(k, v)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            r = conn.getresponse()
            return r.status, r.getheaders(), r.read()
        finally:
            conn.close()

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"]
                   if k.decode().lower() not in HOP | {"content-length"}]
        if not any(k.lower() == "host" for k, _ in headers):
            authority = next((v for k, v in headers if k == ":authority"), f"{u.hostname}:{u.port}")
            headers.append(("Host", authority))
        target = scope["raw_path"].decode() + (("?" + scope["query_string"].decode()) if scope["query_string"] else "")
        status, rheaders, rbody = await asyncio.to_thread(forward, scope["method"], target, headers, body)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(k.lower().encode(), v.encode()) for k, v in rheaders
                                if k.lower() not in HOP | {"content-length"}]
                    + [(b"content-length", str(len(rbody)).encode())]})
        await send({"type": "http.response.body", "body": rbody})

    return app


def main(argv: list[str] | None = None) -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    a = p.parse_args(argv)
    cfg = Config()
    cfg.bind = [f"127.0.0.1:{a.port}"]
    cfg.accesslog = None
    cfg.loglevel = "WARNING"
    asyncio.run(serve(make_app(a.upstream), cfg))


if __name__ == "__main__":
    main()
