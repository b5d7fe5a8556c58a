"""Data: every supported record format -> `Sample` -> chat-template ids + labels -> dataset items -> batches.

See `dataset/formats.py` (reading, normalising), `rendering.py` (rendering; `chat_templates.py` the layouts),
`images.py` (image/video loading), `dataset.py` (`VLMDataset`, skipping bad samples), `collator.py`,
`sampler.py`. The names below load on first use (PEP 562), so `import qwenvl_lab.dataset.sample` stays light for
converters and command-line `--help`.
"""

if not __package__.startswith("qwenvl_lab."):  # the old spelling: `python -m dataset...` from the checkout
    from qwenvl_lab._moved import refuse  # (absolute: this is not qwenvl_lab.*)

    refuse(__package__)

import importlib

_EXPORTS = {
    "Batch": ".collator", "Collator": ".collator",
    "VLMDataset": ".dataset",
    "DataFileError": ".formats", "normalize": ".formats", "read_records": ".formats",
    "image_size": ".images", "load_image": ".images", "load_video_frames": ".images",
    "BadSampleError": ".sample", "Sample": ".sample",
    "LengthGroupedSampler": ".sampler",
    "IGNORE_INDEX": ".rendering", "ChatFormat": ".rendering", "Rendered": ".rendering",
    "estimate_length": ".rendering", "render": ".rendering",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dataset' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
