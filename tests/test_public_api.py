"""Every public name the README shows imports; the pure geometry and the imaging package need no torch."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_public_import_the_readme_shows_works():
    statements = re.findall(r"^\s*(from (?:dragonfly_med|training|app)[\w.]* import [\w, ]+)$", README.read_text(), re.M)
    assert any("from dragonfly_med import" in s for s in statements), "the README shows the top-level import"
    for statement in statements:
        exec(statement, {})  # noqa: S102 - the README's own lines


def test_top_level_exports_are_the_loader_and_the_chat_engine():
    from dragonfly_med import ChatEngine, load_model
    from dragonfly_med.chat import ChatEngine as engine_class
    from dragonfly_med.checkpoints.loading import load_model as loader

    assert (load_model, ChatEngine) == (loader, engine_class)


def test_geometry_imports_without_torch():
    code = "import sys, dragonfly_med.model.geometry; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_imaging_imports_without_torch():
    modules = "dragonfly_med.imaging.ingest, dragonfly_med.imaging.series, dragonfly_med.imaging.deid"
    code = f"import sys, {modules}; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
