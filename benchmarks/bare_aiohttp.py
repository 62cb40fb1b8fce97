"""The baseline: a bare aiohttp hello-world on PORT, answering any POST with a small JSON body."""

import sys

from aiohttp import web


async def hello(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"hello": "world"})


app = web.Application()
app.router.add_post("/{tail:.*}", hello)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
