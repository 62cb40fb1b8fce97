def handler(event, context):
    raise ValueError(f"cannot process {event['name']}")
