def handler(event, context):
    raise ValueError(f"boom: {event.get('why', 'no reason')}")
