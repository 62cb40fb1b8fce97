"""An S3-triggered handler as written for Lambda: Powertools' S3Event and S3Model parse the event,
and the file is read from the local path lambdaemon adds beside the S3 fields."""

import hashlib
from pathlib import Path
from urllib.parse import unquote_plus

from aws_lambda_powertools.utilities.data_classes import S3Event
from aws_lambda_powertools.utilities.parser import parse
from aws_lambda_powertools.utilities.parser.models import S3Model


def handler(event, context):
    s3 = S3Event(event)
    record = s3.record
    model = parse(event=event, model=S3Model).Records[0]
    data = Path(event["Records"][0]["lambdaemon"]["path"]).read_bytes()
    return {
        "bucket": s3.bucket_name,
        "key": s3.object_key,  # Powertools decodes the form-encoded key
        "raw_key": record.s3.get_object.key,
        "model_key": unquote_plus(model.s3.object.key),
        "model_bucket": model.s3.bucket.name,
        "model_time": model.eventTime.isoformat(),
        "event_name": record.event_name,
        "region": record.aws_region,
        "configuration_id": record.s3.configuration_id,
        "size_ok": record.s3.get_object.size == len(data) == model.s3.object.size,
        "etag_ok": record.s3.get_object.etag == hashlib.md5(data).hexdigest(),
        "sequencer": record.s3.get_object.sequencer,
        "text": data.decode(),
    }
