import time

print("init output")
time.sleep(60)


def handler(event, context):
    return {}
