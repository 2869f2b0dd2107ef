import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_broken_dependency_fails_the_import_loudly(tmp_path):
    """`import minillama` must not hide a broken dependency (it once swallowed ImportError from checkpoint and
    tokenizer, leaving a package without load/save that failed later and obscurely)."""
    fake = tmp_path / "safetensors"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('simulated broken safetensors')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    result = subprocess.run([sys.executable, "-c", "import minillama"], env=env, capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert "simulated broken safetensors" in result.stderr

