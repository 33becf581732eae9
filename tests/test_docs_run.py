"""Every example of README.md and docs/ runs as written, so the docs cannot drift.

Each ```python block runs in a fresh interpreter, each ```sh block in bash
(``-euo pipefail``, kvpoll's venv first on PATH), both in an empty directory;
each ```toml block that is a kvpoll configuration is read with ``load_config``
(keys, transport names, option names and types). A block that cannot run here
says so just above its fence, with the reason, and is listed by this test:

    <!-- docs-run: skip: needs two hosts -->

``kvpoll config show``'s sample in docs/configuration.md is checked against
the real output for the page's own file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted(
    str(p.relative_to(ROOT)) for p in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
)
FENCE = re.compile(  # fences inside list items are indented: the block is dedented
    r"(?:<!--\s*docs-run:\s*skip:\s*(?P<why>[^>]*?)\s*-->\s*\n)?"
    r"^(?P<indent>[ ]*)```(?P<lang>[a-z]*)\n(?P<code>.*?)^(?P=indent)```",
    re.S | re.M,
)
RUN = ("python", "sh", "toml")
# README.md must open with its two set-up commands, with nothing before them
SKIP = {("README.md", 0): "the set-up commands: CI runs them, and make test is this suite"}


def blocks() -> list[object]:
    out: list[object] = []
    for page in PAGES:
        text = (ROOT / page).read_text()
        for i, found in enumerate(FENCE.finditer(text)):
            lang, why = found["lang"], found["why"] or SKIP.get((page, i))
            if lang not in RUN:
                continue
            marks = [pytest.mark.skip(reason=f"the page says: {why}")] if why else []
            code = textwrap.dedent(found["code"])
            out.append(pytest.param(lang, code, id=f"{page}:{i}:{lang}", marks=marks))
    return out


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    env.pop("KVPOLL_CONFIG", None)
    return env


@pytest.mark.parametrize(("lang", "code"), blocks())
def test_the_example_runs(lang: str, code: str, tmp_path: Path) -> None:
    if lang == "toml":
        if "[project" in code:  # a packaging example, not a kvpoll configuration
            import tomllib

            tomllib.loads(code)
            return
        from kvpoll.config import load_config

        path = tmp_path / "kvpoll.toml"
        path.write_text(code)
        load_config(path, environ={})
        return
    script = tmp_path / ("example.py" if lang == "python" else "example.sh")
    script.write_text(code)
    command = (
        [sys.executable, str(script)]
        if lang == "python"
        else ["bash", "-euo", "pipefail", str(script)]
    )
    out = subprocess.run(
        command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=180, check=False
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]


def test_every_page_with_code_runs_some() -> None:
    ran = {str(p.id).split(":")[0] for p in blocks() if not p.marks}  # type: ignore[attr-defined]
    for page in ("README.md", "docs/transfers.md", "docs/memory.md", "docs/configuration.md"):
        assert page in ran


def test_config_show_sample_matches_the_real_output(tmp_path: Path) -> None:
    text = (ROOT / "docs/configuration.md").read_text()
    toml = re.search(r"```toml\n(.*?)```", text, re.S)
    sample = re.search(r"```\n(\$ .*?)```", text, re.S)
    assert toml
    assert sample
    (tmp_path / "cluster.toml").write_text(toml.group(1))
    command, *expected = sample.group(1).splitlines()
    out = subprocess.run(
        ["bash", "-c", command.removeprefix("$ ")],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    real = out.stdout.splitlines()
    at = 0
    for line in expected:  # the sample's lines, in order ("..." stands for lines left out)
        if line.strip() == "...":
            continue
        assert line in real[at:], f"{line!r} is not in the output (after line {at}):\n{out.stdout}"
        at = real.index(line, at) + 1
