"""The Python code in README.md and docs/*.md runs as written, so the docs cannot rot.

Every fenced block tagged ``python`` (or ``py``) is one of three kinds, told by its first line:

* ``# fragment: <why>``: a piece of a larger program, shown for its shape. Not run, but it must compile.
  Use it only for code that cannot run on its own in seconds on a CPU, and say why.
* ``# run: torchrun --nproc_per_node N ...``: a multi-process program. Run under torchrun with N CPU processes
  (gloo, no GPU visible). The harness ends each process with ``os._exit(0)`` after the block has returned:
  gloo's worker threads can abort a finished process at interpreter shutdown (docs/distributed.md, "Rules").
  An exception in the block still fails the run.
* anything else: a complete program, run as ``python block.py`` in a fresh process and an empty directory
  (on CPU; a block may pick CUDA itself when a GPU is visible).

A block passes if it exits with status 0 within its time limit. Untagged fences (shell, pseudo-code,
directory listings) are not Python and are not read.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON_TAGS = {"python", "py"}
FRAGMENT = re.compile(r"#\s*fragment:\s*(\S.*)")
TORCHRUN = re.compile(r"#\s*run:\s*torchrun\s+--nproc_per_node[ =](\d+)\b")
FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)\s*$")

# Runs a block as __main__, then leaves without interpreter shutdown (see the module docstring). An exception
# propagates out of run_path: Python prints it and exits with status 1 before os._exit is reached.
RUNNER = """\
import os, runpy, sys
runpy.run_path(sys.argv[1], run_name="__main__")
print("doc block finished", flush=True)
sys.stderr.flush()
os._exit(0)
"""


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def first_line(self) -> str:
        return self.code.lstrip("\n").splitlines()[0].strip() if self.code.strip() else ""

    @property
    def fragment_reason(self) -> str | None:
        match = FRAGMENT.fullmatch(self.first_line)
        return match.group(1) if match else None

    @property
    def nproc(self) -> int | None:
        match = TORCHRUN.match(self.first_line)
        return int(match.group(1)) if match else None


def extract_blocks(path: Path) -> list[Block]:
    """Fenced code blocks of a Markdown file, in order; an unclosed fence is an error."""
    blocks: list[Block] = []
    fence = None  # (backticks, lang, opening line number, lines so far) while inside a block
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        match = FENCE.match(line)
        if fence is None:
            if match:
                fence = (match.group(1), match.group(2).lower(), number, [])
        elif match and match.group(1) == fence[0] and not match.group(2):
            blocks.append(Block(path, fence[2], fence[1], "\n".join(fence[3]) + "\n"))
            fence = None
        else:
            fence[3].append(line)
    if fence is not None:
        raise ValueError(f"{path.relative_to(ROOT)}:{fence[2]}: code fence never closed")
    return blocks


def python_blocks() -> list[Block]:
    return [b for path in DOC_FILES for b in extract_blocks(path) if b.lang in PYTHON_TAGS]


BLOCKS = python_blocks()
RUNNABLE = [b for b in BLOCKS if b.fragment_reason is None]


def run_block(block: Block, workdir: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    source = workdir / "doc_block.py"
    source.write_text(block.code)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if block.nproc is None:
        cmd = [sys.executable, str(source)]
    else:
        (workdir / "run_doc_block.py").write_text(RUNNER)
        env.update(GLOO_SOCKET_IFNAME="lo", CUDA_VISIBLE_DEVICES="")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(block.nproc),
               str(workdir / "run_doc_block.py"), str(source)]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


def test_blocks_found_and_classified() -> None:
    """The extraction sees the blocks (so an empty parametrisation cannot pass silently), every block compiles,
    every fragment says why, and each documentation file has runnable code."""
    assert ROOT / "docs" / "distributed.md" in DOC_FILES
    for path in DOC_FILES:
        assert any(b.path == path for b in RUNNABLE), f"{path.relative_to(ROOT)}: no runnable Python block found"
    for block in BLOCKS:
        compile(block.code, block.name, "exec")  # a SyntaxError names the block
        marked = block.fragment_reason is not None or block.nproc is not None
        if not marked and block.first_line.lstrip("# ").startswith(("fragment", "run:")):
            pytest.fail(f"{block.name}: malformed marker line {block.first_line!r} (see tests/test_docs.py)")
    assert any(b.nproc for b in RUNNABLE), "the torchrun blocks of docs/distributed.md were not recognised"


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.name for b in RUNNABLE])
def test_doc_block_runs(block: Block, tmp_path: Path) -> None:
    done = run_block(block, tmp_path)
    assert done.returncode == 0, f"{block.name} failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    if block.nproc is not None:
        # every process reached the end of the block (the RUNNER's line), not just torchrun's exit status
        assert done.stdout.count("doc block finished") == block.nproc, done.stdout + done.stderr


def test_harness_fails_a_raising_block(tmp_path: Path) -> None:
    """A block that raises fails, directly and through the torchrun RUNNER (without torchrun: one process)."""
    raising = Block(ROOT / "README.md", 0, "python", "import torch\nraise RuntimeError('doc block broke')\n")
    done = run_block(raising, tmp_path)
    assert done.returncode != 0 and "doc block broke" in done.stderr
    (tmp_path / "run_doc_block.py").write_text(RUNNER)
    done = subprocess.run([sys.executable, str(tmp_path / "run_doc_block.py"), str(tmp_path / "doc_block.py")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "doc block broke" in done.stderr
    assert "doc block finished" not in done.stdout


def test_markers_are_read() -> None:
    fragment = Block(ROOT / "README.md", 0, "python", "# fragment: continues the block above\nacc.step()\n")
    torchrun = Block(ROOT / "README.md", 0, "python", "# run: torchrun --nproc_per_node 3 this_file.py\npass\n")
    plain = Block(ROOT / "README.md", 0, "python", "import torch\n")
    assert fragment.fragment_reason == "continues the block above" and fragment.nproc is None
    assert torchrun.nproc == 3 and torchrun.fragment_reason is None
    assert plain.nproc is None and plain.fragment_reason is None
    fenced = extract_blocks(ROOT / "README.md")
    assert [b for b in fenced if b.lang == "python"] and any(b.lang == "bash" for b in fenced)
