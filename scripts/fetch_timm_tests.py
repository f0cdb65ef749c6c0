"""Fetch timm's own model tests for ``tests/test_timm_conformance.py``: ``tests/test_models.py`` from the source
distribution of the *installed* timm version, into ``.timm-tests/timm-VERSION/`` (ignored by git).

timm's test file is not ours to copy into this repository, so, like every other dependency, it comes from PyPI at
install time (``make setup``), through pip. Already there → nothing to do. No network or no tests in the sdist → one
line saying so and exit 0: the conformance tests then skip with that reason rather than break the install.

Usage: python scripts/fetch_timm_tests.py [DEST_ROOT]   (default: .timm-tests next to this repository's Makefile)
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

FILES = ("tests/test_models.py",)


def destination(root: Path, version: str) -> Path:
    return root / f"timm-{version}"


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent / ".timm-tests"
    version = importlib.metadata.version("timm")
    dest = destination(root, version)
    if all((dest / f).is_file() for f in FILES):
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", f"timm=={version}", "--no-binary", ":all:", "--no-deps"]
        done = subprocess.run([*pip, "--quiet", "--dest", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        sdists = sorted(Path(tmp).glob("timm-*.tar.gz"))
        if done.returncode or not sdists:
            reason = (done.stderr.decode(errors="replace").strip().splitlines() or ["no sdist"])[-1]
            print(f"timm {version} tests: could not download the sdist ({reason}); conformance tests will skip")
            return 0
        with tarfile.open(sdists[0]) as tar:
            members = {m.name.split("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
            missing = [f for f in FILES if f not in members]
            if missing:
                print(f"timm {version} sdist ships no {', '.join(missing)}; conformance tests will skip")
                return 0
            for name in FILES:
                target = dest / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(members[name]).read())
    print(f"timm {version} tests: {', '.join(FILES)} → {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
