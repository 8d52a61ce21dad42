"""`python -m ray_jobs.synthetic`: the synthetic cohort alone, written once, then reused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dipro import vocab
from dipro.data.layout import format_counts, read_manifest

# A tiny cohort: 12 patients, 32-pixel CXRs, 8-pixel crops.
TINY = (
    "data.generator.num_patients=12",
    "data.generator.image_size=32",
    "data.generator.crop_size=8",
)


def test_writes_the_three_tasks_then_reuses_them(
    entrypoint, tree_checksums, tmp_path: Path
) -> None:
    root = tmp_path / "cohort"
    code, err = entrypoint("ray_jobs.synthetic", f"data.root={root}", *TINY)
    assert code == 0, err
    manifests = {task: read_manifest(root, task) for task in vocab.TASKS}
    assert all(m.generator["num_patients"] == 12 for m in manifests.values())
    assert f"synthetic cohort under {root}: wrote {', '.join(vocab.TASKS)} in " in entrypoint.stdout
    assert format_counts(manifests) in entrypoint.stdout  # samples per task, split and hospital
    written = tree_checksums(root)

    code, err = entrypoint("ray_jobs.synthetic", f"data.root={root}", *TINY)
    assert code == 0, err
    assert f"synthetic cohort under {root}: reused" in entrypoint.stdout
    assert format_counts(manifests) in entrypoint.stdout
    assert tree_checksums(root) == written

    # Another generator config over it: refused, nothing changed, unless data.overwrite=true.
    other = "data.generator.seed=1"
    code, err = entrypoint("ray_jobs.synthetic", f"data.root={root}", *TINY, other)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("data error:") and "data.overwrite=true" in err[0]
    assert tree_checksums(root) == written


def test_a_generator_setting_out_of_range_is_a_configuration_error(
    entrypoint, tmp_path: Path
) -> None:
    root = tmp_path / "cohort"
    no_patients = "data.generator.num_patients=0"
    code, err = entrypoint("ray_jobs.synthetic", f"data.root={root}", no_patients)
    assert code == 2
    assert err == [
        "configuration error: data.generator: invalid SyntheticConfig: num_patients and "
        "num_hospitals must be at least 1"
    ]
    assert not root.exists()


def test_it_needs_no_ray() -> None:
    """Importing the command loads neither Ray nor the training code."""
    code = (
        "import sys, ray_jobs.synthetic; "
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray_jobs.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['ray_jobs.synthetic']"
