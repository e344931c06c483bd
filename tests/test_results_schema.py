"""The typed results.json schema reads every layout written so far and writes each back unchanged.

Fixtures (tests/data/results/):
- results_v1.0.json: written by ``dgzoo train`` at commit 703c52a plus the format_version it now writes (tiny ERM run, tests/conftest.py's
  ``tiny_config`` with steps=4, eval_every=2).
- results_v0.1.json: the same run in the 0.1 layout, reconstructed from the 0.1 engine (``git show
  b591f16:dgzoo/engine.py``, ``_results``): no dataset fingerprint, init_from, derived, splits or code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dgzoo.errors import DGZooError
from dgzoo.run.results import (
    FORMAT_VERSION,
    DatasetRef,
    RunResults,
    Selection,
    SelectionResult,
    Timing,
)

DATA = Path(__file__).parent / "data" / "results"


def load(name: str) -> dict:
    return json.loads((DATA / name).read_text())


@pytest.mark.parametrize("name", ["results_v0.1.json", "results_v1.0.json"])
def test_round_trip_keeps_every_key_in_order_and_adds_format_version(name):
    raw = load(name)
    res = RunResults.from_json(raw)
    assert res.format_version == ("0.1" if name.endswith("v0.1.json") else FORMAT_VERSION)
    out = res.to_json()
    assert json.dumps(out) == json.dumps({**raw, "format_version": res.format_version})


def test_legacy_file_reads_typed_attributes():
    res = RunResults.from_json(load("results_v0.1.json"))
    assert res.format_version == "0.1"
    assert isinstance(res.dataset, DatasetRef) and res.dataset.name == "rotated-digits"
    assert res.dataset.fingerprint is None and "fingerprint" not in res.to_json()["dataset"]
    assert isinstance(res.selection, Selection) and res.selection.method == "training_domain_validation"
    assert isinstance(res.timing, Timing) and res.timing.train_images > 0
    assert all(isinstance(s, SelectionResult) for s in res.selections.values())
    assert res.init_from is None and "init_from" not in res.to_json()


def test_current_file_selection_agrees_with_its_selections():
    res = RunResults.from_json(load("results_v1.0.json"))
    chosen = res.selections[res.selection.method]
    assert (chosen.step, chosen.score) == (res.selection.step, res.selection.score)
    assert chosen.accuracy == res.accuracy and chosen.target_accuracy == res.target_accuracy


def test_unknown_keys_are_kept_where_they_were():
    raw = load("results_v1.0.json")
    items = list(raw.items())
    raw = dict(items[:3] + [("my_tool", {"members": 3})] + items[3:])
    raw["timing"] = {**raw["timing"], "eval_seconds": 1.5}
    out = RunResults.from_json(raw).to_json()
    assert list(out)[3] == "my_tool" and out["timing"]["eval_seconds"] == 1.5


def test_new_record_writes_format_version_and_field_order():
    res = RunResults(
        algorithm="ERM",
        selection=Selection(method="oracle", step=3, score=0.5),
        timing=Timing(train_seconds=1.0, images_per_second=2.0, train_images=2, steps_per_second=1.0),
    )
    out = res.to_json()
    assert out["format_version"] == FORMAT_VERSION and next(iter(out)) == "algorithm"
    assert out["selection"] == {"method": "oracle", "step": 3, "score": 0.5}
    assert RunResults.from_json(json.loads(json.dumps(out))) == res


def test_newer_format_is_refused_with_one_line():
    raw = {**load("results_v1.0.json"), "format_version": "99.0"}
    with pytest.raises(DGZooError, match="newer than this dgzoo reads.*upgrade dgzoo"):
        RunResults.from_json(raw)


def test_not_a_results_file_is_refused():
    with pytest.raises(DGZooError, match="lacks algorithm"):
        RunResults.from_json({"accuracy": {}})


def test_training_writes_the_current_format(trained_run):
    run_dir, returned = trained_run
    written = json.loads((run_dir / "results.json").read_text())
    assert written["format_version"] == FORMAT_VERSION == returned["format_version"]
    assert RunResults.load(run_dir / "results.json").to_json() == written


def test_soup_kind_and_unlearning_blocks_are_typed_and_written_back_where_they_were():
    raw = load("results_v1.0.json")
    items = list(raw.items())
    raw = dict(items[:3] + [("soup", {"label": "uniform soup of 2", "command": "dgzoo soup a b"})] + items[3:])
    res = RunResults.from_json(raw)
    assert res.is_soup and res.soup == raw["soup"] and "soup" not in res.extra
    assert json.dumps(res.to_json()) == json.dumps(raw)
    plain = RunResults.from_json(load("results_v1.0.json"))
    assert not plain.is_soup and plain.kind is None and plain.unlearning is None
    assert not {"soup", "kind", "unlearning"} & set(plain.to_json())
    with pytest.raises(KeyError, match="unlearning"):
        plain.require("unlearning")


def test_split_seed_falls_back_to_the_seed_only_when_the_file_lacks_it():
    raw = {**load("results_v0.1.json"), "seed": 3, "split_seed": 7}
    assert RunResults.from_json(raw).data_split_seed == 7
    del raw["split_seed"]
    assert RunResults.from_json(raw).data_split_seed == 3


def test_the_report_reads_a_v0_1_run_directory(tmp_path):
    from dgzoo.experiments.report import load_runs

    raw = load("results_v0.1.json")
    run = tmp_path / "old_run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(raw))
    record = {"step": raw["steps"], "acc": {d: {"in": 0.5, "out": 0.25} for d in raw["accuracy"]}}
    (run / "records.jsonl").write_text(json.dumps(record) + "\n")
    runs, notes = load_runs([tmp_path])
    assert not notes and len(runs) == 1
    found = runs[0]
    assert (found.dataset, found.algorithm, found.backbone, found.targets, found.trial) == (
        "rotated-digits",
        "erm",
        raw["backbone"],
        ("75",),
        "0",
    )
    assert found.sources == tuple(raw["source_domains"]) and found.hparams == raw["hparams"]


def test_soup_ingredients_read_a_v0_1_run():
    from dgzoo.experiments.soup_ingredients import cell_name, init_key, is_soup

    res = RunResults.from_json(load("results_v0.1.json"))
    assert cell_name(res) == "rotated-digits/erm/75/trial0"
    assert init_key(res) == ("seed", "0") and not is_soup(res)


def test_cards_of_a_v0_1_run_read_its_soup_and_unlearning_blocks():
    from dgzoo.run.cards import zoo_metadata
    from dgzoo.run.unlearning_card import model_name

    raw = load("results_v0.1.json")
    assert "soup" not in zoo_metadata(raw)
    assert zoo_metadata({**raw, "soup": {"label": "uniform soup of 2"}})["soup"] == "uniform soup of 2"
    unlearned = {**raw, "kind": "unlearning", "unlearning": {"forget_spec": "class=3 domain=0"}}
    assert model_name(unlearned) == f"{raw['backbone']}.erm-unlearned.rotated-digits-class3_domain0"


def test_the_report_skips_a_run_written_by_a_newer_dgzoo_with_a_note_to_upgrade(tmp_path):
    from dgzoo.experiments.report import load_runs

    for name, raw in (
        ("old", load("results_v0.1.json")),
        ("newer", {**load("results_v1.0.json"), "format_version": "2.0"}),
    ):
        run = tmp_path / name
        run.mkdir()
        (run / "results.json").write_text(json.dumps(raw))
        record = {"step": raw["steps"], "acc": {d: {"in": 0.5, "out": 0.25} for d in raw["accuracy"]}}
        (run / "records.jsonl").write_text(json.dumps(record) + "\n")
    runs, notes = load_runs([tmp_path])
    assert [r.path.name for r in runs] == ["old"]
    assert len(notes) == 1 and "newer" in notes[0] and "upgrade dgzoo" in notes[0]
