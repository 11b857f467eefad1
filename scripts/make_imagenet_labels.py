"""Regenerate iotoffload/data/imagenet_labels.txt from a timm wheel (Apache-2.0).

pip download --no-deps -d /tmp/timm timm
python scripts/make_imagenet_labels.py /tmp/timm/timm-*.whl
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).parents[1] / "iotoffload" / "data" / "imagenet_labels.txt"


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as z:
        synsets = z.read("timm/data/_info/imagenet_synsets.txt").decode().split()
        lemmas = dict(
            line.split("\t", 1)
            for line in z.read("timm/data/_info/imagenet_synset_to_lemma.txt").decode().splitlines()
        )
    OUT.write_text("\n".join(lemmas[s] for s in synsets) + "\n")
    print(f"wrote {len(synsets)} labels to {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
