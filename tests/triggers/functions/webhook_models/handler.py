"""Webhook handlers as written for Lambda with Powertools' parser: the pydantic models of a
Function URL / HTTP API (payload 2.0) and an API Gateway REST (1.0) event must accept the event."""

import json

from aws_lambda_powertools.utilities.parser import parse
from aws_lambda_powertools.utilities.parser.models import (
    APIGatewayProxyEventModel,
    APIGatewayProxyEventV2Model,
    LambdaFunctionUrlModel,
)


def v2(event, context):
    url = parse(event=event, model=LambdaFunctionUrlModel)
    http_api = parse(event=event, model=APIGatewayProxyEventV2Model)
    seen = {
        "method": url.requestContext.http.method,
        "raw_path": url.rawPath,
        "query": url.queryStringParameters,
        "body": url.body,
        "route_key": http_api.routeKey,
        "path_parameters": http_api.pathParameters,
        "source_ip": str(http_api.requestContext.http.sourceIp),
    }
    return {"statusCode": 200, "body": json.dumps(seen)}


def v1(event, context):
    rest = parse(event=event, model=APIGatewayProxyEventModel)
    seen = {
        "method": rest.httpMethod,
        "resource": rest.resource,
        "path": rest.path,
        "path_parameters": rest.pathParameters,
        "multi_query": rest.multiValueQueryStringParameters,
        "body": rest.body,
        "source_ip": str(rest.requestContext.identity.sourceIp),
    }
    return {"statusCode": 200, "body": json.dumps(seen)}
