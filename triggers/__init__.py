"""Trigger sources: each decides *when* an event happens and emits it to the dispatcher."""
