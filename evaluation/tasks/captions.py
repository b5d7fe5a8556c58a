"""Caption benchmarks: COCO, NoCaps, Flickr30k (BLEU-4 and CIDEr; METEOR / SPICE where they can run).

Accepted released files (`--data`):
- COCO-style captions JSON (`captions_val2014.json`, NoCaps' `nocaps_val_4500_captions.json`):
  `{"images": [{"id", "file_name"[, "domain"]}], "annotations": [{"image_id", "caption"}]}`;
- Karpathy's split file (`dataset_coco.json`, `dataset_flickr30k.json`): `{"images": [{"filename",
  "filepath"?, "split", "sentences": [{"raw"}], "imgid"|"cocoid"}]}`, the images of `split` (default test);
- Flickr30k's `results_20130124.token`: lines `1000092795.jpg#0<TAB>caption`.
Images are found by file name in `--images` (default: the data file's folder). NoCaps' `domain`
(in-domain, near-domain, out-domain) gives a CIDEr per domain.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..items import BenchmarkFormatError, EvalItem, image_path, need, read_json
from ..metrics import caption_scores
from .common import CAPTION, Task


def _from_coco_json(doc: dict, where: str, folder: Path) -> list[EvalItem]:
    refs: dict = defaultdict(list)
    for i, a in enumerate(doc["annotations"]):
        need(a, ("image_id", "caption"), f"{where} annotation {i}")
        refs[a["image_id"]].append(a["caption"])
    items = []
    for i, im in enumerate(doc["images"]):
        need(im, ("id", "file_name"), f"{where} image {i}")
        cat = {"domain": im["domain"]} if "domain" in im else {}
        items.append(EvalItem(str(im["id"]), "", [image_path(folder, im["file_name"])],
                              refs.get(im["id"]) or None, cat))
    return items


def _from_karpathy(doc: dict, where: str, folder: Path, split: str) -> list[EvalItem]:
    items = []
    for i, im in enumerate(doc["images"]):
        need(im, ("filename", "sentences"), f"{where} image {i}")
        if im.get("split") != split:
            continue
        rel = f"{im['filepath']}/{im['filename']}" if im.get("filepath") else im["filename"]
        iid = im.get("cocoid", im.get("imgid", Path(im["filename"]).stem))
        refs = [s["raw"] for s in im["sentences"]]
        items.append(EvalItem(str(iid), "", [image_path(folder, rel)], refs, {}))
    if not items:
        raise BenchmarkFormatError(f"{where}: no image in split {split!r}")
    return items


def _from_token_file(path: Path, folder: Path) -> list[EvalItem]:
    refs: dict[str, list[str]] = defaultdict(list)
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line or "#" not in line.split("\t", 1)[0]:
            raise BenchmarkFormatError(f"{path}:{n}: expected 'image.jpg#k<TAB>caption'")
        key, caption = line.split("\t", 1)
        refs[key.rsplit("#", 1)[0]].append(caption.strip())
    return [EvalItem(Path(name).stem, "", [image_path(folder, name)], caps, {}) for name, caps in refs.items()]


def load_captions(data: str, images: str | None, options: dict) -> list[EvalItem]:
    p = Path(data)
    folder = Path(images) if images else p.parent
    if p.suffix == ".token":
        if not p.is_file():
            raise BenchmarkFormatError(f"{p}: file not found")
        return _from_token_file(p, folder)
    doc = read_json(p)
    if isinstance(doc, dict) and "annotations" in doc and "images" in doc:
        return _from_coco_json(doc, str(p), folder)
    if isinstance(doc, dict) and "images" in doc:
        return _from_karpathy(doc, str(p), folder, options.get("split") or "test")
    raise BenchmarkFormatError(f"{p}: neither a COCO captions JSON (images + annotations) nor a Karpathy split "
                               f"file (images with sentences)")


def score_captions(items: list[EvalItem], answers: dict[str, str]) -> dict:
    scored = [it for it in items if it.id in answers and it.target]
    if not scored:
        return {"metrics": {}, "categories": {}, "n_scored": 0}
    metrics = caption_scores({it.id: answers[it.id] for it in scored}, {it.id: it.target for it in scored})
    cats: dict = {}
    domains: dict[str, list[EvalItem]] = defaultdict(list)
    for it in scored:
        if "domain" in it.category:
            domains[it.category["domain"]].append(it)
    if domains:  # one score per domain, each over its own images (CIDEr's document frequencies too)
        cats["domain"] = {
            d: {"n": len(its), **caption_scores({i.id: answers[i.id] for i in its}, {i.id: i.target for i in its},
                                                 meteor=False, spice=False)}
            for d, its in sorted(domains.items())
        }
    return {"metrics": metrics, "categories": cats, "n_scored": len(scored)}


TASKS = {
    name: Task(name, load_captions, score_captions, CAPTION, kind="caption", max_new_tokens=48,
               main_metric="CIDEr", about=f"{label} captions (BLEU-4, CIDEr)")
    for name, label in (("coco", "COCO"), ("nocaps", "NoCaps"), ("flickr30k", "Flickr30k"))
}
