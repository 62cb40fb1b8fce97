"""One Powertools app written as for AWS, behind a Function URL (`url`), an HTTP API (`http`,
mounted under /h) and API Gateway REST with payload 1.0 (`rest`, under /v1): the daemon's routes
and events must let it route unchanged."""

from aws_lambda_powertools.event_handler import (
    APIGatewayHttpResolver,
    APIGatewayRestResolver,
    LambdaFunctionUrlResolver,
    Response,
)
from aws_lambda_powertools.shared.cookies import Cookie


def routes(app):
    @app.get("/items/<item_id>")
    def get_item(item_id):
        event = app.current_event
        return {"id": item_id, "q": event.get_query_string_value("q"), "method": event.http_method}

    @app.post("/items")
    def create_item():
        return Response(
            status_code=201,
            content_type="application/json",
            body=app.current_event.body,
            cookies=[Cookie("a", "1"), Cookie("b", "2")],
        )

    return app


url_app = routes(LambdaFunctionUrlResolver())
http_app = routes(APIGatewayHttpResolver(strip_prefixes=["/h"]))
rest_app = routes(APIGatewayRestResolver(strip_prefixes=["/v1"]))


def url(event, context):
    return url_app.resolve(event, context)


def http(event, context):
    return http_app.resolve(event, context)


def rest(event, context):
    return rest_app.resolve(event, context)
