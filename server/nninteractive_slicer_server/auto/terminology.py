"""SNOMED CT codes for the segment names of a registry entry's inline metadata (``segment_names``), found the way the
established nnU-Net server finds them for its DICOM SEG metadata when a name comes without a ``code``:

* the name, without "left" / "right" and without spaces and underscores, capitalised, is looked up among the SNOMED
  CT concepts DICOM defines (pydicom's concept dictionary: "liver" -> Liver, 10200004; "SpinalCord" -> 2748008).
  *Ours*: a name of several words is also tried as its words capitalised and joined ("spinal cord" -> SpinalCord),
  which the established lookup (it drops the spaces first) does not find;
* the category is the one DICOM itself gives the type: the context groups CID 7191-7198 list the segmentation
  property types of each category (Tissue, Anatomical Structure, Physical Object, Morphologically Abnormal
  Structure, Function, Spatial and Relational Concept, Body Substance, Substance); a type in none of them gets
  Tissue. *Ours*: the established server keeps a table of its own for this; DICOM's groups agree with it for the
  organs, lesions and devices we checked;
* "left" / "right" (a word of the label or the name) adds the SNOMED CT laterality type modifier (Left 7771000,
  Right 24028007), and puts the side in front of the label when it does not say it already (not for morphologically
  abnormal structures), as established.

A name that resolves to nothing keeps Slicer's default coding (Tissue / Tissue) here, with a warning when the
registry is loaded; the established server refuses such a name.
"""

import difflib
import functools
import re

SCT = "SCT"
TISSUE = "85756007"
MORPHOLOGICALLY_ABNORMAL = "49755003"
# DICOM PS3.16: the context group of each segmentation property category's types -> that category (SNOMED CT).
CATEGORY_GROUPS = {7191: ("85756007", "Tissue"), 7192: ("91723000", "Anatomical Structure"),
                   7193: ("260787004", "Physical Object"),
                   7194: ("49755003", "Morphologically Abnormal Structure"), 7195: ("246464006", "Function"),
                   7196: ("309825002", "Spatial and Relational Concept"), 7197: ("91720002", "Body Substance"),
                   7198: ("105590001", "Substance")}
LATERALITY = {"Left": "7771000", "Right": "24028007"}
_SIDE = re.compile(r"(?<![a-z])([Ll]eft|[Rr]ight|LEFT|RIGHT)(?![a-z])")  # a word: "kidney_left", "LeftLung"


@functools.lru_cache(maxsize=1)
def _concepts():
    """``(by_keyword, groups_by_code)``: pydicom's SNOMED CT concepts ``{keyword: (code, meaning)}`` and the
    context groups each code belongs to (under any of its keywords)."""
    from pydicom.sr._concepts_dict import concepts

    by_keyword, groups = {}, {}
    for keyword, entries in concepts[SCT].items():
        for code, (meaning, cids) in entries.items():
            by_keyword.setdefault(keyword, (code, meaning))
            groups.setdefault(code, set()).update(cids)
    return by_keyword, groups


def side_of(*texts):
    """"Left", "Right" or None: the first side a text names as a word ("kidney_left", "Left lung")."""
    for text in texts:
        m = _SIDE.search(text or "")
        if m:
            return m.group(1).capitalize()
    return None


def _keys(name):
    """The dictionary keywords a name may stand for: the established key first, then ours."""
    bare = _SIDE.sub(" ", name).strip(" _-")
    established = re.sub(r"[ _]+", "", bare)
    if established[:1].islower():
        established = established.capitalize()
    words = "".join(w[:1].upper() + w[1:] for w in re.split(r"[ _\-]+", bare) if w)
    return [k for k in dict.fromkeys((established, words)) if k]


def category_of(code):
    """``(code, meaning)`` of the SNOMED CT segmentation category of type ``code`` (Tissue when DICOM's groups do
    not place it)."""
    groups = _concepts()[1].get(str(code), set())
    for cid in sorted(groups):
        if cid in CATEGORY_GROUPS:
            return CATEGORY_GROUPS[cid]
    return CATEGORY_GROUPS[7191]


def lookup(name):
    """``(code, meaning)`` of the SNOMED CT concept a segment name stands for, or None."""
    by_keyword = _concepts()[0]
    for key in _keys(str(name)):
        if key in by_keyword:
            return by_keyword[key]
    return None


def closest(name, n=3):
    """Dictionary keywords close to what ``name`` was looked up as (for a warning)."""
    keys = _keys(str(name))
    return difflib.get_close_matches(keys[-1] if keys else str(name), list(_concepts()[0]), n=n, cutoff=0.8)


def code(value, scheme, meaning):
    return {"CodeValue": str(value), "CodingSchemeDesignator": scheme or SCT, "CodeMeaning": str(meaning)}


def coded_segment(name, label=None, type_code=None, scheme=None, category=None):
    """``(label, terminology)`` of one inline segment (see the module's notes): ``terminology`` as
    ``registry.Segment`` holds it (``type``, ``category``, ``type_modifier``), or None when the name resolves to
    nothing and no code is given. ``category``: the category code the entry gives (``category_number``)."""
    label = label or name
    scheme = scheme or SCT
    if type_code is None:
        if scheme != SCT:
            return label, None  # automatic lookup is SNOMED CT's only here
        found = lookup(name)
        if found is None:
            return label, None
        type_code, meaning = found
    else:
        meaning = _SIDE.sub(" ", str(name)).strip(" _-") or str(name)
    if category is not None:
        cat_value = str(category)
        cat_meaning = next((m for v, m in CATEGORY_GROUPS.values() if v == cat_value), "")
    elif scheme == SCT:
        cat_value, cat_meaning = category_of(type_code)
    else:
        cat_value, cat_meaning = None, None
    term = {"type": code(type_code, scheme, meaning)}
    if cat_value is not None:
        term["category"] = code(cat_value, SCT, cat_meaning)  # categories are SNOMED CT's (CID 7150)
    side = side_of(label, name)
    if side:
        term["type_modifier"] = code(LATERALITY[side], SCT, side)
        if cat_value != MORPHOLOGICALLY_ABNORMAL and side.lower() not in label.lower():
            label = "%s %s" % (side, label)
    return label, term
