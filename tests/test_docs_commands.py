"""Every ``python -m`` command in a shell block of README.md and docs/ composes: it runs as the
page writes it, with ``--cfg job`` appended, and Hydra prints its config instead of an error
(an unknown key, a config group option that does not exist, an override Hydra cannot parse).

A command is read the way a shell reads it: continuation lines joined, ``#`` comments dropped,
quotes removed, ``$VARS`` expanded; a ``ray job submit ... -- python -m ...`` line is the
command after ``--``. A bare ``...`` argument stands for "the arguments shown above" and is left
out. A command that reads what an earlier one wrote (``--config-dir`` of a sweep's
``best.yaml``) reads a stand-in there: the tune config resolved as ``ray_jobs.tune`` writes it.
The module runs in this process (``runpy``, as ``python -m`` runs it), so a page's commands cost
seconds, not a Python start-up each.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_FENCES = {"bash", "sh", "shell", "console", ""}
NOT_HYDRA = {"ray_jobs.track"}  # argparse entrypoints: no --cfg


def shell_blocks(text: str) -> list[str]:
    """The contents of the page's fenced shell blocks (```bash, ```sh, ``` with no language)."""
    blocks: list[str] = []
    lines: list[str] = []
    shell: bool | None = None  # None: outside a block; else whether the open block is shell
    for line in text.splitlines():
        fence = re.match(r"^\s*```(\S*)", line)
        if fence is None:
            if shell:
                lines.append(line)
        elif shell is None:
            shell, lines = fence.group(1) in SHELL_FENCES, []
        else:
            if shell:
                blocks.append("\n".join(lines))
            shell = None
    return blocks


def python_commands(block: str) -> list[tuple[str, list[str]]]:
    """``(module, arguments)`` of every ``python -m module ...`` in a shell block."""
    found = []
    for line in re.sub(r"\\\n", " ", block).splitlines():
        if "python -m " not in line:  # (a block without a language may hold other text)
            continue
        tokens = [os.path.expandvars(t) for t in shlex.split(line, comments=True)]
        for i, token in enumerate(tokens[:-2]):
            if token.endswith("python") and tokens[i + 1] == "-m":
                found.append((tokens[i + 2], [t for t in tokens[i + 3 :] if t != "..."]))
                break
    return found


def documented_commands() -> list[tuple[str, str, list[str]]]:
    return [
        (str(page.relative_to(REPO)), module, args)
        for page in PAGES
        for block in shell_blocks(page.read_text())
        for module, args in python_commands(block)
    ]


COMMANDS = documented_commands()


def test_the_pages_show_commands_of_every_entrypoint():
    modules = {module for _, module, _ in COMMANDS}
    assert {"ray_jobs.train", "ray_jobs.preprocess", "ray_jobs.evaluate"} <= modules
    assert {"ray_jobs.experiments", "ray_jobs.synthetic", "federated.simulate"} <= modules
    mimic = [args for page, _, args in COMMANDS if page == "docs/mimic.md"]
    assert len(mimic) >= 10, mimic


def _best_yaml_stand_in(folder: Path) -> Path:
    """``folder/best.yaml`` as ``ray_jobs.tune`` writes it: the tune config of a sweep, resolved,
    without its ``tune`` section."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        resolved = OmegaConf.to_container(
            compose("tune", overrides=["task=mortality"]), resolve=True
        )
    assert isinstance(resolved, dict)
    resolved.pop("tune")
    (folder / "best.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    return folder


HYDRA_COMMANDS = [command for command in COMMANDS if command[1] not in NOT_HYDRA]


@pytest.mark.parametrize(
    ("page", "module", "args"),
    HYDRA_COMMANDS,
    ids=[f"{page}:{module}:{' '.join(args)[:60]}" for page, module, args in HYDRA_COMMANDS],
)
def test_a_documented_command_composes(page, module, args, monkeypatch, tmp_path):
    if "--config-dir" in args:
        at = args.index("--config-dir") + 1
        args = [*args[:at], str(_best_yaml_stand_in(tmp_path)), *args[at + 1 :]]
    monkeypatch.setattr(sys, "argv", [module, *args, "--cfg", "job"])
    monkeypatch.delitem(sys.modules, module, raising=False)  # runs afresh, as python -m does
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exit_:
            code = exit_.code
    assert code in (0, None), f"{page}: python -m {module} {' '.join(args)}\n{err.getvalue()}"
    assert out.getvalue().strip(), f"{page}: python -m {module} printed no config"
