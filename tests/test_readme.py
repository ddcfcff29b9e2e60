"""The README's Python examples run as written (torch ones only where torch is)."""
import os
import re

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def test_readme_python_examples_run(tmp_path, monkeypatch):
    with open(README, encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)          # examples write net.npz / net.onnx here
    namespace = {}
    ran = 0
    for i, block in enumerate(blocks):
        if "import torch" in block:
            try:
                import torch  # noqa: F401  (only: is it there?)
            except ImportError:
                print(f"README block {i} needs torch: skipped")
                continue
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        ran += 1
    assert ran >= len(blocks) - 1
    assert os.path.exists("net.onnx")
