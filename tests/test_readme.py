"""The README's example runs as written."""

import re
from pathlib import Path


def test_readme_example_runs():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)
    assert code, "README has no python example"
    namespace: dict = {}
    exec(compile(code[0], "README.md", "exec"), namespace)  # noqa: S102 - our own README
    history = namespace["result"].history
    assert history[-1]["upper_loss"] < history[0]["upper_loss"]
