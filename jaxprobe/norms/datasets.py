"""The published norms shipped in `jaxprobe/norms/data/` (see SOURCES.md there), as `Norms`.

The files are read as their authors published them; each is parsed once per process (`functools.cache`)
and every loader call builds fresh arrays from that parse, so filters never see each other's results.
"""

from __future__ import annotations

import functools
import importlib.resources
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from jaxprobe.errors import InputError, preview
from jaxprobe.norms.base import AMBIGUOUS, Norms, dropped_frame, prompt_words

DATA = importlib.resources.files("jaxprobe.norms") / "data"

BINDER_CITATION = (
    "Binder, J. R., Conant, L. L., Humphries, C. J., Fernandino, L., Simons, S. B., Aguilar, M., & Desai, R. H. "
    "(2016). Toward a brain-based componential semantic representation. Cognitive Neuropsychology, 33(3-4), "
    "130-174. https://doi.org/10.1080/02643294.2016.1147426"
)
MCRAE_CITATION = (
    "McRae, K., Cree, G. S., Seidenberg, M. S., & McNorgan, C. (2005). Semantic feature production norms for a "
    "large set of living and nonliving things. Behavior Research Methods, 37(4), 547-559. "
    "https://doi.org/10.3758/BF03192726 -- and the archived norms: McRae et al. (2005), CONCS_FEATS_concstats_brm.txt, "
    "CONCS_brm.txt, FEATS_brm.txt, Psychonomic Society Web Archive (non-commercial research and teaching use)."
)
THINGS_CITATION = (
    "Hebart, M. N., Zheng, C. Y., Pereira, F., & Baker, C. I. (2020). Revealing the multidimensional mental "
    "representations of natural objects underlying human similarity judgements. Nature Human Behaviour, 4(11), "
    "1173-1185. https://doi.org/10.1038/s41562-020-00951-3 -- Hebart, M. N., Dickter, A. H., Kidder, A., Kwok, "
    "W. Y., Corriveau, A., Van Wicklin, C., & Baker, C. I. (2019). THINGS: A database of 1,854 object concepts and "
    "more than 26,000 naturalistic object images. PLoS ONE, 14(10), e0223792. "
    "https://doi.org/10.1371/journal.pone.0223792"
)
THINGS66_CITATION = (
    "Hebart, M. N., Contier, O., Teichmann, L., Rockter, A. H., Zheng, C. Y., Kidder, A., Corriveau, A., "
    "Vaziri-Pashkam, M., & Baker, C. I. (2023). THINGS-data, a multimodal collection of large-scale datasets for "
    "investigating object representations in human brain and behavior. eLife, 12, e82580. "
    "https://doi.org/10.7554/eLife.82580"
)
BRYSBAERT_CITATION = (
    "Brysbaert, M., Warriner, A. B., & Kuperman, V. (2014). Concreteness ratings for 40 thousand generally known "
    "English word lemmas. Behavior Research Methods, 46(3), 904-911. https://doi.org/10.3758/s13428-013-0403-5"
)

BINDER_WORD_CLASSES = {1: "noun", 2: "verb", 3: "adjective"}  # column WC, per WordSet1_ReadMe.txt
BINDER_SUPER_CATEGORIES = (
    "abstract action", "abstract entity", "abstract property", "artifact", "event", "living object",
    "mental entity", "mental state", "natural object", "physical action", "physical property", "physical state",
)  # fmt: skip
CONCRETE_NOUNS = ("artifact", "living object", "natural object")
_BINDER_METADATA = {
    "No": "binder_id", "WC": "word_class", "N": "n_raters", "Mean R": "mean_r", "LEN": "length",
    "FREQ": "frequency", "L10 FREQ": "log10_frequency", "Orth": "orth_neighbors", "Orth_F": "orth_neighbor_frequency",
    "N1_F": "unigram_frequency", "N2_F": "bigram_frequency", "N3_F": "trigram_frequency", "IMG": "imageability",
    "Type": "type", "Super Category": "super_category", "Category": "category",
    "Kmeans28 Category": "kmeans28_category",
}  # fmt: skip
_MCRAE_METADATA = {
    "Familiarity": "familiarity", "KF": "kf_frequency", "BNC": "bnc_frequency", "Length_Letters": "length",
    "Num_Feats_Tax": "n_features",
}  # fmt: skip
_THINGS_METADATA = {
    "Bottom-up Category (Human Raters)": "category", "Top-down Category (WordNet)": "wordnet_category",
    "Concreteness (M)": "concreteness", "Percent_known": "percent_known", "WordNet ID": "wordnet_id",
    "Definition (from WordNet, Google, or Wikipedia)": "definition",
}  # fmt: skip


def _read_csv(relative: str, **options) -> pd.DataFrame:
    with (DATA / relative).open("rb") as file:
        return pd.read_csv(file, **options)


@functools.cache
def _binder_sheet() -> pd.DataFrame:
    with (DATA / "binder2016" / "WordSet1_Ratings.xlsx").open("rb") as file, warnings.catch_warnings():
        # The workbook carries an Excel extension openpyxl does not read; it holds no cell values.
        warnings.filterwarnings("ignore", "Unknown extension", UserWarning)
        return pd.read_excel(file, engine="openpyxl")


def _choices(value: str | Sequence[str] | None, valid: Sequence[str], option: str) -> tuple[str, ...]:
    """An option that takes one, several or (None) all of `valid`."""
    chosen = tuple(valid) if value is None else (value,) if isinstance(value, str) else tuple(value)
    unknown = [v for v in chosen if v not in valid]
    if unknown or not chosen:
        raise InputError(f"{option} must be None (all) or among {preview(valid, len(valid))}; got {value!r}.")
    return chosen


def load_binder(
    word_class: str | Sequence[str] | None = ("noun",),
    super_categories: str | Sequence[str] | None = CONCRETE_NOUNS,
) -> Norms:
    """Binder et al. (2016): 65 experiential attributes rated 0-6, grouped into their 14 domains.

    word_class: "noun", "verb", "adjective", several, or None for all 535 words.
    super_categories: the a-priori super categories to keep (None: all); the default keeps the 275
        concrete nouns (artifact, living object, natural object), the objects one can picture.
    Attributes not rated for a word class (`na` in the sheet: Complexity for verbs and adjectives,
    Practice and Caused for adjectives) are NaN. "used", rated as a verb and as an adjective, is
    prompted as "used (verb)" and "used (adjective)".
    """
    word_classes = _choices(word_class, tuple(BINDER_WORD_CLASSES.values()), "word_class")
    supers = _choices(super_categories, BINDER_SUPER_CATEGORIES, "super_categories")
    domains = _read_csv("binder2016/attribute_domains.csv")
    attributes = list(domains["attribute"])
    sheet = _binder_sheet().assign(WC=lambda s: s["WC"].map(BINDER_WORD_CLASSES))
    names = prompt_words(list(sheet["Word"]), list(sheet["WC"]))
    reasons = [
        f"word class {wc} (kept: {', '.join(word_classes)})" if wc not in word_classes
        else f"super category {sc} (kept: {', '.join(supers)})" if sc not in supers
        else AMBIGUOUS if name is None
        else None
        for wc, sc, name in zip(sheet["WC"], sheet["Super Category"], names)
    ]  # fmt: skip
    rows = [i for i, reason in enumerate(reasons) if reason is None]
    concepts = [names[i] for i in rows]
    kept = sheet.iloc[rows]
    metadata = kept[list(_BINDER_METADATA)].rename(columns=_BINDER_METADATA).assign(word=kept["Word"])
    return Norms(
        name="binder2016",
        concepts=tuple(concepts),
        attributes=tuple(attributes),
        values=kept[attributes].replace("na", np.nan).to_numpy(np.float64),  # (concepts, 65)
        groups=dict(zip(domains["attribute"], domains["domain"])),
        metadata=metadata.set_axis(concepts),
        citation=BINDER_CITATION,
        dropped=dropped_frame((w, r) for w, r in zip(sheet["Word"], reasons) if r is not None),
    )


@functools.cache
def _mcrae_tables() -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    """(concept, feature, production frequency) rows, per-concept statistics, feature -> BR_Label."""
    pairs = _read_csv("mcrae2005/CONCS_FEATS_concstats_brm.txt", sep="\t", usecols=["Concept", "Feature", "Prod_Freq"])
    # CONCS_brm names "pipe" the concept that the concept-feature file calls pipe_(plumbing).
    concepts = _read_csv("mcrae2005/CONCS_brm.txt", sep="\t", index_col="Concept")
    concepts = concepts.rename(index={"pipe": "pipe_(plumbing)"})
    # FEATS_brm gives each feature one type; a few concept-feature rows disagree with it (is_dark, has_taps).
    feature_types = _read_csv("mcrae2005/FEATS_brm.txt", sep="\t").set_index("Feature")["BR_Label"]
    return pairs, concepts, feature_types


def load_mcrae(min_frequency: int = 5, min_concepts: int = 5) -> Norms:
    """McRae et al. (2005): production frequency (of 30 participants) of each feature for 541 concepts.

    The norms list a feature for a concept only when at least 5 of 30 participants produced it, so an
    absent pair is 0 (below threshold), not missing. Feature types (BR_Label: taxonomic, function,
    visual-form_and_surface, ...) are the groups.

    min_frequency: keep concept-feature pairs produced by at least this many participants. The default,
        5, is the published inclusion threshold, i.e. every published pair.
    min_concepts: keep features listed for at least this many concepts. A feature of one or two concepts
        is a target that is 0 for nearly every concept: in cross-validation most training folds hold no
        positive example, so its score is noise or undefined. The default, 5, keeps 274 features, and
        539 of the 541 concepts still have one (chapel and projector do not: concepts left with no
        feature are dropped).
    Concepts named with a sense, as `bat_(animal)`, are prompted as the bare word unless it is shared
    (`bat (animal)` and `bat (baseball)`, `mink (coat)` beside `mink`); metadata keeps the McRae id.
    """
    if not 1 <= min_frequency <= 30 or min_concepts < 1:
        raise InputError(
            f"min_frequency must be 1-30 participants and min_concepts at least 1; got {min_frequency}, {min_concepts}."
        )
    pairs, concept_stats, feature_types = _mcrae_tables()
    pairs = pairs[pairs["Prod_Freq"] >= min_frequency]
    pairs = pairs[pairs.groupby("Feature")["Concept"].transform("nunique") >= min_concepts]
    if pairs.empty:
        raise InputError(
            f"no McRae feature is produced by >= {min_frequency} participants for >= {min_concepts} concepts; "
            "lower min_frequency or min_concepts."
        )
    # Two pairs are listed twice (harpoon used_for_killing 6 and 8, pen used_for_writing 5 and 16): keep the
    # larger count, as a sum could count a participant twice.
    matrix = pairs.pivot_table(index="Concept", columns="Feature", values="Prod_Freq", aggfunc="max")
    ids = list(concept_stats.index)  # the published concept order
    words, senses = zip(*map(_split_sense, ids))
    names = prompt_words(words, senses)
    no_feature = f"no feature left that >= {min_frequency} participants produced for >= {min_concepts} concepts"
    reasons = [
        no_feature if i not in matrix.index else AMBIGUOUS if name is None else None for i, name in zip(ids, names)
    ]
    rows = [i for i, reason in enumerate(reasons) if reason is None]
    concepts = [names[i] for i in rows]
    kept_ids = [ids[i] for i in rows]
    matrix = matrix.loc[kept_ids].fillna(0.0)  # (concepts, features); absent pairs: too few participants
    metadata = (
        concept_stats.loc[kept_ids, list(_MCRAE_METADATA)]
        .rename(columns=_MCRAE_METADATA)
        .assign(mcrae_id=kept_ids, sense=[senses[i] for i in rows])
        .set_axis(concepts)
    )
    return Norms(
        name="mcrae2005",
        concepts=tuple(concepts),
        attributes=tuple(matrix.columns),
        values=matrix.to_numpy(np.float64),
        groups=feature_types[matrix.columns].to_dict(),
        metadata=metadata,
        citation=MCRAE_CITATION,
        dropped=dropped_frame((i, r) for i, r in zip(ids, reasons) if r is not None),
    )


def _split_sense(mcrae_id: str) -> tuple[str, str | None]:
    """`bat_(animal)` -> ("bat", "animal"); `apple` -> ("apple", None)."""
    word, _, sense = mcrae_id.partition("_(")
    return word.replace("_", " "), sense.removesuffix(")") or None


@functools.cache
def _things_tables() -> tuple[list[str], pd.DataFrame]:
    """THINGS ids in the row order of the SPoSE embeddings, and words.csv + ratings indexed by id."""
    ids = (DATA / "things" / "unique_id.txt").read_text().split()
    words = _read_csv("things/words.csv", index_col="id")
    ratings = _read_csv("things/Wordlist_ratings-Final.csv", index_col="uniqueID")
    # words.csv lists homonyms (bat1, bat2, ...) last; the embeddings follow unique_id.txt.
    return ids, words.loc[ids].join(ratings[list(_THINGS_METADATA)])


@functools.cache
def _spose(dims: int) -> np.ndarray:
    with (DATA / "things" / f"spose_embedding_{dims}d_sorted.txt").open("rb") as file:
        embedding = np.loadtxt(file)  # (1854, dims)
    embedding.flags.writeable = False
    return embedding


def load_things(dims: int = 49) -> Norms:
    """THINGS: the SPoSE embedding of 1,854 object concepts, learned from human odd-one-out judgements.

    dims: 49 (Hebart et al. 2020) or 66 (Hebart et al. 2023). The 66 dimensions carry their published
    labels ("metallic/artificial", ...); the 49 have no label file here and are named dim01..dim49, in
    the published order (most to least important). All dimensions form one group, "SPoSE".
    Homonyms are prompted with THINGS' own sense labels (`bat (animal)`); hook1/hook2 and baton3/baton4
    share word and sense, so no prompt tells them apart: they are dropped.
    """
    if dims not in (49, 66):
        raise InputError(f"THINGS SPoSE embeddings have 49 or 66 dimensions; got dims={dims!r}.")
    ids, table = _things_tables()
    senses = [s if isinstance(s, str) else None for s in table["new_category"]]
    names = prompt_words(list(table["word"]), senses)
    rows = [i for i, name in enumerate(names) if name is not None]
    concepts = [names[i] for i in rows]
    if dims == 66:
        attributes = (DATA / "things" / "labels_66.txt").read_text().splitlines()
    else:
        attributes = [f"dim{d + 1:02d}" for d in range(dims)]
    metadata = (
        table.iloc[rows][list(_THINGS_METADATA)]
        .rename(columns=_THINGS_METADATA)
        .assign(things_id=[ids[i] for i in rows], sense=[senses[i] for i in rows])
    )
    return Norms(
        name=f"things{dims}",
        concepts=tuple(concepts),
        attributes=tuple(attributes),
        values=_spose(dims)[rows],  # (concepts, dims)
        groups=dict.fromkeys(attributes, "SPoSE"),
        metadata=metadata.set_axis(concepts),
        citation=THINGS_CITATION + (" -- " + THINGS66_CITATION if dims == 66 else ""),
        dropped=dropped_frame((ids[i], AMBIGUOUS) for i, name in enumerate(names) if name is None),
    )


@functools.cache
def _brysbaert_table() -> pd.DataFrame:
    # keep_default_na=False: "null", "none" and "nan"-like words are lemmas, not missing values.
    names = ["word", "concreteness"]
    return _read_csv("brysbaert2014/Concreteness40k.txt", sep="\t", header=None, names=names, keep_default_na=False)


def load_concreteness() -> Norms:
    """Brysbaert et al. (2014): mean concreteness (1 abstract - 5 concrete) of 39,954 English lemmas."""
    table = _brysbaert_table()
    return Norms(
        name="brysbaert2014",
        concepts=tuple(table["word"]),
        attributes=("concreteness",),
        values=table[["concreteness"]].to_numpy(np.float64),  # (words, 1)
        groups={"concreteness": "concreteness"},
        metadata=pd.DataFrame(index=table["word"]),
        citation=BRYSBAERT_CITATION,
    )
