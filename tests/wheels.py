"""Wheels made by hand for the dependency tests: pip installs them offline from a folder."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path


def make_wheel(wheelhouse: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A pure-Python wheel `<name>-<version>-py3-none-any.whl` in `wheelhouse` holding `files`
    (path -> text), with the METADATA, WHEEL and RECORD that pip reads."""
    info = f"{name}-{version}.dist-info"
    contents = {path: text.encode() for path, text in files.items()}
    contents[f"{info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    )
    contents[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: lambdaemon-tests\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n"
    )
    record = [f"{path},sha256={_digest(data)},{len(data)}" for path, data in contents.items()]
    contents[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,", ""]).encode()
    wheelhouse.mkdir(parents=True, exist_ok=True)
    path = wheelhouse / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for member, data in contents.items():
            wheel.writestr(member, data)
    return path


def pinme_wheelhouse(folder: Path) -> Path:
    """A wheelhouse with pinme 1.0 and 2.0, each knowing its own VERSION."""
    for version in ("1.0", "2.0"):
        make_wheel(folder, "pinme", version, {"pinme/__init__.py": f'VERSION = "{version}"\n'})
    return folder


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
