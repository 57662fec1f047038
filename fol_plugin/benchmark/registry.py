"""The datasets ``fol-vpr benchmark`` knows: where each lives under ``--datasets_folder``, its
database and query sets, its positive radius, and how many images each folder should hold.

Layouts are those of the original FoL's ``datasets.py`` / README tree and of
gmberton/VPR-datasets-downloader: ``<name>/images/test/{database,queries}``, ``SF_XL/test/{database,
queries_v1, ...}`` and ``svox/images/test/{gallery, queries, queries_night, ...}``; the first root of
a dataset that exists is used, and ``--dataset_path NAME=FOLDER`` points a dataset elsewhere.
Names are matched as the original matches them (case-insensitive, ``-`` read as ``_``): ``SF_XL``
and ``SVOX`` select all their query sets; ``SF_XL_night``, ``SVOX_rain``, ``svox_base``... one of
them; ``msls`` is ``msls_val``. Query sets of one dataset share a single database extraction.

Expected counts come from the original README (Nordland) and the datasets' standard test splits;
where no count is established it is None and the folder is not checked. :func:`locate` counts
every folder before anything is extracted and lists each mismatch (which set, expected vs found).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..data.datasets import list_images
from ..options import DEFAULT_POSITIVE_DISTANCE


@dataclass(frozen=True)
class QuerySetSpec:
    """One query set of a dataset: one row of the results table.

    Attributes:
        name: the row's name (``SF_XL_night``); also accepted in ``--dataset_names``.
        folder: relative to the dataset's root.
        num_images: expected number of queries; None: not checked.
        label: the row's name in the published tables (:mod:`.published`), None if unpublished.
    """

    name: str
    folder: str
    num_images: int | None
    label: str | None


@dataclass(frozen=True)
class DatasetSpec:
    """One database with its query sets, evaluated in one run.

    Attributes:
        name: the dataset's name in ``--dataset_names`` and its output folder.
        roots: candidate roots relative to ``--datasets_folder``, first existing wins.
        database: the database folder, relative to the root.
        num_database: expected number of database images; None: not checked.
        query_sets: in the order rows are reported.
        labelled: whether file names carry UTM labels (False: recalls are computed elsewhere,
            e.g. MSLS-challenge's server).
        positive_dist_threshold: metres within which a database image is correct.
        note: what a user should know (protocol, where counts come from).
    """

    name: str
    roots: tuple[str, ...]
    database: str
    num_database: int | None
    query_sets: tuple[QuerySetSpec, ...]
    labelled: bool = True
    positive_dist_threshold: float = DEFAULT_POSITIVE_DISTANCE
    note: str = ""


def _standard(name: str, num_database: int | None, num_queries: int | None, label: str | None, **extra) -> DatasetSpec:
    """A dataset in the ``<name>/images/test/{database,queries}`` layout with one query set."""
    roots = extra.pop("roots", (f"{name}/images/test",))
    return DatasetSpec(name, roots, "database", num_database, (QuerySetSpec(name, "queries", num_queries, label),), **extra)


SF_XL_QUERY_SETS = (
    QuerySetSpec("SF_XL_v1", "queries_v1", 1000, "SF-XL-testv1"),
    QuerySetSpec("SF_XL_v2", "queries_v2", 598, "SF-XL-testv2"),
    QuerySetSpec("SF_XL_night", "queries_night", 466, "SF-XL-night"),
    QuerySetSpec("SF_XL_occlusion", "queries_occlusion", 76, "SF-XL-occlusion"),
)
SVOX_QUERY_SETS = (
    QuerySetSpec("SVOX", "queries", 14278, "SVOX"),
    QuerySetSpec("SVOX_night", "queries_night", 823, "SVOX-night"),
    QuerySetSpec("SVOX_overcast", "queries_overcast", 872, "SVOX-overcast"),
    QuerySetSpec("SVOX_rain", "queries_rain", 937, "SVOX-rain"),
    QuerySetSpec("SVOX_snow", "queries_snow", 870, "SVOX-snow"),
    QuerySetSpec("SVOX_sun", "queries_sun", 854, "SVOX-sun"),
)

REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        _standard("pitts30k", 10000, 6816, "Pitts30k"),
        _standard("pitts250k", 83952, 8280, "Pitts250k"),
        _standard(
            "msls_val", 18871, 740, "MSLS-val", roots=("msls/images/test", "msls/images/val", "msls/test", "msls/val"),
            note="the 740-query MSLS-val of the FoL, MixVPR and SALAD papers; the downloader's full val split has more "
            "queries (a count mismatch)",
        ),
        _standard(
            "msls_challenge", None, None, "MSLS-challenge", roots=("msls_challenge/images/test",), labelled=False,
            note="MSLS test split: no labels are public; submit the predictions to the MSLS challenge server",
        ),
        _standard("tokyo247", 75984, 315, "Tokyo24/7"),
        _standard(
            "nordland", 27592, 27592, "Nordland**",
            note="Nordland**: the full 27,592 winter queries against the 27,592-image summer database",
        ),
        _standard(
            "nordland_2760", 27592, 2760, "Nordland*",
            note="Nordland*: 2,760 summer queries against the 27,592-image winter database",
        ),
        _standard("sped", 607, 607, "SPED"),
        _standard("amstertime", 1231, 1231, "AmsterTime"),
        _standard("eynsham", 23935, 23935, "Eynsham"),
        _standard("st_lucia", 1549, 1464, None),
        DatasetSpec("SF_XL", ("SF_XL/test", "sf_xl/test", "sf_xl/processed/test"), "database", 2805839, SF_XL_QUERY_SETS),
        DatasetSpec("SVOX", ("svox/images/test",), "gallery", 17166, SVOX_QUERY_SETS),
    )
}


# Other names the original accepts: alias -> (dataset, query set).
ALIASES = {"svox_base": ("SVOX", "SVOX"), "msls": ("msls_val", "msls_val")}


def normalise(name: str) -> str:
    """Names compare as the original compares them: case-insensitive, ``-`` read as ``_``."""
    return name.lower().replace("-", "_")


def select(
    names: Iterable[str], registry: Mapping[str, DatasetSpec] = REGISTRY, datasets_folder: str | os.PathLike | None = None
) -> list[tuple[DatasetSpec, tuple[QuerySetSpec, ...]]]:
    """The datasets and query sets ``names`` ask for, in the order first asked, each dataset once
    with its query sets in registry order (so ``SF_XL_v1 SF_XL_night`` is one run). A name the
    registry does not know is taken, as the original takes it, when ``<datasets_folder>/<name>/
    images/test`` exists (counts unchecked, no published row).

    Raises:
        ValueError: an unknown name without such a folder, listing the known ones.
    """
    registry = dict(registry)
    for name in names:
        known = normalise(name) in {normalise(n) for n in known_names(registry)}
        if not known and datasets_folder is not None and (Path(datasets_folder) / name / "images" / "test").is_dir():
            registry[name] = _standard(name, None, None, None, note="not in the registry: counts unchecked")
    chosen: dict[str, set[str]] = {}
    for name in names:
        key = normalise(name)
        if key in ALIASES and ALIASES[key][0] in registry:
            dataset, query_set = ALIASES[key]
            chosen.setdefault(dataset, set()).add(query_set)
            continue
        for spec in registry.values():
            if normalise(spec.name) == key:
                chosen.setdefault(spec.name, set()).update(q.name for q in spec.query_sets)
                break
            match = [q for q in spec.query_sets if normalise(q.name) == key]
            if match:
                chosen.setdefault(spec.name, set()).add(match[0].name)
                break
        else:
            raise ValueError(f"--dataset_names {name}: unknown dataset; choose from {', '.join(known_names(registry))}")
    return [
        (registry[dataset], tuple(q for q in registry[dataset].query_sets if q.name in wanted))
        for dataset, wanted in chosen.items()
    ]


def known_names(registry: Mapping[str, DatasetSpec] = REGISTRY) -> list[str]:
    """Every name ``--dataset_names`` takes: datasets, the query sets of those with several, and
    the original's other names."""
    names = list(registry)
    for spec in registry.values():
        if len(spec.query_sets) > 1:
            names += [q.name for q in spec.query_sets]
    names += [alias for alias, (dataset, _) in ALIASES.items() if dataset in registry]
    return names


@dataclass
class Located:
    """A selected dataset found (or not) on disk, with its image counts.

    Attributes:
        spec: the dataset.
        query_sets: the selected query sets.
        root: the folder found, or None.
        counts: images found per folder (``database`` and each query set's name).
        mismatches: one line per folder whose count differs from the registry's.
        problems: what makes the dataset impossible to run (a missing folder, no images).
    """

    spec: DatasetSpec
    query_sets: tuple[QuerySetSpec, ...]
    root: Path | None = None
    counts: dict[str, int] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def database_folder(self) -> Path:
        return self.root / self.spec.database

    def queries_folder(self, query_set: QuerySetSpec) -> Path:
        return self.root / query_set.folder


def locate(
    spec: DatasetSpec,
    query_sets: tuple[QuerySetSpec, ...],
    datasets_folder: str | os.PathLike,
    override: str | os.PathLike | None = None,
    allow_outside_paths: bool = False,
) -> Located:
    """Find ``spec``'s root (``override`` if given) and count the images of its database and of
    the selected query sets, without reading any image (``allow_outside_paths`` as in
    :func:`fol_plugin.data.datasets.list_images`)."""
    located = Located(spec, query_sets)
    candidates = [Path(override)] if override else [Path(datasets_folder) / root for root in spec.roots]
    located.root = next((root for root in candidates if root.is_dir()), None)
    if located.root is None:
        tried = ", ".join(str(root) for root in candidates)
        located.problems.append(
            f"{spec.name}: no folder found (tried {tried}); lay it out as in the README or pass "
            f"--dataset_path {spec.name}=FOLDER"
        )
        return located
    folders = [("database", located.database_folder, spec.num_database)]
    folders += [(q.name, located.queries_folder(q), q.num_images) for q in query_sets]
    for name, folder, expected in folders:
        try:
            found = len(list_images(folder, allow_outside_paths))
        except (FileNotFoundError, ValueError) as error:
            located.problems.append(f"{spec.name} {name}: {error}")
            continue
        located.counts[name] = found
        if expected is not None and found != expected:
            located.mismatches.append(
                f"{spec.name} {name}: expected {expected:,} images, found {found:,} in {folder}"
                + (f" ({spec.note})" if spec.note else "")
            )
    return located
