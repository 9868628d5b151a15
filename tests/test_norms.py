"""Norms loaders against the shipped files, the user-file loader in both layouts, and alignment."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxprobe.errors import InputError
from jaxprobe.norms import (
    NORMS,
    Norms,
    align,
    load_binder,
    load_concreteness,
    load_mcrae,
    load_norms,
    load_norms_file,
    load_things,
)
from jaxprobe.norms.base import AMBIGUOUS, prompt_words
from jaxprobe.norms.datasets import DATA

BINDER_DOMAINS = [
    "Vision", "Somatic", "Audition", "Gustation", "Olfaction", "Motor", "Spatial",
    "Temporal", "Causal", "Social", "Cognition", "Emotion", "Drive", "Attention",
]  # fmt: skip
MCRAE_TYPES = {
    "taxonomic", "encyclopaedic", "function", "visual-form_and_surface", "visual-colour", "visual-motion",
    "tactile", "sound", "taste", "smell",
}  # fmt: skip


@pytest.fixture(scope="module")
def binder() -> Norms:
    return load_binder()


@pytest.fixture(scope="module")
def binder_all() -> Norms:
    return load_binder(word_class=None, super_categories=None)


@pytest.fixture(scope="module")
def mcrae() -> Norms:
    return load_mcrae()


@pytest.fixture(scope="module")
def things() -> Norms:
    return load_things()


# --- Binder 2016 -------------------------------------------------------------------------------------


def test_binder_default_is_the_concrete_nouns(binder: Norms):
    assert (len(binder.concepts), len(binder.attributes)) == (275, 65)
    assert binder.values.shape == (275, 65) and binder.values.dtype == np.float64
    assert set(binder.metadata["super_category"]) == {"artifact", "living object", "natural object"}
    assert set(binder.metadata["word_class"]) == {"noun"}
    assert not np.isnan(binder.values).any()  # nouns were rated on every attribute
    assert binder.values.min() >= 0 and binder.values.max() <= 6
    # the sheet's first concrete noun, read by hand from WordSet1_Ratings.xlsx (row "accordion", ID 385)
    row = binder.to_frame().loc["accordion"]
    assert row["Vision"] == pytest.approx(5.551724, abs=1e-6) and row["Music"] == pytest.approx(5.931034, abs=1e-6)
    assert binder.metadata.loc["accordion", "binder_id"] == 385
    assert binder.metadata.loc["accordion", "category"] == "instrument"


def test_binder_groups_are_the_14_domains_in_table_order(binder: Norms):
    assert binder.group_names() == BINDER_DOMAINS
    assert binder.attributes[:3] == ("Vision", "Bright", "Dark") and binder.attributes[-1] == "Arousal"
    assert binder.groups["Complexity"] == "Vision" and binder.groups["Practice"] == "Motor"
    assert sum(g == "Emotion" for g in binder.groups.values()) == 10


def test_binder_reports_what_the_filters_dropped(binder: Norms):
    assert len(binder.dropped) == 535 - 275
    reasons = dict(zip(binder.dropped["concept"], binder.dropped["reason"]))
    assert reasons["accident"].startswith("super category event")
    assert reasons["yellow"].startswith("word class adjective")
    assert not set(reasons) & set(binder.concepts)


def test_binder_na_cells_are_missing_exactly_where_the_readme_says(binder_all: Norms):
    frame, word_class = binder_all.to_frame(), binder_all.metadata["word_class"]
    assert len(binder_all.concepts) == 535 and binder_all.dropped.empty
    missing = frame.isna()
    assert missing.to_numpy().sum() == 101 + 39 + 39
    assert (missing["Complexity"] == (word_class != "noun")).all()
    for attribute in ("Practice", "Caused"):
        assert (missing[attribute] == (word_class == "adjective")).all()
    assert not missing.drop(columns=["Complexity", "Practice", "Caused"]).to_numpy().any()


def test_binder_homonym_used_is_prompted_with_its_word_class(binder_all: Norms):
    frame = binder_all.to_frame()
    assert {"used (verb)", "used (adjective)"} <= set(binder_all.concepts) and "used" not in binder_all.concepts
    assert np.isnan(frame.loc["used (adjective)", "Caused"]) and not np.isnan(frame.loc["used (verb)", "Caused"])
    # the prompt word does not depend on the filters
    assert "used (verb)" in load_binder(word_class="verb", super_categories=None).concepts


def test_binder_word_class_filter():
    verbs = load_binder(word_class="verb", super_categories=None)
    assert len(verbs.concepts) == 62 and set(verbs.metadata["word_class"]) == {"verb"}
    with pytest.raises(InputError, match="word_class must be None .* 'noun', 'verb', 'adjective'"):
        load_binder(word_class="nouns")
    with pytest.raises(InputError, match="super_categories"):
        load_binder(super_categories=["animal"])


# --- McRae 2005 --------------------------------------------------------------------------------------


def test_mcrae_defaults_keep_features_of_at_least_five_concepts(mcrae: Norms):
    assert mcrae.values.shape == (539, 274)
    present = mcrae.values > 0
    assert (present.sum(axis=0) >= 5).all() and present.any(axis=1).all()
    assert set(np.unique(mcrae.values)) <= {0.0, *range(5, 31)}  # counts of 30 participants, >= 5 published
    assert set(mcrae.dropped["concept"]) == {"chapel", "projector"}
    assert set(mcrae.group_names()) == MCRAE_TYPES


def test_mcrae_feature_types_come_from_feats_brm(mcrae: Norms):
    feats = pd.read_csv(DATA / "mcrae2005" / "FEATS_brm.txt", sep="\t").set_index("Feature")["BR_Label"]
    assert mcrae.groups == {a: feats[a] for a in mcrae.attributes}
    assert mcrae.groups["a_musical_instrument"] == "taxonomic"


def test_mcrae_without_filters_is_the_published_matrix():
    full = load_mcrae(min_concepts=1)
    assert full.values.shape == (541, 2526) and full.dropped.empty
    assert (full.values > 0).sum() == 7259 - 2  # two concept-feature pairs are listed twice
    frame = full.to_frame()
    assert frame.loc["pen", "used_for_writing"] == 16 and frame.loc["harpoon", "used_for_killing"] == 8
    assert frame.loc["accordion", "a_musical_instrument"] == 28  # first row of CONCS_FEATS_concstats_brm.txt
    assert full.metadata.loc["accordion", "familiarity"] == pytest.approx(2.90)


def test_mcrae_min_frequency_and_errors():
    salient = load_mcrae(min_frequency=20, min_concepts=2)
    assert salient.values[salient.values > 0].min() >= 20
    assert ((salient.values > 0).sum(axis=0) >= 2).all()
    assert "no feature left that >= 20 participants" in salient.dropped["reason"].iloc[0]
    with pytest.raises(InputError, match="lower min_frequency or min_concepts"):
        load_mcrae(min_frequency=30, min_concepts=50)
    with pytest.raises(InputError, match="min_frequency must be 1-30"):
        load_mcrae(min_frequency=31)


def test_mcrae_senses_become_prompt_words_and_ids_are_kept(mcrae: Norms):
    ids = mcrae.metadata["mcrae_id"]
    assert ids["bat (animal)"] == "bat_(animal)" and ids["bat (baseball)"] == "bat_(baseball)"
    assert ids["bin"] == "bin_(waste)" and mcrae.metadata.loc["bin", "sense"] == "waste"
    # a sense-marked concept whose bare word is another concept keeps its sense
    assert ids["mink"] == "mink" and ids["mink (coat)"] == "mink_(coat)"
    assert ids["pipe (plumbing)"] == "pipe_(plumbing)" and ids["pipe (smoking)"] == "pipe_(smoking)"
    assert not any("_(" in c for c in mcrae.concepts)


# --- THINGS ------------------------------------------------------------------------------------------


def _spose_rows(dims: int) -> dict[str, np.ndarray]:
    ids = (DATA / "things" / "unique_id.txt").read_text().split()
    return dict(zip(ids, np.loadtxt(DATA / "things" / f"spose_embedding_{dims}d_sorted.txt")))


def test_things_rows_follow_unique_id(things: Norms):
    assert things.values.shape == (1850, 49)
    assert things.attributes[0] == "dim01" and things.attributes[-1] == "dim49"
    assert things.group_names() == ["SPoSE"]
    rows = _spose_rows(49)
    np.testing.assert_array_equal(things.values, np.stack([rows[i] for i in things.metadata["things_id"]]))
    assert things.to_frame().loc["aardvark", "dim01"] == pytest.approx(0.0234450157731771469116)


def test_things_homonyms(things: Norms):
    ids = things.metadata["things_id"]
    assert ids["bat (animal)"] == "bat1" and ids["bat (sports equipment)"] == "bat2"
    assert ids["mouse (computer accessory)"] == "mouse2" and "bat" not in things.concepts
    assert "air conditioner" in things.concepts  # words.csv spells it with a space; the id with "_"
    assert set(things.dropped["concept"]) == {"baton3", "baton4", "hook1", "hook2"}
    assert set(things.dropped["reason"]) == {AMBIGUOUS}


def test_things_metadata(things: Norms):
    meta = things.metadata
    assert meta["concreteness"].between(1, 5).all()
    assert meta.loc["aardvark", "category"] == "animal" and meta.loc["aardvark", "wordnet_id"] == "n02082791"
    assert "Hebart" in things.citation


def test_things66_has_labels_and_its_own_rows():
    things66 = load_things(dims=66)
    assert things66.values.shape == (1850, 66)
    assert things66.attributes[:2] == ("metallic/artificial", "food-related")
    np.testing.assert_array_equal(things66.to_frame().loc["abacus"].to_numpy(), _spose_rows(66)["abacus"])
    assert "eLife" in things66.citation
    with pytest.raises(InputError, match="49 or 66"):
        load_things(dims=50)


# --- Brysbaert 2014 ----------------------------------------------------------------------------------


def test_concreteness():
    norms = load_concreteness()
    assert norms.values.shape == (39954, 1) and norms.attributes == ("concreteness",)
    assert not np.isnan(norms.values).any() and 1 <= norms.values.min() and norms.values.max() <= 5
    frame = norms.to_frame()["concreteness"]
    # words that a default CSV reader would turn into missing values are words here
    assert frame["null"] == pytest.approx(1.79) and frame["none"] == pytest.approx(2.59)
    assert frame["roadsweeper"] == pytest.approx(4.85) and frame["baking soda"] == 5.0


# --- the Norms container and align -------------------------------------------------------------------


def _toy(concepts=("dog", "cat", "car"), attributes=("size", "speed")) -> Norms:
    values = np.arange(len(concepts) * len(attributes), dtype=float).reshape(len(concepts), len(attributes))
    return Norms(
        name="toy",
        concepts=concepts,
        attributes=attributes,
        values=values,
        groups={"size": "body", "speed": "motion"},
        metadata=pd.DataFrame({"kind": ["animal", "animal", "vehicle"]}, index=list(concepts)),
        citation="none",
    )


def test_norms_is_frozen_and_its_values_read_only(binder: Norms):
    with pytest.raises(ValueError, match="read-only"):
        binder.values[0, 0] = 1.0
    with pytest.raises(AttributeError):
        binder.name = "other"
    assert repr(binder) == "Norms('binder2016': 275 concepts x 65 attributes in 14 groups, 260 dropped)"


def test_norms_checks_its_parts():
    with pytest.raises(InputError, match="values have shape"):
        Norms("bad", ("a",), ("x",), np.zeros((2, 1)), {"x": "g"}, pd.DataFrame(index=["a"]), "")
    with pytest.raises(InputError, match="appear more than once"):
        Norms("bad", ("a", "a"), ("x",), np.zeros((2, 1)), {"x": "g"}, pd.DataFrame(index=["a", "a"]), "")
    with pytest.raises(InputError, match="have no group"):
        Norms("bad", ("a",), ("x",), np.zeros((1, 1)), {}, pd.DataFrame(index=["a"]), "")


def test_select_keeps_order_and_records_the_rest():
    picked = _toy().select(["car", "dog"])
    assert picked.concepts == ("car", "dog")
    np.testing.assert_array_equal(picked.values, [[4, 5], [0, 1]])
    assert list(picked.metadata["kind"]) == ["vehicle", "animal"]
    assert picked.dropped.to_dict("records") == [{"concept": "cat", "reason": "not selected"}]
    with pytest.raises(InputError, match="'cow' are not concepts of these norms"):
        _toy().select(["cow"])


def test_align_to_prompts_reports_both_sides():
    aligned = align(_toy(), ["car", "cow", "dog"])
    assert aligned.concepts == ("car", "dog")
    assert dict(zip(aligned.dropped["concept"], aligned.dropped["reason"])) == {
        "cat": "not among the prompted concepts",
        "cow": "prompted, but not rated by toy",
    }
    assert aligned.groups == {"size": "body", "speed": "motion"} and aligned.group_names() == ["body", "motion"]


def test_align_without_overlap_is_a_clear_error():
    message = r"none of the 2 prompted concepts \('Dog', 'tree'\) is rated by the toy.*'Dog' would match if case"
    with pytest.raises(InputError, match=message):
        align(_toy(), ["Dog", "tree"])
    with pytest.raises(InputError, match="prompted concept must appear once"):
        align(_toy(), ["dog", "dog"])


def test_dropped_reasons_accumulate(binder: Norms):
    aligned = align(binder, ["activist", "accordion"])
    assert len(aligned.dropped) == 535 - 2
    assert (aligned.dropped["reason"] == "not among the prompted concepts").sum() == 275 - 2


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from([None, "x", "y"])), max_size=8))
def test_prompt_words_are_unique_or_none(entries):
    words, senses = [w for w, _ in entries], [s for _, s in entries]
    names = prompt_words(words, senses)
    kept = [n for n in names if n is not None]
    assert len(kept) == len(set(kept))
    for word, sense, name in zip(words, senses, names):
        if words.count(word) == 1:
            assert name == word  # an unshared word is prompted bare, whatever its sense


# --- user files --------------------------------------------------------------------------------------


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_wide_csv_and_tsv(tmp_path):
    csv = load_norms_file(_write(tmp_path, "mine.csv", "concept,size,speed\ndog,3,4.5\ncat,na,\n\ncar,1e1,2\n"))
    tsv = load_norms_file(_write(tmp_path, "mine.tsv", "Concept\tsize\tspeed\ndog\t3\t4.5\ncat\tNA\tn/a\ncar\t10\t2\n"))
    for norms in (csv, tsv):
        assert norms.name == "mine" and norms.concepts == ("dog", "cat", "car")
        assert norms.attributes == ("size", "speed") and norms.groups == {"size": "all", "speed": "all"}
        np.testing.assert_array_equal(norms.values, [[3, 4.5], [np.nan, np.nan], [10, 2]])


def test_wide_with_groups_file_and_bom(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("concept,size,speed\r\ndog,1,2\r\n".encode("utf-8-sig"))
    groups = _write(tmp_path, "groups.tsv", "attribute\tgroup\nspeed\tmotion\nsize\tbody\n")
    norms = load_norms_file(path, groups=groups)
    assert norms.concepts == ("dog",) and norms.groups == {"size": "body", "speed": "motion"}
    assert norms.group_names() == ["body", "motion"]


def test_long_layout_with_and_without_group_column(tmp_path):
    text = "concept,attribute,value,group\ndog,size,3,body\ncat,speed,2,motion\ndog,speed,5,motion\n"
    norms = load_norms_file(_write(tmp_path, "long.csv", text))
    assert norms.concepts == ("dog", "cat") and norms.attributes == ("size", "speed")
    np.testing.assert_array_equal(norms.values, [[3, 5], [np.nan, 2]])  # an unlisted pair is missing
    assert norms.groups == {"size": "body", "speed": "motion"}
    plain = load_norms_file(_write(tmp_path, "plain.csv", "concept,attribute,value\ndog,size,3\n"), layout="long")
    assert plain.values.tolist() == [[3.0]] and plain.groups == {"size": "all"}


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.data())
def test_wide_and_long_files_round_trip(tmp_path_factory, n_concepts, n_attributes, data):
    values = data.draw(
        st.lists(
            st.one_of(st.none(), st.floats(-1e6, 1e6, allow_nan=False)),
            min_size=n_concepts * n_attributes,
            max_size=n_concepts * n_attributes,
        )
    )
    values = np.array([np.nan if v is None else v for v in values]).reshape(n_concepts, n_attributes)
    concepts, attributes = [f"c{i}" for i in range(n_concepts)], [f"a{j}" for j in range(n_attributes)]
    frame = pd.DataFrame(values, index=pd.Index(concepts, name="concept"), columns=attributes)
    folder = tmp_path_factory.mktemp("round_trip")
    frame.to_csv(folder / "wide.csv", float_format="%.17g")
    long = frame.reset_index().melt("concept", var_name="attribute").dropna()
    long.to_csv(folder / "long.csv", index=False, float_format="%.17g")
    wide = load_norms_file(folder / "wide.csv")
    np.testing.assert_array_equal(wide.values, values)
    if not long.empty:  # a long file lists only the rated pairs
        from_long = load_norms_file(folder / "long.csv")
        np.testing.assert_array_equal(from_long.to_frame().reindex(index=frame.index, columns=frame.columns), frame)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("dup.csv", "concept,size\ndog,1\ncat,2\ndog,3\n", r"concepts appear more than once \('dog' on lines 2, 4\)"),
        ("cells.csv", "concept,size,speed\ndog,1,fast\ncat,2,3\n", r"line 2, column 'speed': 'fast'"),
        ("decimal.csv", "concept\tsize\ndog\t1,5\n", r"line 2, column 'size': '1,5'.*'\.' decimal point"),
        ("inf.csv", "concept,size\ndog,inf\n", r"not finite numbers \(line 2, column 'size': 'inf'\)"),
        ("empty.csv", "", r"empty.csv is empty"),
        ("blank.tsv", "\n\n  \n", r"blank.tsv is empty"),
        ("header.csv", "concept,size\n", r"has a header but no rows"),
        ("noconcept.csv", "word,size\ndog,1\n", r"no 'concept' column \(columns: 'word', 'size'\); name the column"),
        ("ragged.csv", "concept,size\ndog,1,2\n", r"ragged.csv, line 2: 3 fields, but the header has 2"),
        ("twice.csv", "concept,size,Size\ndog,1,2\n", r"columns 'size' appear more than once"),
        ("noname.csv", "concept,,size\ndog,1,2\n", r"header columns \[2\] have no name"),
        ("noattr.csv", "concept\ndog\n", r"no attribute columns"),
        ("blankconcept.csv", "concept,size\n,1\n", r"column 'concept' is empty on lines 2"),
        ("pairs.csv", "concept,attribute,value\ndog,size,1\ndog,size,2\n", r"\('dog', 'size'\) on lines 2, 3"),
        (
            "conflict.csv",
            "concept,attribute,value,group\ndog,size,1,a\ncat,size,2,b\n",
            r"line 3: attribute 'size' is in group 'b' here but 'a' earlier",
        ),
        ("longvalue.csv", "concept,attribute,value\ndog,size,big\n", r"line 2, column 'value': 'big'"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path, name, text, message):
    with pytest.raises(InputError, match=message):
        load_norms_file(_write(tmp_path, name, text))


def test_bad_layout_and_groups(tmp_path):
    wide = _write(tmp_path, "wide.csv", "concept,size,speed\ndog,1,2\n")
    with pytest.raises(InputError, match="no 'attribute' column .* the long layout needs columns concept, attribute"):
        load_norms_file(wide, layout="long")
    extra = _write(tmp_path, "extra.csv", "concept,attribute,value,note\ndog,size,1,x\n")
    with pytest.raises(InputError, match="columns 'note' are not part of the long layout"):
        load_norms_file(extra, layout="long")
    with pytest.raises(InputError, match="layout must be one of"):
        load_norms_file(wide, layout="tall")
    with pytest.raises(InputError, match="norms file .*missing.csv does not exist"):
        load_norms_file(tmp_path / "missing.csv")
    unknown = _write(tmp_path, "g1.csv", "attribute,group\nsize,a\nspeed,b\nweight,c\n")
    with pytest.raises(InputError, match="names attributes the norms do not have: 'weight'"):
        load_norms_file(wide, groups=unknown)
    partial = _write(tmp_path, "g2.csv", "attribute,group\nsize,a\n")
    with pytest.raises(InputError, match="gives no group to attributes 'speed'; add a row"):
        load_norms_file(wide, groups=partial)
    both = _write(tmp_path, "long.csv", "concept,attribute,value,group\ndog,size,1,a\n")
    with pytest.raises(InputError, match="has a 'group' column and a groups file"):
        load_norms_file(both, groups=partial)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("concept,size\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8 text"):
        load_norms_file(latin)


def test_user_file_with_no_overlap_with_the_prompts(tmp_path):
    norms = load_norms_file(_write(tmp_path, "mine.csv", "concept,size\ndog,1\ncat,2\n"))
    with pytest.raises(InputError, match=r"none of the 1 prompted concepts \('airplane'\) is rated by the mine norms"):
        align(norms, ["airplane"])


# --- by name -----------------------------------------------------------------------------------------


def test_load_norms_by_name_and_path(tmp_path, binder: Norms):
    assert set(NORMS) == {"binder", "mcrae", "things", "things66", "concreteness"}
    assert all(isinstance(text, str) and text for text in NORMS.values())
    assert load_norms("binder").concepts == binder.concepts
    assert len(load_norms("things66").attributes) == 66
    assert load_norms("mcrae", min_concepts=1).values.shape == (541, 2526)
    path = _write(tmp_path, "mine.csv", "concept,size\ndog,1\n")
    assert load_norms(str(path)).concepts == ("dog",)
    with pytest.raises(InputError, match="unknown norms 'bindr': give one of binder, mcrae"):
        load_norms("bindr")
    with pytest.raises(InputError, match="norms 'things' take the options dims; got dimensions"):
        load_norms("things", dimensions=66)
