"""The launch recipes in scripts/ parse (bash -n, YAML) and pass `python -m train` only flags,
config keys and LOOM_* variables that exist."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from configs.base import get_config
from configs.loader import flat_items
from train import distributed

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
SHELL = sorted(SCRIPTS.glob("*.sh")) + sorted(SCRIPTS.glob("*.sbatch"))
MANIFESTS = sorted(SCRIPTS.glob("*.yaml"))
# the launch recipes (gpu_benchmark.sh runs train.benchmark, tested in test_perf.py)
RECIPES = [p for p in SHELL + MANIFESTS if p.name != "gpu_benchmark.sh"]


def _train_flags():
    """Options of `python -m train`, read from its --help."""
    text = subprocess.run([sys.executable, "-m", "train", "--help"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", text.split("config overrides")[0]))


def _commands(path):
    """The argument lists that follow `python -m train` in a script or manifest."""
    if path.suffix == ".yaml":
        found = []
        for doc in yaml.safe_load_all(path.read_text()):
            for job in doc["spec"]["replicatedJobs"]:
                for c in job["template"]["spec"]["template"]["spec"]["containers"]:
                    assert c["command"][:3] == ["python", "-m", "train"], c["command"]
                    found.append(c["command"][3:])
        text = path.read_text()
    else:
        found, text = [], path.read_text()
    joined = re.sub(r"\\\n\s*#?", " ", text)   # continuation lines, commented or not
    for line in joined.splitlines():
        for tail in re.findall(r"python -m train (.*)", line):
            found.append(tail.split())
    return found


def test_scripts_parse():
    assert SHELL and MANIFESTS
    for path in SHELL:
        out = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert out.returncode == 0, f"{path.name}: {out.stderr}"
    for path in MANIFESTS:
        assert [doc["kind"] for doc in yaml.safe_load_all(path.read_text())] == ["JobSet"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_scripts_use_only_existing_flags_keys_and_variables(path):
    flags, keys = _train_flags(), {k for k, _ in flat_items(get_config())}
    commands = _commands(path)
    assert commands, f"{path.name} runs no python -m train"
    for args in commands:
        for arg in args:
            arg = arg.strip("\"'")
            if arg.startswith("--config."):
                key = arg[len("--config."):].split("=")[0]
                assert key in keys, f"{path.name}: unknown config key {key}"
            elif arg.startswith("--") and not arg.startswith("--config"):
                assert arg.split("=")[0] in flags, f"{path.name}: python -m train has no {arg}"
    for var in set(re.findall(r"\bLOOM_[A-Z_]+", path.read_text())):
        assert var in distributed.ENV.values(), f"{path.name}: Loom reads no {var}"
