"""The service unit: hardened enough to score "OK", and consistent with the daemon's settings."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from daemon.config import DaemonSettings

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "lambdaemon.service"


def test_systemd_unit_security_score_is_ok():
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is part of Debian's systemd package"
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


def test_systemd_unit_contract():
    unit = UNIT.read_text()
    settings = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#")
    )
    assert settings["Type"] == "notify"
    assert settings["RestartPreventExitStatus"].split() == ["65", "78"]  # config, data
    assert settings["Restart"] == "on-failure"
    assert "LoadCredential" in settings and "StateDirectory" in settings
    stop_s = int(settings["TimeoutStopSec"].rstrip("s"))
    assert stop_s > DaemonSettings().shutdown_timeout_s
    # 1024 (systemd's default) runs out under a thousand idle connections
    assert int(settings["LimitNOFILE"]) >= 65536
