"""The systemd user unit and the launchd agent start the daemon in the foreground."""

from __future__ import annotations

import configparser
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGING = Path(__file__).resolve().parents[2] / "packaging"
UNIT = PACKAGING / "rwkv-chat.service"
PLIST = PACKAGING / "io.github.rwkv-chat.daemon.plist"
COMMAND = ["rwkv-chat", "daemon", "start", "--foreground"]


def test_launchd_plist():
    with open(PLIST, "rb") as f:
        plist = plistlib.load(f)
    assert plist["Label"] == "io.github.rwkv-chat.daemon"
    args = plist["ProgramArguments"]
    assert Path(args[0]).name == "rwkv-chat" and args[1:] == COMMAND[1:]
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] == {"SuccessfulExit": False}


def _unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None, strict=True)
    cp.optionxform = str
    cp.read_string(UNIT.read_text())
    return cp


def test_systemd_unit_sections():
    cp = _unit()
    assert set(cp.sections()) == {"Unit", "Service", "Install"}
    svc = cp["Service"]
    exe, *args = svc["ExecStart"].split()
    assert Path(exe).name == "rwkv-chat" and args == COMMAND[1:]
    assert svc["Type"] == "simple" and svc["Restart"] == "on-failure"
    assert svc["RestartPreventExitStatus"] == "3"          # "already running" is not a crash
    assert cp["Install"]["WantedBy"] == "default.target"


def test_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (the unit's sections are checked by the test above)")
    exe = Path(sys.executable).with_name("rwkv-chat")
    if not exe.exists():
        pytest.skip(f"{exe} is not installed (pip install -e .)")
    unit = tmp_path / "rwkv-chat.service"
    unit.write_text(UNIT.read_text().replace("%h/.local/bin/rwkv-chat", str(exe)))
    r = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "bad" / "rwkv-chat.service"          # the check can fail: a missing executable
    bad.parent.mkdir()
    bad.write_text(UNIT.read_text().replace("%h/.local/bin/rwkv-chat", "/nonexistent/rwkv-chat"))
    assert subprocess.run([tool, "verify", str(bad)], capture_output=True, timeout=60).returncode != 0
