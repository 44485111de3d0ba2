"""A COCO-style (title-less) dataset from a built openclipart dataset: for the plug-in claim.

The issue's COCO target ("`implicit_fusion_words` beats `implicit_fusion` on recall@10 on
COCO-style data") needs a set where ads have no title and each caption names one image. No
COCO images exist on this machine, so this writes a Karpathy-layout captions file over the
openclipart images instead:

- every image keeps its split;
- it has up to two captions, each relevant to that one image only: its title, and its tag
  words (the words of the queries with a positive qrel for it in its own split, in first-seen
  order). One tag caption per image rather than one per tag: a caption such as "bird" alone
  would name dozens of test images while counting one of them relevant;
- `alignsearch data build --source coco` then makes ads with empty titles.

    .venv/bin/python infra/coco_style_openclipart.py data/openclipart /tmp/openclipart-coco.json
    .venv/bin/alignsearch data build --source coco --captions /tmp/openclipart-coco.json \
        --images data/openclipart --out data/openclipart-coco

Training captions are what the alignment learns from (ad-level text, docs/method.md#what-the-alignment-may-see);
validation and test captions are only ever queries.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from components.data.format import read_dataset


def captions_by_image(dataset_dir: Path) -> dict:
    dataset = read_dataset(dataset_dir)
    positives = dataset.qrels[dataset.qrels["relevance"] > 0].merge(dataset.queries[["query_id", "text"]],
                                                                     on="query_id")
    positives = positives.sort_values(["ad_id", "query_id"])
    tags = positives.groupby("ad_id")["text"].apply(
        lambda s: " ".join(dict.fromkeys(w for t in s for w in str(t).split()))).to_dict()
    images = []
    for i, ad in enumerate(dataset.ads.itertuples()):
        title = str(ad.title or "").strip()
        sentences = [t for t in dict.fromkeys([title, tags.get(ad.ad_id, "")]) if t]
        if sentences:
            images.append({"imgid": i, "filename": str(ad.image_path), "split": str(ad.split),
                           "sentences": [{"raw": s} for s in sentences]})
    return {"images": images}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="a built openclipart dataset directory")
    parser.add_argument("out", type=Path, help="the captions JSON to write")
    args = parser.parse_args()
    payload = captions_by_image(args.data)
    args.out.write_text(json.dumps(payload, indent=0) + "\n")
    captions = sum(len(image["sentences"]) for image in payload["images"])
    print(f"{args.out}: {len(payload['images'])} images, {captions} captions")


if __name__ == "__main__":
    main()
