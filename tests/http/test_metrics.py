"""GET /metrics of the real daemon, read back with prometheus-client's own text parser."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from daemon.metrics import SOURCE_METRICS
from tests.daemon_proc import (
    ROOT,
    Daemon,
    Gate,
    free_port,
    running_daemon,
    shared_folder,
    write_config,
)
from tests.mosquitto import running_broker

FUNCS = Path(__file__).resolve().parents[1] / "functions"
DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "lambdaemon.json"
BODY = f"""
[functions.echo]
handler = "handler.handler"
code = "{FUNCS / "echo"}"

[functions.boom]
handler = "handler.handler"
code = "{FUNCS / "boom"}"
retries = 1
retry_backoff_s = [0.05, 0.1]

[functions.gated]
handler = "handler.handler"
code = "{FUNCS / "gated"}"
concurrency = 1
queue_size = 1
timeout_s = 20
"""


class Scrape:
    """One scrape's samples: value(name, **labels) of the one sample with those labels."""

    def __init__(self, text: str) -> None:
        self.samples = [
            sample for family in text_string_to_metric_families(text) for sample in family.samples
        ]

    def value(self, name: str, **labels: str) -> float:
        found = [s.value for s in self.samples if s.name == name and s.labels == labels]
        assert len(found) == 1, f"{name}{labels}: {found}"
        return found[0]

    def labels(self, name: str, key: str) -> set[str]:
        return {s.labels[key] for s in self.samples if s.name == name and key in s.labels}


async def scrape(daemon: Daemon, headers: dict[str, str] | None = None) -> Scrape:
    assert daemon.session is not None
    async with daemon.session.get(f"{daemon.base}/metrics", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return Scrape(await resp.text())


async def test_metrics_count_success_failure_retry_dead_letter_and_429(tmp_path: Path):
    async with running_daemon(tmp_path, BODY) as daemon:
        for _ in range(2):
            assert (await daemon.invoke("echo", {}))[0] == 200
        _, headers, _ = await daemon.invoke("boom", {"why": "sync"})
        assert headers["X-Amz-Function-Error"] == "Unhandled"
        status, headers, _ = await daemon.invoke("boom", {"why": "async"}, kind="Event")
        assert status == 202
        await daemon.wait_log("invocation_dead_lettered", invocation_id=headers["x-amzn-RequestId"])

        gate = Gate(shared_folder(tmp_path) / "gate")
        held = asyncio.ensure_future(daemon.invoke("gated", {"gate": str(gate.path)}))
        await daemon.wait_log("worker_started", function="gated")  # busy from then on
        waiting = asyncio.ensure_future(daemon.invoke("gated", {}))

        async def one_waits() -> Scrape | None:
            m = await scrape(daemon)
            return m if m.value("lambdaemon_invocations_waiting", function="gated") else None

        m = await daemon.wait_for(one_waits)  # polled: nothing logs a caller in line
        assert (await daemon.invoke("gated", {}))[0] == 429
        m = await scrape(daemon)
        gate.release()
        assert [(await held)[0], (await waiting)[0]] == [200, 200]

        assert (
            m.value(
                "lambdaemon_invocations_total", function="echo", trigger="api", status="succeeded"
            )
            == 2
        )
        assert (
            m.value("lambdaemon_invocations_total", function="boom", trigger="api", status="failed")
            == 2
        )
        assert m.value("lambdaemon_retries_total", function="boom") == 1
        assert m.value("lambdaemon_dead_letters_total", function="boom") == 1
        assert m.value("lambdaemon_dead_letters_total", function="echo") == 0
        assert m.value("lambdaemon_throttles_total", function="gated") == 1
        assert m.value("lambdaemon_throttles_total", function="echo") == 0
        assert m.value("lambdaemon_invocations_running", function="gated") == 1
        assert m.value("lambdaemon_invocations_waiting", function="gated") == 1
        assert m.value("lambdaemon_workers", function="gated", state="busy") == 1
        assert m.value("lambdaemon_workers", function="echo", state="idle") == 1
        assert m.labels("lambdaemon_workers", "state") == {"idle", "busy"}  # none starting
        # every attempt that ran has a duration: echo 2, boom 1 sync + 2 async attempts
        assert m.value("lambdaemon_invocation_duration_seconds_count", function="echo") == 2
        assert m.value("lambdaemon_invocation_duration_seconds_count", function="boom") == 3
        assert (
            m.value("lambdaemon_invocation_duration_seconds_bucket", function="echo", le="+Inf")
            == 2
        )
        assert m.value("lambdaemon_invocation_duration_seconds_sum", function="echo") > 0
        # one worker each: the first call was the cold start, with its init duration
        assert m.value("lambdaemon_cold_starts_total", function="echo") == 1
        assert m.value("lambdaemon_init_duration_seconds_count", function="echo") == 1
        assert m.value("lambdaemon_store_commits_total") > 0
        assert m.value("lambdaemon_store_commit_duration_seconds_count") > 0
        assert m.value("lambdaemon_store_database_bytes") > 0
        assert m.value("lambdaemon_outbox_records", status="pending") == 0
        assert m.value("lambdaemon_http_connections_open", listener="api") >= 1
        assert m.value("process_resident_memory_bytes") > 10 * 1024 * 1024

        after = await scrape(daemon)
        assert (
            after.value(
                "lambdaemon_invocations_total", function="gated", trigger="api", status="succeeded"
            )
            == 2
        )
        assert after.value("lambdaemon_invocations_running", function="gated") == 0


async def test_metrics_label_values_come_from_the_config_never_from_requests(tmp_path: Path):
    hooks = free_port()
    (tmp_path / "hook.token").write_text("hook-secret\n")
    body = (
        f'[webhooks]\nlisten = "127.0.0.1:{hooks}"\n'
        + BODY
        + '[[functions.echo.triggers]]\ntype = "webhook"\npath = "/hook"\nmode = "sync"\n'
        + f'auth = {{ type = "token", token_file = "{tmp_path / "hook.token"}" }}\n'
    )
    async with running_daemon(tmp_path, body) as daemon:
        assert (await daemon.invoke("nosuch", {}))[0] == 404
        assert (await daemon.invoke("echo%20x", {}))[0] == 404
        status, _, _ = await daemon.invoke(
            "echo", {}, headers={"X-Amz-Invocation-Type": "Bogus", "X-Amz-Client-Context": "x"}
        )
        assert status == 400
        assert (await daemon.invoke("echo", {}, kind="Event"))[0] == 202
        assert daemon.session is not None
        url = f"http://127.0.0.1:{hooks}"
        for path, auth in (("/hook", "Bearer wrong"), ("/hook", None), ("/elsewhere", "x")):
            headers = {"Authorization": auth} if auth else {}
            async with daemon.session.post(url + path, data=b"{}", headers=headers) as resp:
                assert resp.status in (401, 404)
        async with daemon.session.post(
            f"{url}/hook", data=b"{}", headers={"Authorization": "Bearer hook-secret"}
        ) as resp:
            assert resp.status == 200

        async def both_counted() -> Scrape | None:  # the async one counts once it is stored
            m = await scrape(daemon)
            total = sum(s.value for s in m.samples if s.name == "lambdaemon_invocations_total")
            return m if total == 2 else None

        m = await daemon.wait_for(both_counted)
        configured = {"echo", "boom", "gated"}
        assert m.labels("lambdaemon_invocations_total", "function") == {"echo"}
        assert m.labels("lambdaemon_invocations_total", "trigger") == {"api", "webhook"}
        for sample in m.samples:
            if sample.name.startswith("lambdaemon_") and "function" in sample.labels:
                assert sample.labels["function"] in configured, sample
        assert m.labels("lambdaemon_webhook_auth_failures_total", "route") == {"/hook"}
        assert m.value("lambdaemon_webhook_auth_failures_total", route="/hook") == 2
        assert m.value("lambdaemon_webhook_rejected_total", reason="not_found") == 1
        all_values = {v for s in m.samples for v in s.labels.values()}
        assert not all_values & {"nosuch", "echo x", "echo%20x", "Bogus", "/elsewhere"}

        # The Grafana dashboard shipped in docs/ asks only for what the daemon exports (the
        # sources' metrics of kinds this config lacks are in SOURCE_METRICS).
        exported = {s.name for s in m.samples} | set(SOURCE_METRICS)
        asked = set(re.findall(r"\b(?:lambdaemon|process)_[a-z_]+", DASHBOARD.read_text()))
        assert asked and asked - exported == set()


async def test_metrics_need_the_api_token_when_one_is_set(tmp_path: Path):
    (tmp_path / "api.token").write_text("s3cret\n")
    config = write_config(tmp_path, BODY)
    token_line = f'[api]\ntoken_file = "{tmp_path / "api.token"}"\n'
    config.write_text(config.read_text().replace("[api]\n", token_line))
    daemon = Daemon(config)
    await daemon.start()
    try:
        assert daemon.session is not None
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            async with daemon.session.get(f"{daemon.base}/metrics", headers=headers) as resp:
                assert resp.status == 401
                assert "lambdaemon_" not in await resp.text()
        m = await scrape(daemon, {"Authorization": "Bearer s3cret"})
        assert m.value("lambdaemon_invocations_running", function="echo") == 0
        assert m.labels("lambdaemon_workers", "function") == set()  # none started yet
    finally:
        await daemon.close()


async def test_metrics_scrape_is_consistent_under_load(tmp_path: Path):
    """Scrapes while calls run: every scrape parses, and counters never go down."""
    async with running_daemon(tmp_path, BODY) as daemon:
        calls = [asyncio.ensure_future(daemon.invoke("echo", {"n": n})) for n in range(40)]
        seen = 0.0
        while not all(call.done() for call in calls):
            m = await scrape(daemon)
            total = sum(s.value for s in m.samples if s.name == "lambdaemon_invocations_total")
            assert total >= seen
            seen = total
        assert {(await call)[0] for call in calls} == {200}
        m = await scrape(daemon)
        assert (
            m.value(
                "lambdaemon_invocations_total", function="echo", trigger="api", status="succeeded"
            )
            == 40
        )
        assert m.value("lambdaemon_max_workers") > 0


async def test_metrics_show_cron_fires_and_files_in_flight_and_waiting(tmp_path: Path):
    inbox, block = tmp_path / "inbox", Gate(shared_folder(tmp_path) / "block")
    holder = FUNCS.parent / "triggers" / "functions" / "files_block"
    body = (
        f'[functions.holder]\nhandler = "handler.handler"\ncode = "{holder}"\ntimeout_s = 60\n'
        f'env = {{ BLOCK_FILE = "{block.path}" }}\n'
        f'[[functions.holder.triggers]]\ntype = "files"\npath = "{inbox}"\n'
        f'[functions.echo]\nhandler = "handler.handler"\ncode = "{FUNCS / "echo"}"\n'
        '[[functions.echo.triggers]]\ntype = "cron"\nschedule = "* * * * * *"\n'
    )
    async with running_daemon(tmp_path, body) as daemon:
        fired = (await daemon.wait_log("cron_fired", trigger_id="echo#0"))[0]
        m = await scrape(daemon)
        last = m.value(
            "lambdaemon_cron_last_fire_timestamp_seconds", function="echo", trigger="echo#0"
        )
        assert last >= datetime.fromisoformat(fired["nominal"]).timestamp()
        assert m.value("lambdaemon_files_processing", folder=str(inbox)) == 0

        staging = tmp_path / "staging"
        staging.mkdir()
        for data in (b"first", b"second"):  # the second waits for its namesake in flight
            (staging / "same.txt").write_bytes(data)
            (staging / "same.txt").rename(inbox / "same.txt")
            event = "files_claimed" if data == b"first" else "files_deferred"
            await daemon.wait_log(event, name="same.txt")
        m = await scrape(daemon)
        assert m.value("lambdaemon_files_processing", folder=str(inbox)) == 1
        assert m.value("lambdaemon_files_pending", folder=str(inbox)) == 1
        block.release()
        await daemon.wait_log("invocation_finished", function="holder", count=2)

        async def done() -> Scrape | None:  # the file leaves .processing after its record
            m = await scrape(daemon)
            return m if m.value("lambdaemon_files_processing", folder=str(inbox)) == 0 else None

        m = await daemon.wait_for(done)
        assert m.value("lambdaemon_files_pending", folder=str(inbox)) == 0


async def test_metrics_show_whether_mqtt_is_connected(tmp_path: Path):
    with running_broker(tmp_path / "mosquitto") as broker:
        body = (
            f'[mqtt]\nurl = "{broker.url}"\nclient_id = "lambdaemon-metrics"\n'
            f'[functions.echo]\nhandler = "handler.handler"\ncode = "{FUNCS / "echo"}"\n'
            '[[functions.echo.triggers]]\ntype = "mqtt"\ntopic = "dev/#"\n'
        )
        async with running_daemon(tmp_path, body) as daemon:

            async def connected() -> bool:  # set once subscribed, just after mqtt_connected
                return (await scrape(daemon)).value("lambdaemon_mqtt_connected") == 1

            await daemon.wait_for(connected)
            mark = daemon.log_mark()
            broker.stop()
            await daemon.wait_log("mqtt_disconnected", since=mark)
            assert (await scrape(daemon)).value("lambdaemon_mqtt_connected") == 0
            broker.start()
            await daemon.wait_log("mqtt_connected", since=mark)
            await daemon.wait_for(connected)


def test_metrics_library_is_not_imported_until_the_first_scrape():
    """What the daemon imports to run leaves prometheus-client out (about 1.5 MB of RSS)."""
    probe = "import sys, daemon.cli, daemon.service; print('prometheus_client' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "False"
