"""Data: every supported record format -> `Sample` -> chat-template ids + labels -> dataset items -> batches.

See `dataset/formats.py` (reading, normalising), `template.py` (rendering; `chat_templates.py` the layouts), `images.py` (image/video
loading), `dataset.py` (`VLMDataset`, skipping bad samples), `collator.py`, `sampler.py`.
"""

from dataset.collator import Batch, Collator
from dataset.dataset import VLMDataset
from dataset.formats import DataFileError, normalize, read_records
from dataset.images import load_image, load_video_frames
from dataset.sample import BadSampleError, Sample
from dataset.sampler import LengthGroupedSampler
from dataset.template import IGNORE_INDEX, ChatFormat, Rendered, estimate_length, render

__all__ = [
    "Sample", "BadSampleError", "DataFileError", "read_records", "normalize", "render", "Rendered",
    "estimate_length", "IGNORE_INDEX", "ChatFormat", "load_image", "load_video_frames", "VLMDataset", "Collator", "Batch",
    "LengthGroupedSampler",
]
