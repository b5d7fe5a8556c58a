"""Data: every supported record format -> `Sample` -> chat-template ids + labels -> dataset items -> batches.

See `dataset/formats.py` (reading, normalising), `template.py` (rendering; `chat_templates.py` the layouts),
`images.py` (image/video loading), `dataset.py` (`VLMDataset`, skipping bad samples), `collator.py`,
`sampler.py`. The names below load on first use (PEP 562), so `import dataset.sample` stays light for
converters and command-line `--help`.
"""

import importlib

_EXPORTS = {
    "Batch": "dataset.collator", "Collator": "dataset.collator",
    "VLMDataset": "dataset.dataset",
    "DataFileError": "dataset.formats", "normalize": "dataset.formats", "read_records": "dataset.formats",
    "load_image": "dataset.images", "load_video_frames": "dataset.images",
    "BadSampleError": "dataset.sample", "Sample": "dataset.sample", "UserError": "dataset.sample",
    "LengthGroupedSampler": "dataset.sampler",
    "IGNORE_INDEX": "dataset.template", "ChatFormat": "dataset.template", "Rendered": "dataset.template",
    "estimate_length": "dataset.template", "render": "dataset.template",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dataset' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
