"""Every resource file is read, validated and cached one way (pipeline.resources)."""

import os
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.analysis.classify.taxonomy import Taxonomy, load_taxonomy
from pipeline.cases.extract import CaseLexicon, load_lexicon
from pipeline.config import ConfigError
from pipeline.insights.cluster import CauseLexicon
from pipeline.resources import AsrCorrections, CauseLexiconFile, EmotionLexicon, cached, load_resource, parse_resource
from pipeline.text.prepare import get_masker, get_normalizer

# Every YAML resource the config names, with its model and a top-level key of the file.
YAML_RESOURCES = [
    ("classify.taxonomy", Taxonomy, "fallback"),
    ("cases.lexicon", CaseLexicon, "greetings"),
    ("cluster.cause_lexicon", CauseLexiconFile, "causes"),
    ("emotion.lexicon", EmotionLexicon, "labels"),
]


def _copy(cfg, key: str, tmp_path: Path) -> Path:
    src = cfg.resource_files()[key]
    dst = tmp_path / src.name
    shutil.copy(src, dst)
    return dst


def _edit(path: Path, change) -> None:
    """Rewrite a YAML file through `change(data)`, moving its mtime forward (coarse clocks)."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    change(data)
    before = path.stat().st_mtime_ns
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    os.utime(path, ns=(before + 10**9, before + 10**9))


@pytest.mark.parametrize("key,model,field", YAML_RESOURCES)
def test_every_shipped_resource_validates(cfg, key, model, field):
    loaded = load_resource(cfg, cfg.resource_files()[key], model)
    assert getattr(loaded, field)


@pytest.mark.parametrize("key,model,field", YAML_RESOURCES)
def test_misspelt_key_names_file_and_key_in_one_style(cfg, tmp_path, key, model, field):
    path = _copy(cfg, key, tmp_path)
    _edit(path, lambda d: d.__setitem__(field + "s_typo", d[field]))
    with pytest.raises(ConfigError) as e:
        load_resource(cfg, path, model)
    msg = str(e.value)
    assert msg.startswith(f"invalid {model.resource_kind} {path}:")
    assert f"  {field}s_typo: unknown key (check its spelling; see configs/" in msg


# (every key of the cause lexicon is optional)
@pytest.mark.parametrize("key,model,field", [r for r in YAML_RESOURCES if r[1] is not CauseLexiconFile])
def test_missing_required_key_is_named(cfg, tmp_path, key, model, field):
    path = _copy(cfg, key, tmp_path)
    _edit(path, lambda d: d.pop(field))
    with pytest.raises(ConfigError, match=rf"\n  {field}: required key is missing \(add it; see configs/"):
        load_resource(cfg, path, model)


def test_cache_returns_one_object_until_the_file_changes(cfg, tmp_path):
    path = _copy(cfg, "classify.taxonomy", tmp_path)
    first = load_resource(cfg, path, Taxonomy)
    assert load_resource(cfg, path, Taxonomy) is first
    _edit(path, lambda d: d["issue_types"][0].__setitem__("name", "改过的类型"))
    second = load_resource(cfg, path, Taxonomy)
    assert second is not first and second.labels[0] == "改过的类型"


def test_config_loaders_go_through_the_cache(cfg):
    assert load_taxonomy(cfg) is load_taxonomy(cfg)
    assert load_lexicon(cfg) is load_lexicon(cfg)
    assert get_normalizer(cfg) is get_normalizer(cfg)
    assert get_masker(cfg) is get_masker(cfg)


def test_missing_file_and_non_mapping_fail_clearly(cfg, tmp_path):
    with pytest.raises(ConfigError, match="is missing; it is named in the config"):
        load_resource(cfg, tmp_path / "nope.yaml", Taxonomy)
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="must hold a mapping of keys, not a list"):
        load_resource(cfg, bad, CaseLexicon)
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_resource(cfg, broken, AsrCorrections)


def test_asr_corrections_are_text_longest_first():
    table = parse_resource({"优惠卷": "优惠券", "卷": "券", 12315: 12345}, AsrCorrections, "t.yaml")
    pairs = table.longest_first()
    assert pairs.index(("优惠卷", "优惠券")) < pairs.index(("卷", "券")) and ("12315", "12345") in pairs
    with pytest.raises(ConfigError, match=r"invalid ASR corrections file t.yaml:\n  卷: "):
        parse_resource({"卷": ["a"]}, AsrCorrections, "t.yaml")


def test_normalizer_sees_an_edited_corrections_file(cfg, tmp_path):
    path = _copy(cfg, "normalize.asr_corrections", tmp_path)
    local = cfg.with_overrides(normalize={"asr_corrections": path})
    assert get_normalizer(local).normalize("我的快弟到了吗", asr=True) == "我的快弟到了吗"
    _edit(path, lambda d: d.__setitem__("快弟", "快递"))
    assert get_normalizer(local).normalize("我的快弟到了吗", asr=True) == "我的快递到了吗"


def test_emotion_labels_must_be_declared(cfg, tmp_path):
    path = _copy(cfg, "emotion.lexicon", tmp_path)
    _edit(path, lambda d: d.__setitem__("threat_label", "暴怒"))
    with pytest.raises(ConfigError, match=r"labels \['暴怒'\] are not in `labels`"):
        load_resource(cfg, path, EmotionLexicon)


def test_case_lexicon_refuses_the_old_emotion_block(cfg, tmp_path):
    path = _copy(cfg, "cases.lexicon", tmp_path)
    _edit(path, lambda d: d.__setitem__("emotion", {"angry": ["气死"]}))
    with pytest.raises(ConfigError, match="the `emotion` block is no longer read"):
        load_resource(cfg, path, CaseLexicon)


def test_cause_lexicon_unknown_category_is_a_config_error(cfg, tmp_path):
    path = _copy(cfg, "cluster.cause_lexicon", tmp_path)
    _edit(path, lambda d: d["causes"][0].__setitem__("category", "weather"))
    local = cfg.with_overrides(cluster={"cause_lexicon": path})
    with pytest.raises(ConfigError, match=rf"invalid cause lexicon {path}: .*'weather'"):
        CauseLexicon.load(local)


def test_cached_rebuilds_on_change_and_keeps_failures_out(tmp_path):
    f = tmp_path / "words.txt"
    f.write_text("a\n", encoding="utf-8")
    calls = []

    def build():
        calls.append(1)
        return f.read_text(encoding="utf-8").split()

    kind = ("words", str(f))
    assert cached(kind, [f], build) == ["a"] and cached(kind, [f], build) == ["a"]
    assert len(calls) == 1
    assert cached(("other kind", str(f)), [f], lambda: "x") == "x"  # same file, another kind
    f.write_text("a\nb\n", encoding="utf-8")  # size changes even if the mtime tick does not
    assert cached(kind, [f], build) == ["a", "b"] and len(calls) == 2

    asked = []

    def files():  # called only when building: a hit re-checks the files it gave then
        asked.append(1)
        return [f]

    assert cached(("lazy", str(f)), files, lambda: 1) == 1 and cached(("lazy", str(f)), files, lambda: 2) == 1
    assert len(asked) == 1
    f.write_text("c\n", encoding="utf-8")
    assert cached(("lazy", str(f)), files, lambda: 3) == 3 and len(asked) == 2

    def fail():
        raise ValueError("boom")

    with pytest.raises(ValueError):
        cached(("failing", str(f)), [f], fail)
    with pytest.raises(ValueError):  # not cached: built (and failing) again
        cached(("failing", str(f)), [f], fail)
