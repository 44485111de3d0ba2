"""SVG files with the Open Clip Art Library's real metadata layout, for openclipart tests.

The RDF block mirrors the Debian package's files: a `cc:Work` with `dc:title`,
`dc:description`, `dc:subject/rdf:Bag/rdf:li` tags, and `cc:Agent` titles for the
creator, rights holder and publisher. Agents come *before* the work's own `dc:title`, so
code that takes the first `dc:title` in the document reads an author name and fails.
"""

from __future__ import annotations

import os
from pathlib import Path
from xml.sax.saxutils import escape

CREATOR = "Jane Doe"
PUBLISHER = "Open Clip Art Library"
MALFORMED_SVG = '<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"><g><rect></svg>\n'


def svg_document(
    title: str,
    tags: list[str] | tuple[str, ...] = (),
    *,
    creator: str = CREATOR,
    description: str = "",
    colour: str = "#c0392b",
    width: int = 80,
    height: int = 40,
    blank: bool = False,
) -> str:
    """A small SVG whose drawing is a coloured ellipse (or nothing visible when `blank`)."""
    items = "\n".join(f"            <rdf:li>{escape(tag)}</rdf:li>" for tag in tags)
    drawing = (
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>'
        if blank
        else f'<ellipse cx="{width / 2}" cy="{height / 2}" rx="{width / 2 - 2}" ry="{height / 2 - 2}" fill="{colour}"/>'
    )
    return f"""<?xml version="1.0" encoding="UTF-8" standalone="no"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
     xmlns:cc="http://web.resource.org/cc/" xmlns:dc="http://purl.org/dc/elements/1.1/"
     width="{width}" height="{height}" viewBox="0 0 {width} {height}">
  <title>svg-level title, not the work title</title>
  <metadata>
    <rdf:RDF>
      <cc:Work rdf:about="">
        <dc:creator>
          <cc:Agent>
            <dc:title>{escape(creator)}</dc:title>
          </cc:Agent>
        </dc:creator>
        <dc:publisher>
          <cc:Agent rdf:about="http://www.openclipart.org/">
            <dc:title>{PUBLISHER}</dc:title>
          </cc:Agent>
        </dc:publisher>
        <dc:title>{escape(title)}</dc:title>
        <dc:description>{escape(description)}</dc:description>
        <dc:subject>
          <rdf:Bag>
{items}
          </rdf:Bag>
        </dc:subject>
        <dc:rights>
          <cc:Agent>
            <dc:title>{escape(creator)}</dc:title>
          </cc:Agent>
        </dc:rights>
        <dc:format>image/svg+xml</dc:format>
      </cc:Work>
    </rdf:RDF>
  </metadata>
  {drawing}
</svg>
"""


def write_svg(root: Path, rel_path: str, title: str, tags=(), **kwargs) -> Path:
    path = Path(root) / rel_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(svg_document(title, tags, **kwargs), encoding="utf-8")
    return path


def link(root: Path, rel_link: str, rel_target: str) -> Path:
    """A relative symlink `rel_link` -> `rel_target`, as Debian ships them."""
    path = Path(root) / rel_link
    path.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(Path(root) / rel_target, path.parent)
    path.symlink_to(target)
    return path


# The tiny tree used by the build tests, with every count known by hand (DataConfig from
# `tiny_tree_config`: title cap 3, tag_min_ads 2, tag_max_ad_share 0.7, pair_min_ads 2):
#   - title group "cat" has 4 files -> cat_d (highest path) is capped away;
#   - "Clipart by Nicu Buculei - dog" strips to "dog", joining dog_a's group;
#   - food/broken.svg is malformed, shapes/blank.svg renders to an all-white image;
#   - people/pets/cat_link.svg is a symlink to animals/cats/cat_a.svg;
#   - tags: "Jane_Doe" (author), "Animals" and "fruit" (own folders) and "pets" (the
#     symlink's folder) are dropped; "common" is on 6 of 8 kept ads (> 70%) and dropped;
#     apple/cherry/vegetable/leaf are on 1 ad each (< 2) and dropped;
#   - vocabulary {cat, dog, pet, red}; pairs (cat, pet) on 3 ads and (dog, pet) on 2.
TINY_TREE = [
    # rel_path, title, tags
    ("animals/cats/cat_a.svg", "Cat", ["cat", "Pet", "Jane_Doe", "Animals", "pets", "common"]),
    ("animals/cats/cat_b.svg", "cat!", ["cat", "pet", "common"]),
    ("animals/cats/cat_c.svg", "  CAT  ", ["cat", " pet ", "common"]),
    ("animals/cats/cat_d.svg", "Cat.", ["cat", "pet", "leaf"]),
    ("animals/dogs/dog_a.svg", "Dog", ["dog", "pet", "common"]),
    ("animals/dogs/dog_b.svg", "Clipart by Nicu Buculei - dog", ["dog", "pet", "common"]),
    ("food/fruit/apple.svg", "Apple", ["apple", "red", "fruit", "common"]),
    ("food/fruit/cherry.svg", "Cherry", ["cherry", "red"]),
    ("food/vegetables/tomato.svg", "Tomato", ["red", "vegetable"]),
]
TINY_BLANK = "shapes/blank.svg"
TINY_MALFORMED = "food/broken.svg"
TINY_LINK = ("people/pets/cat_link.svg", "animals/cats/cat_a.svg")
TINY_EXPECTED_ADS = {
    "animals/cats/cat_a": "Cat",
    "animals/cats/cat_b": "cat!",
    "animals/cats/cat_c": "CAT",
    "animals/dogs/dog_a": "Dog",
    "animals/dogs/dog_b": "dog",
    "food/fruit/apple": "Apple",
    "food/fruit/cherry": "Cherry",
    "food/vegetables/tomato": "Tomato",
}
TINY_EXPECTED_VOCABULARY = ["cat", "dog", "pet", "red"]
TINY_EXPECTED_RELEVANT = {
    "cat": {"animals/cats/cat_a", "animals/cats/cat_b", "animals/cats/cat_c"},
    "dog": {"animals/dogs/dog_a", "animals/dogs/dog_b"},
    "pet": {
        "animals/cats/cat_a",
        "animals/cats/cat_b",
        "animals/cats/cat_c",
        "animals/dogs/dog_a",
        "animals/dogs/dog_b",
    },
    "red": {"food/fruit/apple", "food/fruit/cherry", "food/vegetables/tomato"},
    "cat pet": {"animals/cats/cat_a", "animals/cats/cat_b", "animals/cats/cat_c"},
    "dog pet": {"animals/dogs/dog_a", "animals/dogs/dog_b"},
}


def write_tiny_tree(root: Path) -> Path:
    """Write the tiny clip-art tree described above under `root` and return it."""
    root = Path(root)
    colours = [
        "#c0392b",
        "#2980b9",
        "#27ae60",
        "#8e44ad",
        "#f39c12",
        "#16a085",
        "#d35400",
        "#2c3e50",
        "#7f8c8d",
    ]
    for (rel_path, title, tags), colour in zip(TINY_TREE, colours, strict=True):
        write_svg(root, rel_path, title, tags, colour=colour)
    write_svg(root, TINY_BLANK, "Blank", ["red", "cat"], blank=True)
    (root / TINY_MALFORMED).write_text(MALFORMED_SVG)
    link(root, *TINY_LINK)
    return root
