"""Label maps: inline text, YAML/JSON files, presets, and clear errors for malformed specs."""

import json
from pathlib import Path

import pytest

from cxr_fast.data.labels import PRESETS, map_label, parse_label_map
from cxr_fast.errors import CxrFastError

CXR_DEV = {"Covid-19": "COVID-19", "No_findings": "Normal", "Pneumonia": "Pneumonia"}


def test_none_and_empty_mean_no_map():
    assert parse_label_map(None) is None
    assert parse_label_map("  ") is None
    assert map_label("Whatever", None) == "Whatever"


def test_inline():
    assert parse_label_map("Covid-19=COVID-19,No_findings=Normal,Pneumonia=Pneumonia") == CXR_DEV
    # spaces around names and a trailing comma are tolerated; spaces inside names are kept
    assert parse_label_map(" Viral pneumonia = Pneumonia , Normal=Normal,") == {
        "Viral pneumonia": "Pneumonia",
        "Normal": "Normal",
    }


def test_yaml_and_json_files(tmp_path):
    (tmp_path / "map.yaml").write_text("Covid-19: COVID-19\nNo_findings: Normal\nPneumonia: Pneumonia\n")
    (tmp_path / "map.json").write_text(json.dumps(CXR_DEV))
    assert parse_label_map(tmp_path / "map.yaml") == CXR_DEV
    assert parse_label_map(str(tmp_path / "map.json")) == CXR_DEV


def test_preset():
    mendeley = parse_label_map("mendeley")
    assert mendeley == {
        "COVID-19": "COVID-19",
        "Normal": "Normal",
        "Pneumonia-Bacterial": "Pneumonia",
        "Pneumonia-Viral": "Pneumonia",
    }
    assert parse_label_map("Mendeley") == mendeley
    mendeley["Normal"] = "changed"  # the caller gets a copy: the preset itself is untouched
    assert PRESETS["mendeley"]["Normal"] == "Normal"


def test_dict_is_validated():
    assert parse_label_map({"A": "B"}) == {"A": "B"}
    with pytest.raises(CxrFastError, match="non-empty label"):
        parse_label_map({"A": ""})


@pytest.mark.parametrize(
    "spec, message",
    [
        ("a=b=c", "should be 'folder=label'"),
        ("=Normal", "empty folder or label"),
        ("Normal=", "empty folder or label"),
        ("A=X,A=Y", "mapped twice"),
        # folder names match loosely: the folder Normal took 'Other' and the second entry went unused, unsaid
        ("Normal=Other,normal=Normal", "folders 'Normal' and 'normal' differ only in case.* different labels "
                                       r"\('Other' and 'Normal'\)"),
        ("Pneumonia-Viral=Pneumonia,Pneumonia-Bacterial=pneumonia", "labels 'Pneumonia' and 'pneumonia' differ only"),
        ("nonsense", "neither a file, a preset"),
        ("missing.yaml", "not found"),
        (",", "neither a file"),
    ],
)
def test_malformed_inline_specs(spec, message):
    with pytest.raises(CxrFastError, match=message):
        parse_label_map(spec)


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("list.yaml", "- Normal\n- COVID-19\n", "must be a mapping"),
        ("nested.yaml", "Normal: {a: b}\n", "non-empty label"),
        ("number.yaml", "1: Normal\n", "must be text"),
        ("broken.json", '{"Normal": "Normal",', "not valid JSON"),
        ("broken.yaml", "Normal: [unclosed\n", "not valid YAML"),
        ("empty.yaml", "{}\n", "empty"),
    ],
)
def test_malformed_files(tmp_path: Path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(CxrFastError, match=message) as caught:
        parse_label_map(tmp_path / name)
    assert name in str(caught.value)  # the message names the file


def test_folders_alike_with_one_label_are_fine_and_files_are_checked_too(tmp_path):
    assert parse_label_map("COVID=COVID-19,covid=COVID-19") == {"COVID": "COVID-19", "covid": "COVID-19"}
    (tmp_path / "map.yaml").write_text("Normal: Normal\nNORMAL: Other\n")
    with pytest.raises(CxrFastError, match="map.yaml: folders 'Normal' and 'NORMAL' differ only in case"):
        parse_label_map(tmp_path / "map.yaml")


def test_map_label_prefers_exact_then_unambiguous_case_insensitive():
    mapping = {"COVID": "COVID-19", "Normal": "Normal"}
    assert map_label("COVID", mapping) == "COVID-19"
    assert map_label("covid", mapping) == "COVID-19"
    assert map_label("Pneumonia", mapping) is None
    ambiguous = {"covid": "A", "COVID": "B"}
    assert map_label("Covid", ambiguous) is None
    assert map_label("covid", ambiguous) == "A"


def test_a_folder_name_in_another_unicode_form_or_with_spaces_still_matches():
    import unicodedata

    decomposed = unicodedata.normalize("NFD", "Neumonía")  # as macOS writes folder names
    assert map_label(decomposed, {"Neumonía": "Pneumonia"}) == "Pneumonia"
    assert map_label("Pneumonia ", {"pneumonia": "Pneumonia"}) == "Pneumonia"


def test_folders_alike_with_one_label_map_any_spelling_of_the_folder():
    # the map passes the consistency check (both spellings say COVID-19), so a third spelling must find that label
    mapping = parse_label_map("COVID=COVID-19,covid=COVID-19")
    assert map_label("Covid", mapping) == "COVID-19"


def test_names_from_files_and_dicts_are_trimmed_as_inline_ones_are(tmp_path):
    assert parse_label_map({" Viral pneumonia ": " Pneumonia "}) == {"Viral pneumonia": "Pneumonia"}
    (tmp_path / "map.yaml").write_text('" No_findings ": " Normal "\n')
    assert parse_label_map(tmp_path / "map.yaml") == {"No_findings": "Normal"}


def test_a_label_map_with_yaml_aliases_is_refused(tmp_path):
    # An error message shows the offending value: an alias nested nine deep would print a billion labels.
    (tmp_path / "map.yaml").write_text("Covid-19: &c COVID-19\nCOVID: *c\n")
    with pytest.raises(CxrFastError, match=r"map.yaml: label map is not valid YAML \(found alias \*c"):
        parse_label_map(tmp_path / "map.yaml")
