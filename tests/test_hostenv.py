"""The restart that turns on glibc's transparent-huge-page malloc."""

import os
import subprocess
import sys

import pytest

from xfusion_jax import hostenv


@pytest.fixture(name="thp_file")
def fixture_thp_file(tmp_path, monkeypatch):
  path = tmp_path / "enabled"
  monkeypatch.setattr(hostenv, "_THP_MODE", str(path))
  monkeypatch.setattr(hostenv, "_glibc_has_tunable", lambda: True)
  monkeypatch.setattr(sys, "platform", "linux")
  return path


def test_environment_adds_tunable(thp_file):
  thp_file.write_text("always [madvise] never\n")
  assert hostenv.hugepage_environment({"A": "1"}) == {
      "A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  environ = hostenv.hugepage_environment(
      {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert environ["GLIBC_TUNABLES"] == (
      "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")


@pytest.mark.parametrize("mode,environ", [
    ("[always] madvise never", {}),
    ("always madvise [never]", {}),
    ("always [madvise] never", {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}),
    ("always [madvise] never", {hostenv.OPT_OUT: "0"}),
    ("always [madvise] never", {hostenv.OPT_OUT: "False"}),
    ("always [madvise] never", {hostenv.OPT_OUT: "off"}),
])
def test_environment_unchanged(thp_file, mode, environ):
  thp_file.write_text(mode + "\n")
  assert hostenv.hugepage_environment(environ) is None


def test_missing_thp_file_changes_nothing(thp_file):
  del thp_file
  assert hostenv.hugepage_environment({}) is None


_CHILD = """
import ctypes, os, re
from xfusion_jax import hostenv
hostenv.restart_with_hugepage_malloc()
# Plain malloc, as XLA allocates (numpy would madvise by itself).
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 256 * 2**20
block = libc.malloc(ctypes.c_size_t(size))
ctypes.memset(block, 1, size)  # fault the pages in
with open("/proc/self/smaps_rollup") as f:
  huge = int(re.search(r"AnonHugePages:\\s+(\\d+) kB", f.read()).group(1))
print(os.environ.get("GLIBC_TUNABLES"), huge)
"""


def test_restart_gives_huge_pages():
  """A restarted process gets the tunable, and malloc then uses huge pages."""
  environ = {k: v for k, v in os.environ.items()
             if k not in ("GLIBC_TUNABLES", hostenv.OPT_OUT)}
  expected = hostenv.hugepage_environment(environ)
  if expected is None:
    pytest.skip("this machine's glibc or kernel gives no huge pages to malloc")
  output = subprocess.run([sys.executable, "-c", _CHILD], env=environ,
                          check=True, capture_output=True, text=True).stdout
  tunables, huge_kib = output.split()
  assert tunables == expected["GLIBC_TUNABLES"]
  # Most of the 256 MiB block sits in 2 MiB pages; without the tunable the
  # kernel gives none in madvise mode.
  assert int(huge_kib) >= 128 * 1024

  environ[hostenv.OPT_OUT] = "0"
  output = subprocess.run([sys.executable, "-c", _CHILD], env=environ,
                          check=True, capture_output=True, text=True).stdout
  tunables, huge_kib = output.split()
  assert tunables == "None"
  assert int(huge_kib) < 128 * 1024


def test_stdin_script_not_restarted(tmp_path):
  """A script piped to `python -` runs once, unrestarted, to the end."""
  environ = {k: v for k, v in os.environ.items()
             if k not in ("GLIBC_TUNABLES", hostenv.OPT_OUT)}
  script = ("from xfusion_jax import hostenv\n"
            "hostenv.restart_with_hugepage_malloc()\n"
            "print('reached')\n")
  result = subprocess.run([sys.executable, "-"], input=script, env=environ,
                          cwd=tmp_path, check=True, capture_output=True,
                          text=True)
  assert result.stdout == "reached\n"
