"""What a newcomer meets on a fresh clone: every README / ARCHITECTURE command that needs no GPU
and no file of their own runs as written (at a few steps), `--set` parses alike everywhere, the
docs point at nothing outside the repository, the licence files ship, outputs are 0644."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "README.md", ROOT / "docs" / "ARCHITECTURE.md")

# Commands that cannot run here, each with the reason; every other command of the docs is run.
NOT_RUN = [
    (re.compile(r"^bash scripts/(demo|test)\.sh"), "set-up and the whole suite (the suite is this run)"),
    (re.compile(r"^(python3 -m venv|pip install|DS_BUILD_OPS=0 pip install)"), "installs packages"),
    (re.compile(r"\byour_"), "needs the user's own data"),
    (re.compile(r"\bcase\.zarr\b"), "needs a store prepared from the user's own data"),
    (re.compile(r"^(CONFIG=\S+ )?sbatch "), "needs SLURM: tests/test_slurm.py runs the sbatch script"),
    (re.compile(r"launch/train_prior\.py"), "needs the Colin27 volumes, which are not shipped"),
    (re.compile(r"napari"), "a viewer, not part of the engine"),
]
# Appended per launcher so each command runs in seconds; only the step count (and the 3D
# L1-wavelet comparison) change, never what the command exercises.
FEWER_STEPS = {
    "launch/recon2d.py": ["--set", "optim.steps=3"],
    "launch/recon3d.py": ["--set", "steps=3", "baseline.l1_wavelet_3d=false"],
}


def doc_commands() -> list[str]:
    """The shell commands of every ```bash block in the docs (continuations joined, comments cut),
    each once: a command shown in two places is one a reader runs once."""
    commands: list[str] = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.DOTALL):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
                line = " ".join(line.split())
                if line and line not in commands:
                    commands.append(line)
    return commands


def reason_not_run(command: str) -> str | None:
    return next((reason for pattern, reason in NOT_RUN if pattern.search(command)), None)


def fresh_copy(target: Path) -> Path:
    """The repository's files without anything a run or an install leaves behind."""
    ignore = shutil.ignore_patterns(".git", ".venv", "outputs", "runs", "__pycache__", "*.egg-info", "build",
                                    ".pytest_cache", "*.zarr")
    shutil.copytree(ROOT, target, ignore=ignore)
    return target


def runnable(command: str) -> list[str]:
    words = shlex.split(command)
    if words[0] == "python":
        words[0] = sys.executable  # this environment's interpreter: what `python` is once set up
    elif words[0] in ("torchrun", "mpiexec"):
        words[0] = str(Path(sys.executable).with_name(words[0]))
        words = [sys.executable if word == "python" else word for word in words]
    for script, extra in FEWER_STEPS.items():
        if script in words:
            if "--set" in words:  # the command's own overrides stay; the step count comes last
                words += extra[1:]
            else:
                words += extra
    return words


def test_the_docs_have_runnable_commands_and_every_skip_has_a_reason():
    commands = doc_commands()
    run = [c for c in commands if reason_not_run(c) is None]
    assert len(run) >= 6, run
    assert any("launch/recon2d.py" in c for c in run) and any("launch/recon3d.py" in c for c in run)
    assert any("launch/prepare.py --demo" in c for c in run)


@pytest.mark.slow  # about a minute on 2 shared cores: every runnable command, a few steps each
def test_every_runnable_doc_command_runs_as_written_on_a_fresh_copy(tmp_path):
    clone = fresh_copy(tmp_path / "clone")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)  # the copy's own engine, as on a fresh clone (launch/ puts it first)
    failures = []
    for command in doc_commands():
        if reason_not_run(command) is not None:
            continue
        done = subprocess.run(runnable(command), cwd=clone, env=env, capture_output=True, text=True,
                              timeout=600, check=False)
        if done.returncode != 0:
            failures.append(f"$ {command}\n(exit {done.returncode})\n{(done.stdout + done.stderr)[-2000:]}")
    assert not failures, "\n\n".join(failures)


def test_set_takes_several_overrides_in_every_launcher():
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import recon2d as recon2d_launcher
    finally:
        sys.path.remove(str(ROOT / "launch"))
    from engine.config import load_config
    from engine.recon.config3d import Recon3DConfig
    from engine.recon.fit2d import Recon2DConfig
    from launch.recon3d import build_parser as recon3d_parser

    args = recon2d_launcher.build_parser().parse_args(
        ["--out", "o", "--set", "optim.steps=400", "prior.every=2", "--set", "seed=1"])
    assert args.input is None and args.set == ["optim.steps=400", "prior.every=2", "seed=1"]
    config = load_config(Recon2DConfig, ROOT / "configs" / "demo2d.yaml", args.set)
    assert (config.optim.steps, config.prior.every, config.seed) == (400, 2, 1)
    args = recon3d_parser().parse_args(["--set", "steps=400", "prior.every=2"])
    config = load_config(Recon3DConfig, ROOT / "configs" / "demo3d.yaml", args.set)
    assert (config.steps, config.prior.every) == (400, 2)


def test_an_input_after_set_is_refused_with_a_hint(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "recon2d.py"), "--out", str(tmp_path / "o"),
                           "--set", "optim.steps=3", "case.npy"], capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert "override 'case.npy' must look like dotted.key=value (put positional arguments before --set)" \
        in done.stderr


def test_the_product_points_at_nothing_outside_the_repository():
    places = [*DOCS, *sorted((ROOT / "launch").rglob("*")), *sorted((ROOT / "engine").rglob("*"))]
    hits = []
    for path in places:
        if path.is_file() and path.suffix in (".md", ".py", ".json", ".yaml", ".sbatch", ".txt", ""):
            for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if re.search(r"shared/|DESIGN\.md", line):
                    hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_licence_and_colin27_notice_ship_beside_the_weights():
    assert "BSD 3-Clause License" in (ROOT / "LICENSE").read_text()
    notice = ROOT / "engine" / "assets" / "prior" / "colin27_COPYRIGHT.txt"
    assert notice.read_bytes() == (ROOT / "data" / "colin27_COPYRIGHT.txt").read_bytes()
    setup = (ROOT / "setup.py").read_text()
    assert '"engine.assets.prior": ["*"]' in setup and 'license_files=["LICENSE"]' in setup


def test_outputs_get_the_umask_mode_not_0600(tmp_path):
    from engine.evaluation.report import write_metrics_json

    previous = os.umask(0o022)
    try:
        path = write_metrics_json(tmp_path / "metrics.json", {"infusion": {"nrmse_percent": 1.0}})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(Path(path).stat().st_mode) == 0o644


def test_console_entry_points_name_the_launch_scripts():
    """Every console script of setup.py is a function of launch/<name>.py, and every launch script
    has one (so an installed engine offers the same commands as the repository)."""
    import importlib

    setup = (ROOT / "setup.py").read_text()
    entries = dict(re.findall(r'"infusion-([\w-]+) = (launch\.\w+:\w+)"', setup))
    scripts = sorted(p.stem for p in (ROOT / "launch").glob("*.py") if p.stem != "__init__")
    assert sorted(target.split(":")[0].split(".")[1] for target in entries.values()) == scripts
    for target in entries.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target
