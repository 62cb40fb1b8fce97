def handler(event, context):
    """A string of event["bytes"] ASCII characters: its JSON is two bytes longer (the quotes)."""
    return "x" * event.get("bytes", 0)
