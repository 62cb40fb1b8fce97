# The handler of the shell example: its first argument is the event (JSON); what it prints to
# stdout is the response, and what it prints to stderr goes to the function's log.
handler () {
    event="$1"
    echo "shell handler got: $event" >&2
    printf '{"message":"hello from sh","event":%s}' "$event"
}
