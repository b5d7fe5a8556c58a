"""The project's one import name.

The code lives in the checkout's top-level folders (`model/`, `dataset/`, `trainer/`, ...); installed, they are
the subpackages `qwenvl_lab.model`, `qwenvl_lab.dataset`, ... and nothing else is added to the top-level
import names (pyproject.toml maps the folders). Run from the checkout without installing (`python train.py`,
or `PYTHONPATH=. python -m qwenvl_lab.evaluation ...`), this folder stands for the package: its path is
extended to the checkout's root, so `qwenvl_lab.model` is `model/`.

    from qwenvl_lab.model import VLM
    vlm = VLM.from_pretrained("runs/demo/stage2/final")
"""

import os as _os

_HERE = _os.path.dirname(_os.path.abspath(__file__))
if not _os.path.isdir(_os.path.join(_HERE, "model")):  # the checkout (an installed wheel holds model/ here)
    __path__.append(_os.path.dirname(_HERE))  # noqa: F821 (a package's __path__)
