"""A FastAPI app behind Mangum, written as for AWS: the daemon's events must carry what Mangum
turns into an ASGI request (path, query, cookies, a binary body) and take back what it returns."""

from fastapi import FastAPI, Request, Response
from mangum import Mangum

app = FastAPI()


@app.get("/fa/items/{item_id}")
@app.get("/fa1/items/{item_id}")  # the same, behind a payload 1.0 route
def get_item(item_id: str, request: Request, q: str | None = None) -> dict:
    return {"id": item_id, "q": q, "session": request.cookies.get("session")}


@app.post("/fa/blob")
async def reverse_blob(request: Request) -> Response:
    body = await request.body()
    response = Response(content=body[::-1], media_type="application/octet-stream")
    response.set_cookie("seen", str(len(body)))
    return response


handler = Mangum(app, lifespan="off")
