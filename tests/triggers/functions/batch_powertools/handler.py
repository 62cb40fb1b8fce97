"""Powertools' BatchProcessor, used as a Lambda user would on an SQS source, unchanged: each
record whose MQTT payload says "fail" raises in the record handler and is reported failed."""

from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

processor = BatchProcessor(event_type=EventType.SQS)


def record_handler(record: SQSRecord):
    payload = record.raw_event["payload"]
    if payload.get("do") == "fail":
        raise ValueError(f"record {record.message_id} failed")
    return payload["seq"]


def handler(event, context):
    return process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
