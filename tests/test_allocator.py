"""The allocator setting of the difftime command (difftime.allocator)."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")

# In a fresh process: 256 blocks of 1 MiB from malloc (which torch's CPU tensors use), written, then
# freed; prints whether the setting was applied and the resident MiB before, at the peak and after.
PROBE = """
import ctypes, sys
from difftime.allocator import retain_freed_memory
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
before = rss_mib()
blocks = [libc.malloc(1 << 20) for _ in range(256)]
for block in blocks:
    ctypes.memset(block, 1, 1 << 20)
peak = rss_mib()
for block in blocks:
    libc.free(block)
print(applied, before, peak, rss_mib())
"""


def _probe(mode: str, env: dict | None = None) -> tuple[bool, float, float, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})}).stdout.split()
    return out[0] == "True", *map(float, out[1:])


def test_freed_memory_stays_in_the_process_only_with_the_setting():
    applied, before, peak, after = _probe("retain")
    assert applied and peak - before > 200
    assert after > peak - 16  # kept for the next network call
    applied, before, peak, after = _probe("system")
    assert not applied and peak - before > 200
    assert after < before + 64  # glibc's default gives it back to the kernel


def test_the_environment_keeps_the_c_library_defaults():
    applied, before, peak, after = _probe("retain", {"DIFFTIME_MALLOC": "system"})
    assert not applied and after < before + 64


def test_the_command_applies_it(monkeypatch):
    import difftime.cli as cli

    calls = []
    monkeypatch.setattr(cli, "retain_freed_memory", lambda: calls.append(True) or True)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert calls == [True]
