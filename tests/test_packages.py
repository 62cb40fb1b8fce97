"""Deployment packages: real zip files checked and unpacked, folders zipped, real pip runs
offline from a wheelhouse made here, and the garbage they leave collected."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import stat
import struct
import time
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon import packages, zips
from daemon.packages import (
    MAX_UNZIPPED_BYTES,
    MAX_ZIP_BYTES,
    PackageError,
    build_environment,
    collect_garbage,
    store_package,
    zip_folder,
)
from daemon.zips import MAX_ENTRIES
from tests.waits import until_changed
from tests.wheels import pinme_wheelhouse

Entry = tuple[str, bytes] | tuple[str, bytes, int]


def zip_of(*entries: Entry, method: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip of (name, data[, st_mode]) entries, written as given: names are not cleaned up."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of duplicate names; some tests want them
        with zipfile.ZipFile(buffer, "w") as archive:
            for name, data, *mode in entries:
                info = zipfile.ZipInfo(name)
                info.compress_type = method
                if mode:
                    info.external_attr = mode[0] << 16
                archive.writestr(info, data)
    return buffer.getvalue()


def link(name: str, target: str) -> Entry:
    return (name, target.encode(), stat.S_IFLNK | 0o777)


def refused(data: bytes, data_dir: Path, **limits: int) -> PackageError:
    """The PackageError `data` is refused with; nothing may be left under data_dir/code."""
    with pytest.raises(PackageError) as caught:
        store_package(data, data_dir, **limits)
    code = data_dir / "code"
    assert not code.exists() or os.listdir(code) == []
    return caught.value


def invalid(data: bytes, data_dir: Path, **limits: int) -> str:
    error = refused(data, data_dir, **limits)
    assert (error.code, error.status) == ("InvalidParameterValueException", 400)
    return error.message


# --- unpacking ---------------------------------------------------------------------------------


def test_store_package_unpacks_under_the_zips_digest(tmp_path: Path) -> None:
    data = zip_of(
        ("handler.py", b"def handler(event, context):\n    return 1\n"),
        ("lib/", b"", stat.S_IFDIR | 0o700),
        ("lib/util.py", b"X = 1\n", stat.S_IFREG | 0o600),
        ("./bin//tool", b"#!/bin/sh\necho hi\n", stat.S_IFREG | 0o4755),  # setuid dropped
        ("empty/", b""),
    )
    package = store_package(data, tmp_path)
    digest = hashlib.sha256(data).digest()
    assert package.sha256 == base64.b64encode(digest).decode() and len(package.sha256) == 44
    assert package.digest == digest.hex() and package.size == len(data)
    assert package.path == tmp_path / "code" / digest.hex()
    assert (package.path / "handler.py").read_bytes().startswith(b"def handler")
    assert (package.path / "lib" / "util.py").read_text() == "X = 1\n"
    assert stat.S_IMODE((package.path / "bin" / "tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((package.path / "lib" / "util.py").stat().st_mode) == 0o644
    assert stat.S_IMODE((package.path / "lib").stat().st_mode) == 0o755
    assert (package.path / "empty").is_dir()
    assert sorted(os.listdir(tmp_path / "code")) == [package.digest]  # no temporary folder left


def test_store_package_syncs_file_by_file_without_syncfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(packages, "_syncfs", None)
    data = zip_of(("handler.py", b"x = 1\n"), ("lib/a.py", b"a"), link("b.py", "lib/a.py"))
    package = store_package(data, tmp_path)
    assert (package.path / "b.py").read_text() == "a"


def test_store_package_twice_keeps_the_first_folder(tmp_path: Path) -> None:
    data = zip_of(("handler.py", b"x = 1\n"))
    first = store_package(data, tmp_path)
    (first.path / "marker").write_text("the same folder")
    again = store_package(data, tmp_path)
    assert again == first
    assert (again.path / "marker").read_text() == "the same folder"
    assert os.listdir(tmp_path / "code") == [first.digest]


def test_store_package_of_the_same_zip_at_once_gives_one_folder(tmp_path: Path) -> None:
    data = zip_of(*[(f"m{n}.py", os.urandom(4096)) for n in range(200)])
    with ThreadPoolExecutor(4) as threads:
        packages = list(threads.map(lambda _: store_package(data, tmp_path), range(4)))
    assert len(set(packages)) == 1
    assert os.listdir(tmp_path / "code") == [packages[0].digest]
    assert len(os.listdir(packages[0].path)) == 200


def test_store_package_keeps_a_symlink_that_stays_inside(tmp_path: Path) -> None:
    data = zip_of(
        ("lib/util.py", b"X = 1\n"),
        link("util.py", "lib/util.py"),
        link("lib/self", "."),
        link("lib/up", "../lib"),
    )
    package = store_package(data, tmp_path)
    assert os.readlink(package.path / "util.py") == "lib/util.py"
    assert (package.path / "util.py").read_text() == "X = 1\n"
    assert (package.path / "lib" / "up" / "util.py").read_text() == "X = 1\n"


# --- refusals ----------------------------------------------------------------------------------


def test_store_package_refuses_a_zip_over_the_upload_limit(tmp_path: Path) -> None:
    error = refused(b"\0" * (MAX_ZIP_BYTES + 1), tmp_path)
    assert (error.code, error.status) == ("RequestTooLargeException", 413)
    assert error.message == (
        f"Zipped size must be smaller than {MAX_ZIP_BYTES} bytes: "
        f"the zip is {MAX_ZIP_BYTES + 1} bytes"
    )


def test_store_package_refuses_what_is_not_a_zip(tmp_path: Path) -> None:
    message = invalid(b"just some text", tmp_path)
    assert message == "Could not unzip uploaded file: File is not a zip file"
    truncated = zip_of(("handler.py", b"x = 1\n" * 100))[:-30]
    assert invalid(truncated, tmp_path).startswith("Could not unzip uploaded file: ")


def test_store_package_refuses_a_crc_error_and_leaves_no_folder(tmp_path: Path) -> None:
    data = bytearray(zip_of(("a.py", b"A = 1\n"), ("b.py", b"hello world\n"), method=0))
    at = data.index(b"hello world")
    data[at] ^= 0xFF
    message = invalid(bytes(data), tmp_path)  # a.py was written before b.py failed: all gone
    assert message == "Could not unzip uploaded file: Bad CRC-32 for file 'b.py'"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("/etc/cron.d/evil", "has an absolute path"),
        ("\\windows\\evil", "has an absolute path"),
        ("../evil.py", "has a '..' component"),
        ("lib/../../evil.py", "has a '..' component"),
        ("lib\\..\\..\\evil.py", "has a '..' component"),
        ("C:/evil.py", "starts with a drive letter"),
        ("c:evil.py", "starts with a drive letter"),
    ],
)
def test_store_package_refuses_a_path_that_climbs_out(
    tmp_path: Path, name: str, reason: str
) -> None:
    data = zip_of(("handler.py", b""), (name, b"evil"))
    assert invalid(data, tmp_path) == f"entry {name!r} {reason}"


def test_store_package_refuses_a_name_the_file_system_cannot_take(tmp_path: Path) -> None:
    name = "x" * 300 + ".py"
    assert invalid(zip_of((name, b"")), tmp_path) == f"entry {name!r}: File name too long"


def test_store_package_refuses_a_name_with_a_nul(tmp_path: Path) -> None:
    data = zip_of(("evil.py@/../../x", b"evil")).replace(b"@", b"\0")
    assert invalid(data, tmp_path) == "entry 'evil.py\\x00/../../x' contains a NUL character"


@pytest.mark.parametrize(
    ("links", "message"),
    [
        ([link("etc", "/etc")], "symlink 'etc' points to an absolute path '/etc'"),
        ([link("up", "..")], "symlink 'up' points outside the package: '..'"),
        ([link("lib/out", "../../x")], "symlink 'lib/out' points outside the package: '../../x'"),
        # each link alone stays inside; followed through the first, the second leads out
        (
            [link("x/b", ".."), link("c", "x/b/..")],
            "symlink 'c' points outside the package: 'x/b/..'",
        ),
    ],
)
def test_store_package_refuses_a_symlink_that_leads_out(
    tmp_path: Path, links: list[Entry], message: str
) -> None:
    assert invalid(zip_of(("handler.py", b""), *links), tmp_path) == message


def test_store_package_refuses_to_write_through_a_symlink(tmp_path: Path) -> None:
    data = zip_of(("lib/a.py", b""), link("d", "lib"), ("d/evil.py", b"evil"))
    assert invalid(data, tmp_path) == "entry 'd/evil.py' is inside 'd', which is a link"


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([("a.py", b"1"), ("a.py", b"2")], "entry 'a.py' collides with an earlier entry"),
        ([("a.py", b"1"), ("./a.py", b"2")], "entry './a.py' collides with an earlier entry"),
        ([("lib/x.py", b""), ("lib", b"")], "entry 'lib' collides with an earlier entry"),
        ([("lib", b""), ("lib/x.py", b"")], "entry 'lib/x.py' is inside 'lib', which is a file"),
    ],
)
def test_store_package_refuses_colliding_entries(
    tmp_path: Path, entries: list[Entry], message: str
) -> None:
    assert invalid(zip_of(*entries), tmp_path) == message


def test_store_package_accepts_a_folder_named_twice(tmp_path: Path) -> None:
    package = store_package(zip_of(("lib/", b""), ("lib/x.py", b"1"), ("lib/", b"")), tmp_path)
    assert (package.path / "lib" / "x.py").read_text() == "1"


def test_store_package_refuses_a_zip_over_the_unzipped_limit(tmp_path: Path) -> None:
    data = zip_of(*[(f"f{n}", b"\0" * 1000) for n in range(3)])
    assert invalid(data, tmp_path, max_unzipped_bytes=2500) == (
        "Unzipped size must be smaller than 2500 bytes: the zip holds 3000 or more"
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("zeros.bin", "w") as zeros:
            for _ in range(MAX_UNZIPPED_BYTES // 1024 // 1024):
                zeros.write(bytes(1024 * 1024))
            zeros.write(bytes(MAX_UNZIPPED_BYTES % (1024 * 1024) + 1))
    big = buffer.getvalue()
    assert len(big) < MAX_ZIP_BYTES
    assert invalid(big, tmp_path) == (
        f"Unzipped size must be smaller than {MAX_UNZIPPED_BYTES} bytes: "
        f"the zip holds {MAX_UNZIPPED_BYTES + 1} or more"
    )


def test_store_package_stops_a_bomb_that_lies_about_its_sizes(tmp_path: Path) -> None:
    # The central directory says 10 bytes each; the data inflates to 4 MB each. Extraction
    # stops at the declared size, and the bytes past it fail the entry's CRC.
    honest = zip_of(("bomb0", b"\0" * 4_000_000), ("bomb1", b"\0" * 4_000_000))
    data = bytearray(honest)
    central = data.index(b"PK\x01\x02")
    while central >= 0:
        struct.pack_into("<I", data, central + 24, 10)  # uncompressed size
        central = data.find(b"PK\x01\x02", central + 4)
    message = invalid(bytes(data), tmp_path, max_unzipped_bytes=1_000_000)
    assert message == "Could not unzip uploaded file: Bad CRC-32 for file 'bomb0'"


def test_store_package_refuses_too_many_entries(tmp_path: Path) -> None:
    data = zip_of(*[(f"f{n}", b"") for n in range(MAX_ENTRIES + 1)], method=zipfile.ZIP_STORED)
    assert invalid(data, tmp_path) == f"the zip has more than {MAX_ENTRIES} entries"
    exactly = zip_of(*[(f"f{n}", b"") for n in range(MAX_ENTRIES)], method=zipfile.ZIP_STORED)
    zips.count_entries(exactly)  # the bound itself is allowed


def test_store_package_refuses_what_lambda_cannot_unzip(tmp_path: Path) -> None:
    bzip2 = zip_of(("a.py", b"x = 1\n"), method=zipfile.ZIP_BZIP2)
    assert invalid(bzip2, tmp_path) == (
        "Could not unzip uploaded file: entry 'a.py' uses compression method 12; "
        "only stored and deflated entries are supported"
    )
    encrypted = bytearray(zip_of(("a.py", b"x = 1\n")))
    encrypted[encrypted.index(b"PK\x01\x02") + 8] |= 0x1  # the central directory's flag bits
    assert invalid(bytes(encrypted), tmp_path) == (
        "Could not unzip uploaded file: entry 'a.py' is encrypted"
    )


# --- zipping a folder --------------------------------------------------------------------------


def code_folder(path: Path) -> Path:
    (path / "lib").mkdir(parents=True)
    (path / "handler.py").write_text("def handler(event, context):\n    return 1\n")
    (path / "lib" / "util.py").write_text("X = 1\n")
    (path / "run.sh").write_text("#!/bin/sh\n")
    (path / "run.sh").chmod(0o755)
    (path / "empty").mkdir()
    for skipped in ("__pycache__/handler.cpython-311.pyc", ".git/HEAD", ".venv/pyvenv.cfg"):
        (path / skipped).parent.mkdir(parents=True, exist_ok=True)
        (path / skipped).write_text("skipped")
    (path / "lib" / "old.pyc").write_bytes(b"skipped")
    (path / "util.py").symlink_to("lib/util.py")
    return path


def test_zip_folder_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    folder = code_folder(tmp_path / "fn")
    data = zip_folder(folder)
    later = time.time() + 3600
    for path in (folder / "handler.py", folder / "lib" / "util.py", folder / "lib"):
        os.utime(path, (later, later))
    assert zip_folder(folder) == data
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert names == ["empty/", "handler.py", "lib/", "lib/util.py", "run.sh", "util.py"]
    package = store_package(data, tmp_path / "data")
    assert (package.path / "handler.py").read_text() == (folder / "handler.py").read_text()
    assert stat.S_IMODE((package.path / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((package.path / "handler.py").stat().st_mode) == 0o644
    assert os.readlink(package.path / "util.py") == "lib/util.py"
    (folder / "handler.py").write_text("changed")
    assert zip_folder(folder) != data


def test_zip_folder_refuses_a_symlink_that_leads_out(tmp_path: Path) -> None:
    folder = code_folder(tmp_path / "fn")
    (folder / "secrets").symlink_to(tmp_path)
    with pytest.raises(ValueError) as caught:
        zip_folder(folder)
    assert (
        str(caught.value)
        == f"{folder}/secrets is a symlink to {str(tmp_path)!r}, which is outside {folder}"
    )


# --- dependencies ------------------------------------------------------------------------------


def pinned(path: Path, requirement: str) -> Path:
    path.mkdir(parents=True)
    (path / "handler.py").write_text("import pinme\n")
    (path / "requirements.txt").write_text(f"{requirement}\n")
    return path


async def test_build_environment_installs_each_pin_in_its_own_folder(tmp_path: Path) -> None:
    wheelhouse = pinme_wheelhouse(tmp_path / "wheels")
    data = tmp_path / "data"
    with capture_logs() as logs:
        one = await build_environment(pinned(tmp_path / "one", "pinme==1.0"), data, wheelhouse)
        two = await build_environment(pinned(tmp_path / "two", "pinme==2.0"), data, wheelhouse)
        again = pinned(tmp_path / "again", "pinme==1.0")
        async with asyncio.timeout(0.5):  # the folder is there already, and pip does not run
            assert await build_environment(again, data, None) == one
    built = [entry["path"] for entry in logs if entry["event"] == "environment_built"]
    assert built == [str(one), str(two)]
    assert one is not None and two is not None and one != two
    assert one.parent == two.parent == data / "envs"
    assert (one / "pinme" / "__init__.py").read_text() == 'VERSION = "1.0"\n'
    assert (two / "pinme" / "__init__.py").read_text() == 'VERSION = "2.0"\n'
    assert sorted(os.listdir(data / "envs")) == sorted([one.name, two.name])


async def test_build_environment_without_requirements_is_none(tmp_path: Path) -> None:
    (tmp_path / "code").mkdir()
    assert await build_environment(tmp_path / "code", tmp_path / "data", None) is None
    assert not (tmp_path / "data").exists()


async def test_build_environment_reports_what_pip_said(tmp_path: Path) -> None:
    wheelhouse = pinme_wheelhouse(tmp_path / "wheels")
    code = pinned(tmp_path / "code", "pinme==3.0")
    with pytest.raises(PackageError) as caught:
        await build_environment(code, tmp_path / "data", wheelhouse)
    error = caught.value
    assert (error.code, error.status) == ("InvalidParameterValueException", 400)
    # the wheelhouse alone: not the find-links of this machine's pip configuration, if any
    assert error.message.startswith(
        f"pip could not install requirements.txt: Looking in links: {wheelhouse}\n"
    )
    assert "No matching distribution found for pinme==3.0" in error.message
    assert "from versions: 1.0, 2.0" in error.message
    assert len(error.message.splitlines()) <= 20
    assert os.listdir(tmp_path / "data" / "envs") == []


async def test_build_environment_stops_pip_at_its_timeout(tmp_path: Path) -> None:
    code = pinned(tmp_path / "code", "pinme==1.0")
    wheelhouse = pinme_wheelhouse(tmp_path / "wheels")
    with pytest.raises(PackageError) as caught:
        await build_environment(code, tmp_path / "data", wheelhouse, timeout_s=0.05)
    assert caught.value.message.startswith(
        "pip could not install requirements.txt: it ran for over 0.05 s and was stopped"
    )
    assert os.listdir(tmp_path / "data" / "envs") == []


async def test_build_environment_twice_at_once_gives_one_folder(tmp_path: Path) -> None:
    wheelhouse = pinme_wheelhouse(tmp_path / "wheels")
    codes = [pinned(tmp_path / f"code{n}", "pinme==2.0") for n in range(2)]
    data = tmp_path / "data"
    built = await asyncio.gather(*[build_environment(code, data, wheelhouse) for code in codes])
    assert built[0] is not None and built[0] == built[1]
    assert os.listdir(data / "envs") == [built[0].name]
    assert (built[0] / "pinme" / "__init__.py").read_text() == 'VERSION = "2.0"\n'


# --- garbage -----------------------------------------------------------------------------------


def test_collect_garbage_removes_what_is_not_kept(tmp_path: Path) -> None:
    data = tmp_path / "data"
    kept = store_package(zip_of(("a.py", b"a")), data).path
    dropped = store_package(zip_of(("b.py", b"b")), data).path
    env = data / "envs" / "e1"
    old_env = data / "envs" / "e2"
    crashed = data / "code" / ".tmp-0123456789abcdef"
    for folder in (env, old_env, crashed):
        folder.mkdir(parents=True)
        (folder / "f").write_text("x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    (data / "code" / "stray").symlink_to(outside)
    removed = collect_garbage(data, [kept, env])
    assert sorted(removed) == sorted([dropped, crashed, data / "code" / "stray", old_env])
    assert sorted(os.listdir(data / "code")) == [kept.name]
    assert os.listdir(data / "envs") == ["e1"]
    assert (outside / "precious").read_text() == "keep me"


async def test_collect_garbage_spares_a_build_under_way(tmp_path: Path) -> None:
    wheelhouse = pinme_wheelhouse(tmp_path / "wheels")
    data = tmp_path / "data"
    crashed = data / "envs" / ".tmp-left-by-a-crash"
    crashed.mkdir(parents=True)
    build = asyncio.create_task(
        build_environment(pinned(tmp_path / "code", "pinme==1.0"), data, wheelhouse)
    )

    def building() -> list[str]:
        return [name for name in os.listdir(data / "envs") if name != crashed.name]

    await until_changed(data / "envs", building, what="pip's temporary folder")
    removed = await asyncio.to_thread(collect_garbage, data, [], min_age_s=3600)
    assert removed == [crashed]
    env = await build
    assert env is not None and (env / "pinme" / "__init__.py").is_file()


def test_collect_garbage_spares_what_is_new(tmp_path: Path) -> None:
    package = store_package(zip_of(("a.py", b"a")), tmp_path)
    assert collect_garbage(tmp_path, [], min_age_s=3600) == []
    assert collect_garbage(tmp_path, []) == [package.path]
    assert collect_garbage(tmp_path / "nothing-here", []) == []
