"""FoL's published recalls, to set beside a benchmark's: R@1/5/10 of global retrieval and of
re-ranking per dataset row, for each backbone and image size the original README reports.

Source: the "Performance" tables of github.com/chenshunpeng/FoL's README.md at commit
e930a760507bcda6aba65960d0253e0583f53977 ("All results are reported for ViT-L at 504x504" and
"Additional Results at 322x322", ViT-L and ViT-B). Row names are the README's, spelled as in
:mod:`.registry` (``<kbd>SF-XL</kbd>-testv1`` -> ``SF-XL-testv1``; the 322 table's
``Pitts30k-test`` -> ``Pitts30k``; ``Sped`` -> ``SPED``; ``Amstertime`` -> ``AmsterTime``).
"""
from __future__ import annotations

Recalls = tuple[float, float, float]  # R@1, R@5, R@10 in percent

SOURCE = (
    "github.com/chenshunpeng/FoL README.md, Performance tables "
    "(commit e930a760507bcda6aba65960d0253e0583f53977)"
)
PUBLISHED_RECALL_VALUES = (1, 5, 10)

# (backbone, (H, W)) -> row label -> (global, re-ranked)
PUBLISHED: dict[tuple[str, tuple[int, int]], dict[str, tuple[Recalls, Recalls]]] = {
    ("vitl", (504, 504)): {
        "Pitts250k": ((96.5, 99.1, 99.5), (97.0, 99.2, 99.5)),
        "MSLS-val": ((93.1, 96.9, 97.4), (93.5, 96.9, 97.6)),
        "MSLS-challenge": ((78.7, 90.8, 93.0), (80.0, 90.9, 93.0)),
        "Tokyo24/7": ((96.2, 98.7, 98.7), (98.4, 99.1, 99.4)),
        "Pitts30k": ((93.9, 97.2, 98.1), (94.5, 97.4, 98.2)),
        "SPED": ((92.1, 96.5, 98.0), (91.8, 96.5, 97.4)),
        "AmsterTime": ((64.6, 84.3, 88.2), (70.1, 89.0, 91.8)),
        "Eynsham": ((91.7, 95.3, 96.2), (92.4, 95.8, 96.6)),
        "Nordland*": ((78.3, 90.8, 94.0), (85.8, 94.9, 96.8)),
        "Nordland**": ((87.8, 94.5, 96.4), (92.6, 96.9, 98.0)),
        "SF-XL-testv1": ((91.5, 94.8, 95.6), (95.0, 96.5, 96.8)),
        "SF-XL-testv2": ((95.0, 98.0, 98.3), (95.0, 97.8, 98.5)),
        "SF-XL-night": ((53.4, 65.9, 71.7), (60.5, 72.8, 75.8)),
        "SF-XL-occlusion": ((51.3, 65.8, 73.7), (61.8, 77.6, 77.6)),
        "SVOX": ((98.4, 99.4, 99.6), (98.9, 99.6, 99.7)),
        "SVOX-sun": ((98.1, 99.4, 99.5), (98.8, 99.8, 99.9)),
        "SVOX-night": ((98.3, 99.6, 99.6), (98.8, 99.8, 99.9)),
        "SVOX-snow": ((99.1, 99.7, 99.8), (99.3, 99.8, 99.9)),
        "SVOX-overcast": ((97.9, 99.2, 99.3), (98.3, 99.3, 99.7)),
        "SVOX-rain": ((96.5, 99.6, 99.7), (98.2, 99.9, 99.9)),
    },
    ("vitl", (322, 322)): {
        "Pitts30k": ((93.6, 96.9, 97.9), (93.9, 96.9, 98.1)),
        "MSLS-val": ((92.8, 96.9, 97.2), (90.1, 95.7, 96.9)),
        "Nordland**": ((83.8, 92.6, 95.1), (87.9, 94.8, 96.6)),
        "Tokyo24/7": ((96.5, 98.1, 98.4), (97.1, 97.8, 98.7)),
        "Nordland*": ((74.1, 88.8, 92.2), (80.8, 92.0, 94.7)),
        "Eynsham": ((91.5, 95.1, 96.1), (91.7, 95.4, 96.4)),
        "SF-XL-testv1": ((90.4, 93.8, 94.7), (93.4, 95.6, 96.1)),
        "SF-XL-testv2": ((94.1, 98.2, 98.5), (93.5, 97.7, 98.5)),
        "SF-XL-night": ((53.4, 67.0, 70.2), (56.0, 70.0, 75.8)),
        "SF-XL-occlusion": ((44.7, 67.1, 71.1), (51.3, 72.4, 78.9)),
        "SVOX": ((98.3, 99.4, 99.6), (98.7, 99.5, 99.7)),
        "SVOX-night": ((98.4, 99.5, 99.8), (98.2, 99.6, 99.9)),
        "SVOX-overcast": ((97.7, 99.2, 99.4), (98.2, 99.4, 99.7)),
        "SVOX-rain": ((97.4, 99.6, 99.6), (98.6, 99.7, 99.8)),
        "SVOX-snow": ((98.3, 99.7, 99.8), (98.7, 99.5, 99.8)),
        "SVOX-sun": ((97.8, 99.4, 99.6), (97.9, 99.4, 99.5)),
    },
    ("vitb", (322, 322)): {
        "Pitts30k": ((92.1, 96.4, 97.6), (93.1, 96.9, 97.7)),
        "MSLS-val": ((91.1, 95.7, 96.4), (91.5, 96.2, 96.8)),
        "Nordland**": ((72.7, 85.5, 89.6), (85.4, 92.7, 94.8)),
        "Tokyo24/7": ((94.6, 96.5, 96.8), (97.5, 98.1, 98.4)),
        "Nordland*": ((62.5, 80.3, 85.0), (78.2, 90.2, 92.9)),
        "Eynsham": ((91.3, 95.2, 96.0), (91.3, 95.1, 96.1)),
        "SF-XL-testv1": ((86.1, 91.4, 92.7), (90.0, 93.4, 94.4)),
        "SF-XL-testv2": ((94.1, 97.7, 98.5), (94.8, 97.2, 98.0)),
        "SF-XL-night": ((44.8, 56.7, 61.8), (52.8, 64.8, 67.6)),
        "SF-XL-occlusion": ((48.7, 56.6, 60.5), (46.1, 61.8, 67.1)),
        "SVOX": ((98.3, 99.4, 99.5), (98.4, 99.3, 99.5)),
        "SVOX-night": ((93.1, 98.2, 99.0), (96.5, 98.4, 99.3)),
        "SVOX-overcast": ((97.7, 99.2, 99.4), (97.7, 99.3, 99.4)),
        "SVOX-rain": ((96.2, 99.1, 99.6), (97.9, 99.7, 99.8)),
        "SVOX-snow": ((98.7, 99.5, 99.5), (97.7, 99.7, 99.7)),
        "SVOX-sun": ((96.7, 98.9, 99.3), (96.6, 98.9, 99.5)),
    },
}


def published_recalls(backbone: str, image_size: tuple[int, int], label: str | None) -> tuple[Recalls, Recalls] | None:
    """(global, re-ranked) R@1/5/10 published for a row at this backbone and image size, or None."""
    if label is None:
        return None
    return PUBLISHED.get((backbone, tuple(image_size)), {}).get(label)
