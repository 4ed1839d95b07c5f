"""The README only names what exists: every repository path it mentions is there, and every figure it quotes
comes with a committed result file."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
ROOTS = ("lum_dist/", "launch/", "configs/", "benchmarks/", "kernels/", "tests/", ".ci/")
SOURCE = re.compile(r"`([^`\s]+)`")  # code spans without spaces
BARE = re.compile(r"(?<![\w/.-])((?:lum_dist|launch|configs|benchmarks|kernels|tests)/[\w./{},*-]+)")


def expand(path: str) -> list[str]:
    """``a/{x,y}-{1,2}.py`` -> the four paths (the README's shorthand for families of files)."""
    parts = re.split(r"\{([^}]*)\}", path)
    literals, choices = parts[::2], [p.split(",") for p in parts[1::2]]
    return ["".join(x for pair in itertools.zip_longest(literals, combo, fillvalue="") for x in pair)
            for combo in itertools.product(*choices)] if choices else [path]


def named_paths() -> set[str]:
    found = set()
    for text in SOURCE.findall(README) + BARE.findall(README):
        text = text.split("::")[0].split(":")[0].rstrip(".,;)")
        if text.startswith(ROOTS) and "<" not in text and "$" not in text:
            found.update(expand(text))
    return found


def test_every_path_the_readme_names_exists():
    paths = named_paths()
    assert len(paths) > 40  # the README names the code it describes
    missing = sorted(p for p in paths if not any(REPO.glob(p.rstrip("/"))))
    assert not missing, f"README names paths that do not exist: {missing}"


def test_the_results_section_points_at_committed_result_files():
    section = README.split("## Results on this project's CPU machine", 1)[1].split("\n## ", 1)[0]
    files = [p for p in named_paths() if p.startswith("benchmarks/results/") and p in section]
    assert files, "the results section must point at the files its figures come from"
    for f in files:
        assert any(REPO.glob(f)), f
