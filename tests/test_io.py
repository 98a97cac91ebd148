"""Imports (folder, COCO, JSONL, HF dataset, LLaVA, LLaMA-Factory), exports, round trips, and
TRL's DPOTrainer on an exported dataset."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
from conftest import huge_png_bytes, image_bytes, noise_image, write_image

from lvlm_studio import io
from lvlm_studio.media import stored_files
from lvlm_studio.store import Store, StoreError


def assert_consistent(store, settings):
    """Integrity, foreign keys, every image row has its file and every file has its row."""
    report = store.integrity()
    assert report["integrity_check"] == ["ok"]
    assert report["foreign_key_violations"] == []
    assert report["missing_files"] == []
    on_disk = stored_files(settings)
    referenced = {Path(p).resolve() for p in store.image_paths().values()}
    assert on_disk == referenced, f"orphans: {on_disk - referenced}"
    assert not list(settings.images_dir.rglob(".tmp-*"))


def issue_folder(root: Path) -> Path:
    """The folder from the issue: one good JPEG, one truncated JPEG, a text file named .png, a
    zero-byte file and a 30000x30000 PNG."""
    root.mkdir(parents=True, exist_ok=True)
    write_image(root / "good.jpg", seed=1, size=(48, 32))
    (root / "good.txt").write_text("A colourful noise pattern.\n")
    truncated = image_bytes(2, "JPEG", (64, 64))
    (root / "truncated.jpg").write_bytes(truncated[: len(truncated) // 2])
    (root / "notes.png").write_text("this is not an image\n")
    (root / "empty.jpg").write_bytes(b"")
    (root / "huge.png").write_bytes(huge_png_bytes(30000, 30000))
    return root


# ============================================================================ imports
def test_issue_folder_partial_import(store, settings, tmp_path):
    report = io.import_path(store, settings, issue_folder(tmp_path / "upload"))
    assert report.format == "folder" and report.status == "partial"
    assert report.imported == 1 and report.skipped == 4 and len(report.errors) == 4
    by_file = {e.split(":", 1)[0]: e for e in report.errors}
    assert set(by_file) == {"truncated.jpg", "notes.png", "empty.jpg", "huge.png"}
    assert "truncated" in by_file["truncated.jpg"]
    assert "not a recognised image" in by_file["notes.png"]
    assert "empty file" in by_file["empty.jpg"]
    assert "30000x30000" in by_file["huge.png"] or "pixels" in by_file["huge.png"]
    [item] = store.list_items()
    assert item["reference"] == "A colourful noise pattern." and item["prompt"] == io.DEFAULT_PROMPT
    assert item["meta"] == {"file": "good.jpg"} and (item["width"], item["height"]) == (48, 32)
    assert store.stats()["tables"]["images"] == 1
    assert_consistent(store, settings)
    # Importing again is idempotent.
    again = io.import_path(store, settings, tmp_path / "upload")
    assert again.imported == 1 and store.count_items() == 1


def test_folder_import_nested_ignored_hidden_and_symlink(store, settings, tmp_path):
    root = tmp_path / "f"
    write_image(root / "a.png", seed=3)
    write_image(root / "sub" / "b.jpg", seed=4)
    write_image(root / ".hidden" / "c.png", seed=5)
    (root / "README.md").write_text("hi")
    outside = write_image(tmp_path / "outside.png", seed=6)
    os.symlink(outside, root / "link.png")
    report = io.import_path(store, settings, root, "folder", dataset="mine", split="test")
    assert report.imported == 2 and report.ignored == 1
    assert report.errors == ["link.png: symlink points outside the import folder"]
    items = store.list_items(dataset="mine", split="test")
    assert sorted(i["meta"]["file"] for i in items) == ["a.png", "sub/b.jpg"]
    assert_consistent(store, settings)


def test_empty_folder_fails(store, settings, tmp_path):
    (tmp_path / "none").mkdir()
    report = io.import_path(store, settings, tmp_path / "none", "folder")
    assert report.status == "failed" and "nothing to import" in report.errors[0]


def _coco(root: Path) -> Path:
    (root / "annotations").mkdir(parents=True)
    images = [
        {"id": 1, "file_name": "000001.jpg", "width": 32, "height": 24},
        {"id": 2, "file_name": "000002.jpg", "width": 32, "height": 24},
        {"id": 3, "file_name": "000003.jpg", "width": 32, "height": 24},  # file missing
        {"id": 4, "file_name": "../../escape.jpg", "width": 32, "height": 24},
    ]
    write_image(root / "val2017" / "000001.jpg", seed=11)
    write_image(root / "val2017" / "000002.jpg", seed=12)
    captions = {
        "images": images,
        "annotations": [
            {"id": 1, "image_id": 1, "caption": "A dog on a couch."},
            {"id": 2, "image_id": 1, "caption": "A brown dog sleeping."},
            {"id": 3, "image_id": 2, "caption": "A kitchen."},
        ],
    }
    instances = {
        "images": images,
        "categories": [{"id": 18, "name": "dog"}, {"id": 63, "name": "couch"}, {"id": 44, "name": "bottle"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 18},
            {"id": 2, "image_id": 1, "category_id": 63},
            {"id": 3, "image_id": 1, "category_id": 18},
        ],
    }
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps(captions))
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(instances))
    return root


def test_coco_import(store, settings, tmp_path):
    root = _coco(tmp_path / "coco")
    assert io.detect_format(root) == "coco"
    report = io.import_path(store, settings, root)
    assert report.imported == report.new_items == 2 and report.status == "partial"
    again = io.import_path(store, settings, root)  # nothing new: the records land on the items they are
    assert (again.imported, again.new_items, again.pairs) == (2, 0, 0)
    assert any("image 3" in e and "000003.jpg" in e and "file not found" in e for e in report.errors)
    assert any("image 4" in e and "escapes the import root" in e for e in report.errors)
    items = {i["meta"]["coco_id"]: i for i in store.list_items()}
    assert items[1]["objects"] == ["couch", "dog"] and items[1]["reference"] == "A dog on a couch."
    assert items[1]["meta"]["captions"] == ["A dog on a couch.", "A brown dog sleeping."]
    assert items[2]["objects"] == []  # listed in instances with no annotation: known to be empty
    assert items[1]["dataset"] == "coco" and items[1]["split"] == "val"
    # Pointing at the captions file finds the instances beside it.
    other = Store(tmp_path / "other" / "studio.db")
    report = io.import_path(other, settings, root / "annotations" / "captions_val2017.json")
    assert report.imported == 2 and sorted(i["objects"] == ["couch", "dog"] for i in other.list_items()) == [
        False,
        True,
    ]
    other.close()
    assert_consistent(store, settings)


def test_jsonl_import_with_bad_lines_and_escapes(store, settings, tmp_path):
    root = tmp_path / "j"
    write_image(root / "imgs" / "a.png", seed=21)
    write_image(root / "imgs" / "b.png", seed=22)
    write_image(tmp_path / "secret.png", seed=23)
    lines = [
        {"image": "imgs/a.png", "prompt": "What is here?", "reference": "Noise.", "objects": ["noise"]},
        {
            "image": "imgs/b.png",
            "prompt": "Describe.",
            "chosen": "Good answer.",
            "rejected": "Bad answer.",
            "method": "povid",
            "margin": 0.7,
        },
        {"image": "../secret.png", "prompt": "x"},
        {"image": str(tmp_path / "secret.png"), "prompt": "x"},
        {"image": "imgs/missing.png", "prompt": "x"},
        {"image": "imgs/a.png", "prompt": "x", "chosen": "only chosen"},
        {"prompt": "no image"},
    ]
    text = "\n".join(json.dumps(x) for x in lines) + '\n{not json\n\n{"image": "imgs/a.png",\n'
    (root / "data.jsonl").write_text(text)
    calls = []
    report = io.import_path(store, settings, root / "data.jsonl", progress=lambda *a: calls.append(a))
    assert calls == [(k, None, f"{k} records read") for k in range(1, 10)]  # every record, refused ones too
    assert report.format == "jsonl" and report.imported == 2 and report.pairs == 1
    assert report.skipped == 7 and report.status == "partial"
    errors = "\n".join(report.errors)
    assert "data.jsonl line 3: image path '../secret.png' escapes the import root" in errors
    assert "data.jsonl line 4:" in errors and f"is absolute (or a URL); give it relative to the import root {root}" in errors
    assert "data.jsonl line 5: imgs/missing.png: file not found" in errors
    assert "line 6: a pair needs both 'chosen' and 'rejected'" in errors
    assert "line 7: missing 'image'" in errors
    # Where in the line JSON went wrong; a record cut short says so (the parser's own "line 2"
    # would be the line's end, not the file's line 2).
    assert "line 8: invalid JSON (Expecting property name enclosed in double quotes at character 2 of the line)" in errors
    assert "line 10: invalid JSON (the line ends before the record does)" in errors
    a = next(i for i in store.list_items() if i["prompt"] == "What is here?")
    assert a["objects"] == ["noise"] and a["reference"] == "Noise."
    [pair] = store.training_pairs(include_auto=True)
    assert (pair["chosen"], pair["rejected"], pair["method"], pair["margin"]) == (
        "Good answer.",
        "Bad answer.",
        "povid",
        0.7,
    )
    assert_consistent(store, settings)


def test_hf_dataset_import_pil_and_paths(store, settings, tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {
                    "image": [noise_image(31), noise_image(32)],
                    "prompt": ["Describe.", "What colour?"],
                    "reference": ["Noise one.", None],
                    "objects": [["a", "b"], None],
                },
                features=datasets.Features(
                    {
                        "image": datasets.Image(),
                        "prompt": datasets.Value("string"),
                        "reference": datasets.Value("string"),
                        "objects": datasets.List(datasets.Value("string")),
                    }
                ),
            ),
            "test": datasets.Dataset.from_dict(
                {"image": [noise_image(33)], "prompt": ["Count."]}
            ).cast_column("image", datasets.Image()),
        }
    )
    dd.save_to_disk(str(tmp_path / "hf"))
    assert io.detect_format(tmp_path / "hf") == "hf"
    report = io.import_path(store, settings, tmp_path / "hf", dataset="hfdata")
    assert report.status == "ok" and report.imported == 3
    items = {i["prompt"]: i for i in store.list_items(dataset="hfdata")}
    assert items["Describe."]["objects"] == ["a", "b"] and items["Describe."]["split"] == "train"
    assert items["Count."]["split"] == "test" and items["What colour?"]["reference"] is None

    # A path column: relative paths resolve inside the dataset directory; escapes are refused.
    root = tmp_path / "hfpaths"
    datasets.Dataset.from_dict(
        {"image": ["pics/x.png", "../../etc/passwd"], "prompt": ["P1", "P2"]}
    ).save_to_disk(str(root))
    write_image(root / "pics" / "x.png", seed=34)
    report = io.import_path(store, settings, root, "hf")
    assert (
        report.imported == 1 and report.status == "partial" and "escapes the import root" in report.errors[0]
    )
    assert_consistent(store, settings)


def test_record_failure_after_image_write_leaves_no_orphan(store, settings, tmp_path, monkeypatch):
    root = tmp_path / "j"
    write_image(root / "a.png", seed=41)
    write_image(root / "b.png", seed=42)
    (root / "d.jsonl").write_text(
        json.dumps({"image": "a.png", "prompt": "boom"})
        + "\n"
        + json.dumps({"image": "b.png", "prompt": "ok"})
        + "\n"
    )
    real_add_item = store.add_item

    def failing_add_item(image_id, prompt, *args, **kwargs):
        if prompt == "boom":
            raise StoreError("simulated failure while writing the item")
        return real_add_item(image_id, prompt, *args, **kwargs)

    monkeypatch.setattr(store, "add_item", failing_add_item)
    report = io.import_path(store, settings, root / "d.jsonl")
    assert report.imported == 1 and "simulated failure" in report.errors[0]
    assert store.stats()["tables"]["images"] == 1  # the image row of the failed record rolled back
    assert_consistent(store, settings)  # ... and its file was removed


def test_unknown_paths_and_formats(store, settings, tmp_path):
    with pytest.raises(io.DataImportError, match="no such file"):
        io.import_path(store, settings, tmp_path / "nope")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(io.DataImportError, match="cannot guess"):
        io.import_path(store, settings, tmp_path / "x.csv")
    with pytest.raises(io.DataImportError, match="unknown import format"):
        io.import_path(store, settings, tmp_path / "x.csv", "xml")


# ============================================================================ exports
def _labelled_store(store, make_pairs):
    a, b, c, d, e = make_pairs([0.1, 0.2, 0.3, 0.4, 0.5], method="csr")
    [f] = make_pairs([None], method="povid", round=1)
    store.add_review(a, "ann", "accept")
    store.add_review(b, "ann", "swap")
    store.add_review(c, "ann", "reject_both")
    store.add_review(d, "ann", "edit", edited_text="There is a red circle.")
    return a, b, c, d, e, f


def test_export_llava_and_llamafactory_content(store, make_pairs, tmp_path):
    a, b, c, d, e, f = _labelled_store(store, make_pairs)
    report = io.export_pairs(store, "llava", tmp_path / "llava")
    assert (report.pairs, report.images) == (3, 3)
    records = json.loads((tmp_path / "llava" / io.LLAVA_FILE).read_text())
    by_pair = {r[io.META_KEY]["pair_id"]: r for r in records}
    assert set(by_pair) == {a, b, d}  # reviewed only; reject_both never
    rec = by_pair[b]
    assert rec["conversations"][0] == {"from": "human", "value": "<image>\nDescribe the image."}
    assert rec["conversations"][1]["value"] == "There is a blue star 1."  # swapped
    assert rec["rejected_conversations"][1]["value"] == "There is a red circle 1."
    assert by_pair[d]["conversations"][1]["value"] == "There is a red circle."  # edited text chosen
    assert (tmp_path / "llava" / rec["image"]).is_file() and rec["image"].startswith("images/")

    report = io.export_pairs(store, "llamafactory", tmp_path / "lf", include_auto=True)
    assert report.pairs == 5
    info = json.loads((tmp_path / "lf" / "dataset_info.json").read_text())
    entry = info[io.LLAMAFACTORY_NAME]
    assert entry["ranking"] is True and entry["formatting"] == "sharegpt"
    assert entry["columns"]["images"] == "images"
    rows = json.loads((tmp_path / "lf" / entry["file_name"]).read_text())
    assert rows[0]["conversations"][0]["from"] == "human" and rows[0]["chosen"]["from"] == "gpt"
    assert all((tmp_path / "lf" / r["images"][0]).is_file() for r in rows)

    with pytest.raises(io.DataExportError, match="not empty"):
        io.export_pairs(store, "llava", tmp_path / "llava")
    assert (
        io.export_pairs(
            store, "llava", tmp_path / "llava", methods=["povid"], include_auto=True, overwrite=True
        ).pairs
        == 1
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary dirs left


def test_export_nothing_is_a_clear_error(store, make_pairs, tmp_path):
    make_pairs([0.1])
    with pytest.raises(io.DataExportError, match="0 of 1 pairs qualify.*include unreviewed pairs"):
        io.export_pairs(store, "trl", tmp_path / "out")
    # a filter that alone leaves nothing says so (it said "no reviewed pairs" with reviewed pairs there)
    with pytest.raises(io.DataExportError, match=r"^nothing to export: 0 of 1 pairs qualify \(none is of round 2\)$"):
        io.export_pairs(store, "trl", tmp_path / "out", round=2, include_auto=True)
    with pytest.raises(io.DataExportError, match=r"0 of the 1 pairs of method csr and of round 0 qualify \(none is reviewed"):
        io.export_pairs(store, "trl", tmp_path / "out", methods=["csr"], round=0)
    [pid] = store.pair_ids()
    store.add_review(pid, "ann", "reject_both")
    with pytest.raises(io.DataExportError, match=r"0 of 1 pairs qualify \(each was rejected on both sides"):
        io.export_pairs(store, "trl", tmp_path / "out", include_auto=True)
    assert not (tmp_path / "out").exists()


def _items_and_pairs(store):
    items = {
        (i["image_id"], i["prompt"], i["dataset"], i["split"], i["reference"], tuple(i["objects"] or ()))
        for i in store.list_items()
    }
    pairs = {
        (p["image_id"], p["prompt"], p["chosen"], p["rejected"], p["method"], p["round"], p["margin"])
        for p in store.training_pairs(include_auto=True)
    }
    return items, pairs


@pytest.mark.parametrize("fmt", ["llava", "trl", "llamafactory"])
def test_round_trip_import_export_import(fmt, settings, tmp_path):
    """JSONL → store A → export → store B: same items and pairs; re-importing adds nothing."""
    src = tmp_path / "src"
    for k in range(4):
        write_image(src / f"{k}.jpg", seed=50 + k, size=(40, 30))
    lines = [
        {
            "image": f"{k}.jpg",
            "prompt": f"Describe picture {k}.",
            "reference": f"Ref {k}.",
            "objects": ["x", str(k)],
            "chosen": f"Correct {k}.",
            "rejected": f"Hallucinated {k}.",
            "method": "csr" if k % 2 else "povid",
            "margin": k / 10,
            "round": k % 2,
        }
        for k in range(4)
    ]
    lines.append({**lines[0], "chosen": "Another good one.", "rejected": "Another bad one.", "margin": None})
    # A STIC pair trains with its own prompt; the export writes that one, and re-import must still
    # land it on the same item (the item's prompt travels in the provenance block).
    lines.append({**lines[1], "chosen": "Stic good.", "rejected": "Stic bad.", "method": "stic",
                  "meta": {"pair_prompt": "Step by step, describe picture 1."}})
    (src / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    a = Store(tmp_path / "a" / "studio.db")
    report = io.import_path(a, settings, src / "d.jsonl", dataset="rt")
    assert report.status == "ok" and report.pairs == 6

    out = tmp_path / f"export-{fmt}"
    assert io.export_pairs(a, fmt, out, include_auto=True).pairs == 6
    b = Store(tmp_path / "b" / "studio.db")
    report = io.import_path(b, settings, out)  # format detected
    assert report.format in (fmt, "hf") and report.status == "ok" and report.pairs == 6
    assert _items_and_pairs(b) == _items_and_pairs(a)
    assert len(_items_and_pairs(b)[1]) == 6 and len(_items_and_pairs(b)[0]) == 4
    [stic] = [p for p in b.training_pairs(include_auto=True) if p["method"] == "stic"]
    assert stic["prompt"] == "Step by step, describe picture 1." and stic["item_prompt"] == "Describe picture 1."
    again = io.import_path(b, settings, out)
    assert again.pairs == 0 and b.count_pairs() == 6 and b.count_items() == 4
    a.close()
    b.close()


@pytest.mark.parametrize("fmt", ["llava", "trl", "llamafactory"])
def test_decisions_land_on_the_pair_they_are_about_when_pairs_share_texts(fmt, store, make_items, settings, tmp_path):
    """Pairs of one item and method that share texts: the same pair in two rounds, an edit whose
    rejected side another pair shares, two pairs with the same texts of which one was edited. An
    export re-imported into a fresh root keeps them apart, and into its own store adds nothing; it
    merged them, losing pairs and flipping or inventing decisions, with an 'ok' report."""
    [item] = make_items(1)

    def pair(chosen: str, rejected: str, round: int = 0) -> int:
        ids = store.write_generation(item, [{"text": chosen, "source": "csr"}, {"text": rejected, "source": "csr"}],
                                     [{"chosen": 0, "rejected": 1, "method": "csr", "round": round}])
        return store.find_pair(item, chosen, rejected, "csr") if ids else None

    r1 = pair("Yes.", "No.", round=1)
    r2 = store.add_pair(item, store.find_candidate(item, "Yes."), store.find_candidate(item, "No."), "csr", round=2)
    store.add_review(r1, "alice", "accept")
    store.add_review(r2, "bob", "swap")
    x = pair("Opt A.", "Shared bad.")
    y = pair("Opt Y.", "Shared bad.")
    store.add_review(x, "alice", "accept")
    store.add_review(y, "bob", "edit", edited_text="Opt B.")
    twin = store.add_pair(item, store.find_candidate(item, "Opt Y."), store.find_candidate(item, "Shared bad."), "csr")
    before = sorted((p["pair_id"], p["chosen"], p["rejected"], p["status"], p["reviewer"]) for p in store.training_pairs())
    assert len(before) == 4 and store.count_pairs() == 5  # the twin is unreviewed

    out = tmp_path / f"export-{fmt}"
    io.export_pairs(store, fmt, out)
    again = io.import_path(store, settings, out)  # into its own store: nothing new, nothing changed
    assert again.status == "ok" and again.pairs == 0 and store.count_pairs() == 5
    after = sorted((p["pair_id"], p["chosen"], p["rejected"], p["status"], p["reviewer"]) for p in store.training_pairs())
    assert after == before and store.live_decision(twin, "bob") is None

    fresh = Store(tmp_path / "fresh" / "studio.db")
    try:
        report = io.import_path(fresh, settings, out)
        assert report.status == "ok" and report.pairs == 4 and fresh.count_pairs() == 4
        landed = sorted((p["round"], p["chosen"], p["rejected"], p["reviewer"]) for p in fresh.training_pairs())
        assert landed == [(0, "Opt A.", "Shared bad.", "alice"), (0, "Opt B.", "Shared bad.", "bob"),
                          (1, "Yes.", "No.", "alice"), (2, "No.", "Yes.", "bob")]
        assert io.import_path(fresh, settings, out).pairs == 0 and fresh.count_pairs() == 4
    finally:
        fresh.close()


def test_the_image_placeholder_in_an_answer_or_a_given_prompt_is_refused(store, settings, tmp_path):
    """The exports put one '<image>' before the prompt; a second one inside an answer made
    LLaMA-Factory refuse the whole dataset and TRL's collator fail on the first batch."""
    root = tmp_path / "ph"
    write_image(root / "a.png", seed=91)
    lines = [{"image": "a.png", "prompt": "<image>\nDescribe.", "chosen": "A bird <image> here.", "rejected": "A cat."},
             {"image": "a.png", "prompt": "Describe.", "chosen": "A bird.", "rejected": "A <image>."},
             {"image": "a.png", "prompt": "<image>\nDescribe.", "chosen": "A bird.", "rejected": "A cat."}]
    (root / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    report = io.import_path(store, settings, root / "d.jsonl")
    assert report.imported == 1 and report.pairs == 1, report.errors  # the prompt's own placeholder is the format's
    assert report.errors == [
        "d.jsonl line 1: the chosen answer contains the image placeholder '<image>', which the exports' training "
        "tools would read as a second image; remove it",
        "d.jsonl line 2: the rejected answer contains the image placeholder '<image>', which the exports' training "
        "tools would read as a second image; remove it"]
    with pytest.raises(io.DataImportError, match="the prompt contains the image placeholder"):
        io.import_path(store, settings, root, "folder", prompt="<image> What is here?")


# ============================================================================ TRL
def test_trl_export_trains_with_dpo_trainer(store, make_pairs, tmp_path):
    import datasets
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    from lvlm_studio.models.tiny import build_tiny_llava

    torch.set_num_threads(2)
    _labelled_store(store, make_pairs)
    report = io.export_pairs(store, "trl", tmp_path / "trl")
    assert report.pairs == 3
    ds = datasets.load_from_disk(str(tmp_path / "trl"))
    assert {"images", "prompt", "chosen", "rejected"} <= set(ds.column_names) and len(ds) == 3
    row = ds[0]
    assert row["images"][0].mode == "RGB" and row["images"][0].size == (32, 24)
    assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"][0]["type"] == "image"
    assert row["prompt"][0]["content"][1] == {"type": "text", "text": "Describe the image."}
    assert row["chosen"] == [
        {"role": "assistant", "content": [{"type": "text", "text": "There is a red circle 0."}]}
    ]

    model_dir = build_tiny_llava(tmp_path / "tiny")
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = DPOConfig(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=3,
        max_steps=1,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        max_length=None,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=processor)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["pixel_values"].shape[0] == 6  # 3 examples × (chosen, rejected)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (batch["input_ids"] == image_token).any(dim=1).all()
    result = trainer.train()
    assert trainer.state.global_step == 1 and math.isfinite(result.training_loss)
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert changed  # one optimisation step really happened


def test_a_jsonl_line_too_long_for_any_record_is_refused_unread(store, settings, tmp_path, monkeypatch):
    """A line longer than JSONL_LINE_MAX_BYTES (a runaway export, a file that is not JSONL) used to
    be read whole into memory; it is refused alone, read in bounded chunks, and the lines after it
    import."""
    monkeypatch.setattr(io, "JSONL_LINE_MAX_BYTES", 1000)
    root = tmp_path / "j"
    for k in range(3):
        write_image(root / f"i{k}.png", seed=400 + k)
    line = lambda k, prompt: json.dumps({"image": f"i{k}.png", "prompt": prompt})  # noqa: E731
    data = "\n".join([line(0, "first"), line(1, "x" * 5000), line(2, "e" * 900), line(2, "last")]) + "\n"
    (root / "data.jsonl").write_text(data)
    reads, real_open = [], Path.open

    class Spy:  # the import's file handle, recording how much each read asks for
        def __init__(self, fh):
            self.fh = fh

        def readline(self, n=-1):
            reads.append(n)
            return self.fh.readline(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(Path, "open", lambda self, *a, **kw: Spy(real_open(self, *a, **kw))
                        if self.name == "data.jsonl" else real_open(self, *a, **kw))
    report = io.import_path(store, settings, root / "data.jsonl")
    assert report.imported == 3 and report.skipped == 1, report.errors
    assert report.errors == ["data.jsonl line 2: longer than 1,000 bytes, far more than a record holds (images are "
                             "given by path); skipped unread"]
    assert sorted(i["prompt"] for i in store.list_items()) == ["e" * 900, "first", "last"]  # up to the limit: read
    assert reads and all(0 < n <= 1001 for n in reads)  # never an unbounded read


def test_jsonl_refuses_values_sqlite_or_the_studio_cannot_hold_line_by_line(store, settings, tmp_path):
    """Numbers too large for SQLite, non-finite margins, a line that is not UTF-8 and reserved meta
    keys of the wrong type each refuse their own line; the lines around them still import and no
    image file is left behind for a refused line."""
    root = tmp_path / "j"
    for k in range(9):
        write_image(root / f"i{k}.png", seed=300 + k)
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    lines = [
        json.dumps({"image": "i0.png", **good}),
        json.dumps({"image": "i1.png", **good, "round": 10**30}),
        json.dumps({"image": "i2.png", **good, "margin": 10**400}),
        '{"image": "i3.png", "prompt": "p", "chosen": "a", "rejected": "b", "margin": 1e999}',
        json.dumps({"image": "i4.png", "prompt": "p", "reference": 10**30}),
        json.dumps({"image": "i5.png", **good, "meta": {"kind": ["text"]}}),
        json.dumps({"image": "i6.png", **good, "meta": {"sft": False, "chosen_min_reward": "low"}}),
        json.dumps({"image": "i7.png", **good, "round": "2"}),
    ]
    data = ("\n".join(lines) + "\n").encode() + b'{"image": "i8.png", "prompt": "caf\xe9"}\n'
    data += (json.dumps({"image": "i8.png", **good, "round": 1.0}) + "\n").encode()
    (root / "data.jsonl").write_bytes(data)
    report = io.import_path(store, settings, root / "data.jsonl")
    errors = "\n".join(report.errors)
    assert report.status == "partial" and report.imported == 3 and report.skipped == 7, errors
    assert "line 2: 'round' must be between 0 and" in errors
    assert "line 3: 'margin' must be a number" in errors and "line 4: 'margin' must be a finite number" in errors
    assert "line 5: 'reference' must be text, not int" in errors
    assert "line 6: pair meta 'kind' must be str, not list" in errors
    assert "line 7: pair meta 'chosen_min_reward' must be int or float, not str" in errors
    assert "line 9: not UTF-8 text" in errors
    assert sorted(p["round"] for p in store.training_pairs(include_auto=True)) == [0, 1, 2]
    assert_consistent(store, settings)  # no file of a refused line is left on disk


def test_llava_and_llamafactory_records_of_the_wrong_shape_are_refused_alone(store, settings, tmp_path):
    root = tmp_path / "l"
    write_image(root / "a.png", seed=41)
    write_image(root / "b.png", seed=42)
    turns = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A square."}]
    rejected = [turns[0], {"from": "gpt", "value": "A circle."}]
    llava = [
        {"image": "a.png", "conversations": turns, "rejected_conversations": rejected, "lvlm_studio": "oops"},
        {"image": "a.png", "conversations": "Describe.", "rejected_conversations": rejected},
        "not a record",
        {"image": "b.png", "conversations": turns, "rejected_conversations": rejected},
    ]
    (root / "llava_dpo.json").write_text(json.dumps(llava))
    report = io.import_path(store, settings, root / "llava_dpo.json", "llava")
    errors = "\n".join(report.errors)
    assert report.imported == 1 and report.skipped == 3, errors
    assert "record 0: 'lvlm_studio' must be an object, not str" in errors
    assert "record 1: 'conversations' must be a list of turns" in errors
    assert "record 2: record is not an object" in errors
    # LLaMA-Factory: one image given as a string is one image; a non-object record is refused.
    lf = [{"images": "a.png", "conversations": [{"from": "human", "value": "<image>Describe."}],
           "chosen": {"from": "gpt", "value": "A square."}, "rejected": {"from": "gpt", "value": "A star."}},
          ["not", "a", "record"]]
    (root / "lf.json").write_text(json.dumps(lf))
    report = io.import_path(store, settings, root / "lf.json", "llamafactory")
    assert report.imported == 1 and report.skipped == 1 and "record 1: record is not an object" in report.errors[0]
    assert_consistent(store, settings)


def test_multi_turn_preference_records_are_refused_alone(store, settings, tmp_path):
    """A preference record that asks several questions is refused with the reason (its answers
    reply to the last question in the context of the others; pairing them with the first question
    trained the wrong prompt), in LLaVA DPO JSON and in TRL conversational JSONL alike; a
    single-turn record beside it lands."""
    root = tmp_path / "multi"
    write_image(root / "a.png", seed=45)
    first = {"from": "human", "value": "<image>\nWhat is in the image?"}
    later = [{"from": "gpt", "value": "A red square."}, {"from": "human", "value": "What colour is it?"}]
    llava = [
        {"image": "a.png", "conversations": [first, *later, {"from": "gpt", "value": "Red."}],
         "rejected_conversations": [first, *later, {"from": "gpt", "value": "Blue."}]},
        {"image": "a.png", "conversations": [first, {"from": "gpt", "value": "A red square."}],
         "rejected_conversations": [first, {"from": "gpt", "value": "A red star."}]},
    ]
    (root / "llava_dpo.json").write_text(json.dumps(llava))
    report = io.import_path(store, settings, root / "llava_dpo.json")
    assert report.format == "llava" and report.imported == 1 and report.pairs == 1, report.errors
    assert report.errors == ["llava_dpo.json record 0: a conversation of 2 questions: a preference pair "
                             "is one question and its answers; split it into single-turn records"]
    history = [{"role": "user", "content": "What is in the image?"}, {"role": "assistant", "content": "A square."},
               {"role": "user", "content": "What colour is it?"}]
    line = {"image": "a.png", "prompt": history, "chosen": [{"role": "assistant", "content": "Red."}],
            "rejected": [{"role": "assistant", "content": "Blue."}]}
    single = [{"role": "user", "content": "Which colour?"}]
    lines = [
        line,
        # TRL's implicit-prompt form: chosen and rejected hold the whole conversation
        {"image": "a.png", "chosen": [*history, {"role": "assistant", "content": "Red."}],
         "rejected": [*history, {"role": "assistant", "content": "Blue."}]},
        {"image": "a.png", "chosen": [*single, {"role": "assistant", "content": "Red."}],
         "rejected": [*single, {"role": "assistant", "content": "Green."}]},
        # no pair: an item keeps its first question, as an instruction record does
        {"image": "a.png", "prompt": history},
    ]
    (root / "trl.jsonl").write_text("".join(json.dumps(row) + "\n" for row in lines))
    report = io.import_path(store, settings, root / "trl.jsonl")
    assert report.imported == 2 and report.pairs == 1, report.errors
    assert [e.split(":")[0] for e in report.errors] == ["trl.jsonl line 1", "trl.jsonl line 2"]
    assert all("a conversation of 2 questions" in e for e in report.errors)
    # LLaVA: a rejected side that answers a later question is refused too
    rejected_later = [first, *later, {"from": "gpt", "value": "Three."}]
    (root / "rejected.json").write_text(json.dumps([
        {"image": "a.png", "conversations": [first, {"from": "gpt", "value": "A red square."}],
         "rejected_conversations": rejected_later}]))
    report = io.import_path(store, settings, root / "rejected.json", "llava")
    assert report.imported == 0 and "a conversation of 2 questions" in report.errors[0], report.errors
    assert sorted((p["prompt"], p["chosen"], p["rejected"]) for p in store.training_pairs(include_auto=True)) == [
        ("What is in the image?", "A red square.", "A red star."), ("Which colour?", "Red.", "Green.")]
    assert sorted(it["prompt"] for it in store.list_items()) == ["What is in the image?", "Which colour?"]
    assert_consistent(store, settings)


def test_trl_implicit_prompt_records_take_the_question_their_sides_ask(store, settings, tmp_path):
    """TRL's implicit-prompt form (no 'prompt': chosen and rejected hold the conversation), in JSONL
    and in an HF dataset without a prompt column: the pair's prompt is the question the sides ask
    (from either side), the import's default prompt when that question is the image alone, and a
    record whose sides ask different questions is refused."""
    import datasets

    root = tmp_path / "implicit"
    write_image(root / "a.png", seed=47)

    def side(question, answer):
        return ([{"role": "user", "content": question}] if question is not None else []) + [
            {"role": "assistant", "content": answer}]

    image_only = [{"type": "image"}]
    rows = [
        {"image": "a.png", "chosen": side(image_only, "A red square."), "rejected": side(image_only, "A blue cat.")},
        {"image": "a.png", "chosen": side(None, "Red."), "rejected": side("Which colour?", "Blue.")},
        {"image": "a.png", "chosen": side("Which colour?", "Red."), "rejected": side("Which shape?", "A cat.")},
    ]
    (root / "implicit.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = io.import_path(store, settings, root / "implicit.jsonl", prompt="Describe the image.")
    assert report.imported == 2 and report.pairs == 2, report.errors
    assert report.errors == ["implicit.jsonl line 3: chosen and rejected answer different questions: "
                             "Which colour? / Which shape?"]
    assert sorted((p["prompt"], p["chosen"]) for p in store.training_pairs(include_auto=True)) == [
        ("Describe the image.", "A red square."), ("Which colour?", "Red.")]
    hf = tmp_path / "implicit_hf"
    datasets.Dataset.from_list([{"images": [noise_image(48)], "chosen": side("How many shapes?", "Two."),
                                 "rejected": side("How many shapes?", "Five.")}]).save_to_disk(str(hf))
    report = io.import_path(store, settings, hf, "trl")
    assert report.imported == 1 and report.pairs == 1, report.errors
    assert ("How many shapes?", "Two.", "Five.") in {
        (p["prompt"], p["chosen"], p["rejected"]) for p in store.training_pairs(include_auto=True)}
    assert_consistent(store, settings)


def test_llava_instruct_records_become_items_with_their_first_answer_as_reference(store, settings, tmp_path):
    """LLaVA-Instruct JSON (no rejected side) is found by --format auto; each record is an item
    whose reference is the answer to its first question (POVID's chosen side, as in its paper);
    a record whose first question has no answer is refused alone."""
    root = tmp_path / "instruct"
    write_image(root / "a.png", seed=43)
    write_image(root / "b.png", seed=44)
    records = [
        {"id": "x1", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": "A red square."},
            {"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "x2", "image": "b.png", "conversations": [
            {"from": "human", "value": "Describe it.<image>"}, {"from": "gpt", "value": "Two blue circles."}]},
        {"id": "x3", "image": "b.png", "conversations": [
            {"from": "human", "value": "Describe it."}, {"from": "human", "value": "Well?"},
            {"from": "gpt", "value": "Yes."}]},
        {"id": "x4", "image": "b.png", "conversations": [
            {"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "  "}]},
    ]
    (root / "llava_instruct.json").write_text(json.dumps(records))
    report = io.import_path(store, settings, root / "llava_instruct.json")
    assert report.format == "llava" and report.imported == 2 and report.pairs == 0, report.errors
    assert report.errors == ["llava_instruct.json record 2: the first question has no answer",
                             "llava_instruct.json record 3: the first question has no answer"]
    items = sorted(store.list_items(), key=lambda it: it["prompt"])
    assert [(it["prompt"], it["reference"]) for it in items] == [
        ("Describe it.", "Two blue circles."), ("What is in the image?", "A red square.")]
    assert_consistent(store, settings)


def test_auto_format_is_not_decided_by_a_malformed_first_record(store, settings, tmp_path):
    """--format auto reads past records of no known layout: a LLaVA file whose first records are
    malformed imports its good ones and reports the bad ones, one by one; a JSON list with no
    record of a known layout is refused as a whole, with the layouts it expected."""
    root = tmp_path / "auto"
    write_image(root / "a.png", seed=46)
    good = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                               {"from": "gpt", "value": "A red square."}]}
    (root / "llava.json").write_text(json.dumps(["not a record", {"conversation": []}, good]))
    report = io.import_path(store, settings, root / "llava.json")
    assert report.format == "llava" and report.imported == 1 and report.skipped == 2, report.errors
    assert report.errors == ["llava.json record 0: record is not an object",
                             "llava.json record 1: 'conversations' must be a list of turns"]
    (root / "other.json").write_text(json.dumps([1, {"caption": "x"}]))
    with pytest.raises(io.DataImportError, match="JSON layout not recognised"):
        io.import_path(store, settings, root / "other.json")
    assert_consistent(store, settings)


def test_coco_duplicate_ids_unknown_categories_and_unreadable_files(store, settings, tmp_path):
    root = _coco(tmp_path / "coco")
    path = root / "annotations" / "instances_val2017.json"
    instances = json.loads(path.read_text())
    instances["images"].append({"id": 2, "file_name": "000001.jpg"})  # id 2 again, another file
    instances["annotations"].append({"id": 9, "image_id": 1, "category_id": 99})  # no such category
    path.write_text(json.dumps(instances))
    report = io.import_path(store, settings, root)
    errors = "\n".join(report.errors)
    assert report.imported == 0 and report.status == "failed", errors
    assert "image 1: annotation with unknown category_id 99" in errors
    assert "image 2: image id 2 is listed twice, as '000002.jpg' and '000001.jpg'" in errors
    # A file passed as COCO that is not a COCO object: one clear error naming it, nothing written.
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("{nope")
    with pytest.raises(io.DataImportError, match="list.json: a COCO annotation file is a JSON object"):
        io.import_path(store, settings, tmp_path / "list.json", "coco")
    with pytest.raises(io.DataImportError, match="broken.json: not valid JSON"):
        io.import_path(store, settings, tmp_path / "broken.json", "coco")
    assert store.count_items() == 0
    assert_consistent(store, settings)


def test_export_below_a_file_is_a_clear_error(store, make_pairs, tmp_path):
    make_pairs([0.5, 1.0])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(io.DataExportError, match="is not a directory"):
        io.export_pairs(store, "llava", tmp_path / "afile" / "sub", include_auto=True)


# ============================================================================ round trips (review)
@pytest.mark.parametrize("fmt", ["llava", "trl", "llamafactory"])
def test_an_export_carries_human_decisions_and_item_meta_back(fmt, store, make_pairs, settings, tmp_path):
    """Accepted, swapped and edited pairs land reviewed (an accept of their effective texts by the
    same reviewer), item meta comes back, and importing into the store it came from adds nothing."""
    a, b, c, d, e, f = _labelled_store(store, make_pairs)
    with store.transaction() as db:  # item meta the studio reads (e.g. a world scene's kind)
        db.execute("UPDATE items SET meta = ? WHERE id = ?", (json.dumps({"kind": "describe", "note": "x"}),
                                                               store.get_pair(a)["item_id"]))
    out = tmp_path / f"export-{fmt}"
    io.export_pairs(store, fmt, out)
    fresh = Store(tmp_path / "fresh" / "studio.db")
    try:
        report = io.import_path(fresh, settings, out)
        assert report.pairs == 3
        mine = {(p["chosen"], p["rejected"]): p for p in store.training_pairs()}
        theirs = {(p["chosen"], p["rejected"]): p for p in fresh.training_pairs()}  # reviewed only
        assert set(theirs) == set(mine)  # the swap and the edit applied, as effective texts
        assert {p["status"] for p in theirs.values()} == {"accept"} and {p["reviewer"] for p in theirs.values()} == {"ann"}
        metas = [i["meta"] for i in fresh.list_items() if i["meta"]]
        assert {"kind": "describe", "note": "x"} in metas
        assert io.export_pairs(fresh, fmt, tmp_path / "again").pairs == 3  # no --include-auto needed
    finally:
        fresh.close()
    before = store.count_pairs()
    assert io.import_path(store, settings, out).pairs == 0 and store.count_pairs() == before


def test_split_option_wins_over_the_file(store, settings, tmp_path):
    src = tmp_path / "src"
    write_image(src / "0.jpg", seed=7)
    (src / "d.jsonl").write_text(json.dumps({"image": "0.jpg", "prompt": "Q?", "split": "val"}))
    io.import_path(store, settings, src / "d.jsonl", split="test")
    assert [i["split"] for i in store.list_items()] == ["test"]
    io.import_path(store, settings, src / "d.jsonl", dataset="other")  # no option: the file's split
    assert sorted(i["split"] for i in store.list_items()) == ["test", "val"]


def test_coco_limit_counts_the_whole_import(store, settings, tmp_path):
    root = _coco(tmp_path / "coco")
    train = json.loads((root / "annotations" / "captions_val2017.json").read_text())
    (root / "train2017").mkdir()
    for image in train["images"][:2]:
        write_image(root / "train2017" / image["file_name"], seed=30 + image["id"])
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps(train))
    report = io.import_path(store, settings, root, limit=1)
    assert report.imported == 1 and store.count_items() == 1
    calls = []  # the count runs on across COCO's split files
    whole = io.import_path(store, settings, root, progress=lambda done, total, message: calls.append(done))
    assert calls == list(range(1, whole.imported + whole.skipped + 1)) and whole.imported >= 2


def test_an_export_never_replaces_the_data_root(store, make_pairs, settings, tmp_path):
    _labelled_store(store, make_pairs)
    home = settings.home
    for target in (home, home.parent, home / "images", home / "adapters" / "round-1", home / "studio.db",
                   home / ".jobs.lock"):
        with pytest.raises(io.DataExportError, match="data root"):
            io.export_pairs(store, "llava", target, overwrite=True)
    # A part that is a link to elsewhere is protected where it points too.
    elsewhere = tmp_path / "big-disk" / "runs"
    elsewhere.mkdir(parents=True)
    (home / "runs").rmdir()
    (home / "runs").symlink_to(elsewhere)
    with pytest.raises(io.DataExportError, match="data root"):
        io.export_pairs(store, "llava", elsewhere, overwrite=True)
    assert store.count_pairs() == 6 and (home / "studio.db").is_file() and any((home / "images").iterdir())
    assert io.export_pairs(store, "llava", home / "exports" / "x", overwrite=True).pairs == 3  # inside is fine


def test_imported_decisions_land_on_the_pairs_they_are_about(store, make_pairs, settings, tmp_path):
    """Another store's export of the same automatic pairs: its accept and its swap become reviews
    on the pairs here (no reversed duplicate, nothing dropped); an undone swap comes back; a
    reviewer's live decision is never overwritten."""
    a, b = make_pairs([0.1, 0.2])
    out = tmp_path / "theirs"
    other = Store(tmp_path / "other" / "studio.db")
    try:
        io.export_pairs(store, "llava", tmp_path / "auto", include_auto=True)
        io.import_path(other, settings, tmp_path / "auto")  # the same automatic pairs
        theirs = {(p["chosen"], p["rejected"]): p["pair_id"] for p in other.training_pairs(include_auto=True)}
        pa, pb = theirs[_texts(store, a)], theirs[_texts(store, b)]
        other.add_review(pa, "ann", "accept")
        other.add_review(pb, "ann", "swap")
        io.export_pairs(other, "llava", out)
    finally:
        other.close()
    before = store.count_pairs()
    assert io.import_path(store, settings, out).pairs == 0 and store.count_pairs() == before
    assert (store.live_decision(a, "ann"), store.live_decision(b, "ann")) == ("accept", "swap")
    store.add_review(b, "ann", "undo")
    io.import_path(store, settings, out)
    assert store.live_decision(b, "ann") == "swap" and store.count_pairs() == before  # the swap is back
    store.add_review(a, "ann", "reject_both")
    io.import_path(store, settings, out)
    assert store.live_decision(a, "ann") == "reject_both"  # her own later decision stands


def _texts(store, pair_id):
    label = store.effective_label(pair_id)
    return label["chosen_text"], label["rejected_text"]


def test_imported_reviewer_names_are_checked(store, settings, tmp_path):
    src = tmp_path / "src"
    write_image(src / "0.jpg", seed=8)
    write_image(src / "1.jpg", seed=9)
    row = {"image": "0.jpg", "prompt": "Q?", "chosen": "A.", "rejected": "B.", "status": "accept"}
    lines = [{**row, "reviewer": "x" * 100}, {**row, "image": "1.jpg", "reviewer": "bo\nb"}]
    (src / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    report = io.import_path(store, settings, src / "d.jsonl")
    assert report.status == "failed" and len(report.errors) == 2
    assert all("64 printable characters" in e for e in report.errors) and store.count_pairs() == 0


# Tests from a mutation audit of the store, service, io and training helpers: each fails on a
# mutant the suite above let through.
def _import_about(store, settings, folder, item_id, rows):
    """Import JSONL ``rows`` about a stored item (its image file, prompt and dataset)."""
    import shutil

    item = store.get_item(item_id)
    folder.mkdir(parents=True)
    shutil.copyfile(item["image_path"], folder / "img.png")
    lines = [{"image": "img.png", "prompt": item["prompt"], "dataset": item["dataset"], "method": "csr", **r}
             for r in rows]
    (folder / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    return io.import_path(store, settings, folder / "d.jsonl")


def _stored_texts(store, pair_id):
    pair = store.get_pair(pair_id)
    return pair["chosen"]["text"], pair["rejected"]["text"]


def test_unreviewed_pairs_that_reverse_or_share_a_side_of_a_stored_pair_are_new_pairs(
    store, make_pairs, settings, tmp_path
):
    [a] = make_pairs([0.1])
    chosen, rejected = _stored_texts(store, a)
    item_id = store.get_pair(a)["item_id"]
    report = _import_about(store, settings, tmp_path / "in", item_id, [
        {"chosen": rejected, "rejected": chosen},  # the reverse, no human decision
        {"chosen": "Another answer.", "rejected": rejected},  # shares the rejected side, no edit
    ])
    assert report.pairs == 2 and store.count_pairs() == 3 and store.pair_reviews(a) == []


def test_an_imported_decision_lands_on_the_pair_with_the_same_texts(store, make_items, settings, tmp_path):
    """An item holding a pair and its reverse: an imported accept of (chosen, rejected) is about
    the pair with those texts, not a swap of the reversed one."""
    [item] = make_items(1)
    store.write_generation(item, [{"text": "A red circle.", "source": "csr"}, {"text": "A blue star.", "source": "csr"}],
                           [{"chosen": 1, "rejected": 0, "method": "csr"}, {"chosen": 0, "rejected": 1, "method": "csr"}])
    reverse = store.find_pair(item, "A blue star.", "A red circle.", "csr")
    same = store.find_pair(item, "A red circle.", "A blue star.", "csr")
    report = _import_about(store, settings, tmp_path / "in", item, [
        {"chosen": "A red circle.", "rejected": "A blue star.", "status": "accept", "reviewer": "ann"}])
    assert report.pairs == 0
    assert (store.live_decision(same, "ann"), store.live_decision(reverse, "ann")) == ("accept", None)


def test_an_imported_decision_never_overrules_a_live_one_nor_repeats_the_label(store, make_pairs, settings, tmp_path):
    a, b = make_pairs([0.1, 0.2])
    store.add_review(a, "ann", "swap")  # ann's own call differs from the file's
    store.add_review(b, "bob", "accept")  # the label already says what the file says
    ca, ra = _stored_texts(store, a)
    cb, rb = _stored_texts(store, b)
    _import_about(store, settings, tmp_path / "a", store.get_pair(a)["item_id"],
                  [{"chosen": ca, "rejected": ra, "status": "accept", "reviewer": "ann"}])
    _import_about(store, settings, tmp_path / "b", store.get_pair(b)["item_id"],
                  [{"chosen": cb, "rejected": rb, "status": "accept", "reviewer": "carol"}])
    assert store.live_decision(a, "ann") == "swap"
    assert store.live_decision(b, "carol") is None and len(store.pair_reviews(b)) == 1


def test_an_imported_edit_lands_as_an_edit_of_the_stored_pair(store, make_pairs, settings, tmp_path):
    [a] = make_pairs([0.1])
    _, rejected = _stored_texts(store, a)
    report = _import_about(store, settings, tmp_path / "in", store.get_pair(a)["item_id"], [
        {"chosen": "A red circle, nothing else.", "rejected": rejected, "status": "edit", "reviewer": "ann"}])
    assert report.pairs == 0 and store.count_pairs() == 1
    label = store.effective_label(a)
    assert (label["status"], label["chosen_text"], label["reviewer"]) == ("edit", "A red circle, nothing else.", "ann")


def test_exported_automatic_labels_come_back_automatic(store, make_pairs, settings, tmp_path):
    make_pairs([0.1, 0.2])
    io.export_pairs(store, "llava", tmp_path / "auto", include_auto=True)
    fresh = Store(tmp_path / "fresh" / "studio.db")
    try:
        assert io.import_path(fresh, settings, tmp_path / "auto").pairs == 2
        assert fresh.training_pairs() == [] and fresh.stats()["tables"]["reviews"] == 0
    finally:
        fresh.close()


def test_the_longest_reviewer_name_and_the_largest_round_are_accepted(store, settings, tmp_path):
    src = tmp_path / "src"
    write_image(src / "0.jpg", seed=8)
    row = {"image": "0.jpg", "prompt": "Q?", "chosen": "A.", "rejected": "B.", "status": "accept",
           "reviewer": "x" * 64, "round": io.MAX_ROUND}
    (src / "d.jsonl").write_text(json.dumps(row))
    report = io.import_path(store, settings, src / "d.jsonl")
    assert report.status == "ok" and report.pairs == 1
    [pair] = store.training_pairs()
    assert (pair["reviewer"], pair["round"]) == ("x" * 64, io.MAX_ROUND)


def test_reserved_meta_keys_refuse_booleans_for_numbers(store, settings, tmp_path):
    src = tmp_path / "src"
    for k in range(3):
        write_image(src / f"{k}.png", seed=400 + k)
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    lines = [{"image": "0.png", **good, "meta": {"chosen_min_reward": True}},
             {"image": "1.png", "prompt": "p", "item_meta": {"scene_index": False}},
             {"image": "2.png", **good, "meta": {"sft": False, "chosen_min_reward": 0.5}}]
    (src / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    report = io.import_path(store, settings, src / "d.jsonl")
    errors = "\n".join(report.errors)
    assert report.imported == 1 and report.skipped == 2, errors
    assert "line 1: pair meta 'chosen_min_reward' must be int or float, not bool" in errors
    assert "line 2: item meta 'scene_index' must be int, not bool" in errors


def test_an_export_never_replaces_the_data_root_through_a_link_nor_its_wal_or_merged(
    store, make_pairs, settings, tmp_path
):
    _labelled_store(store, make_pairs)
    home = settings.home
    alias = tmp_path / "alias"
    alias.symlink_to(home)
    for target in (alias, alias / "images", home / "merged", home / "chains", home / "studio.db-wal"):
        with pytest.raises(io.DataExportError, match="data root"):
            io.export_pairs(store, "llava", target, overwrite=True)
    assert store.count_pairs() == 6 and any((home / "images").iterdir())


def test_an_export_never_replaces_an_existing_file_without_overwrite(store, make_pairs, tmp_path):
    make_pairs([0.5])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(io.DataExportError, match="exists"):
        io.export_pairs(store, "llava", tmp_path / "afile", include_auto=True)
    assert (tmp_path / "afile").read_text() == "x"


# ============================================================================ hostile inputs
def test_an_export_never_replaces_the_folder_it_is_run_from(store, make_pairs, tmp_path, monkeypatch):
    """``export "" --overwrite`` and ``export . --overwrite`` used to write the export beside the
    files of the working directory and then delete them all: now refused, nothing deleted."""
    make_pairs([0.5])
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for target in ("", ".", "..", str(work), str(work.parent), "/"):
        with pytest.raises(io.DataExportError, match="an export needs a folder path|holds the current directory|"
                                                     "is a filesystem root"):
            io.export_pairs(store, "llava", target, include_auto=True, overwrite=True)
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"] and (work / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in work.parent.iterdir()) == ["here"]  # no temporary folder left either
    report = io.export_pairs(store, "llava", "out", include_auto=True, overwrite=True)  # a new folder is fine
    assert report.pairs == 1 and Path(report.path) == work / "out" and (work / "notes.txt").exists()


def _bind_mount(source: Path, target: Path) -> bool:
    import subprocess

    target.mkdir()
    return subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True).returncode == 0


def test_an_export_through_a_bind_mount_deletes_nothing(store, make_pairs, tmp_path, monkeypatch):
    """A parent of the working directory seen through a bind mount is the same folder (same device
    and inode) and is refused; replacing a folder that cannot be renamed (a mount point) fails
    before anything is deleted. Needs mount permission (root in a container, as CI runs)."""
    import subprocess

    make_pairs([0.5])
    work = tmp_path / "real" / "proj"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("precious")
    alias = tmp_path / "alias"
    if not _bind_mount(tmp_path / "real", alias):
        pytest.skip("no permission to bind-mount here")
    try:
        monkeypatch.chdir(work)
        with pytest.raises(io.DataExportError, match="holds the current directory"):
            io.export_pairs(store, "llava", alias, include_auto=True, overwrite=True)
        assert (work / "notes.txt").read_text() == "precious"
        monkeypatch.chdir(tmp_path)  # elsewhere: replacing the mount point itself cannot rename it
        with pytest.raises(io.DataExportError, match="cannot replace .*alias"):
            io.export_pairs(store, "llava", alias, include_auto=True, overwrite=True)
        assert (work / "notes.txt").read_text() == "precious"
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or set-aside folder left
    finally:
        subprocess.run(["umount", str(alias)], check=True)


def test_an_export_never_replaces_the_data_root_seen_through_a_bind_mount(store, make_pairs, settings, tmp_path):
    """The data root and its parts are compared by device and inode too: through a bind mount of
    the data root, its images folder or the root itself is refused, and nothing is deleted (path
    comparison alone let `--overwrite` replace the images)."""
    import subprocess

    _labelled_store(store, make_pairs)
    home = settings.home
    images = sorted(p.name for p in (home / "images").iterdir())
    alias = tmp_path / "alias"
    if not _bind_mount(home, alias):
        pytest.skip("no permission to bind-mount here")
    try:
        for target in (alias / "images", alias / "images" / "inside", alias / "runs"):
            with pytest.raises(io.DataExportError, match="data root"):
                io.export_pairs(store, "llava", target, overwrite=True)
        assert sorted(p.name for p in (home / "images").iterdir()) == images and store.count_pairs() == 6
        assert io.export_pairs(store, "llava", alias / "exports" / "x", overwrite=True).pairs == 3  # inside is fine
    finally:
        subprocess.run(["umount", str(alias)], check=True)


def test_an_export_into_a_symlink_loop_is_refused_cleanly(store, make_pairs, tmp_path, monkeypatch):
    """A path through a symlink loop cannot be resolved (Python raises RuntimeError there, which
    the CLI would show as a traceback): the export is refused with a DataExportError."""
    make_pairs([0.5])
    monkeypatch.chdir(tmp_path)
    os.symlink("L1", "L2")
    os.symlink("L2", "L1")
    with pytest.raises(io.DataExportError, match="L1"):
        io.export_pairs(store, "llava", "L1/x", include_auto=True, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["L1", "L2", "home"]  # nothing staged or left


def test_a_single_file_that_no_format_reads_says_what_to_do(store, settings, tmp_path):
    write_image(tmp_path / "photo.png", seed=3)
    (tmp_path / "notes.xyz").write_text("x")
    with pytest.raises(io.DataImportError, match="photo.png is an image file: put the images in a folder"):
        io.import_path(store, settings, tmp_path / "photo.png")
    with pytest.raises(io.DataImportError, match="notes.xyz: cannot guess the format"):
        io.import_path(store, settings, tmp_path / "notes.xyz")
    assert store.count_items() == 0


def test_folder_import_refuses_a_caption_linked_from_outside(store, settings, tmp_path):
    root = tmp_path / "f"
    write_image(root / "a.png", seed=51)
    write_image(root / "b.png", seed=52)
    secret = tmp_path / "secret.txt"
    secret.write_text("the server's private file")
    os.symlink(secret, root / "a.txt")
    (root / "b.txt").write_bytes("\ufeffA caption saved with a byte order mark.\n".encode())
    report = io.import_path(store, settings, root, "folder")
    assert report.imported == 1 and report.errors == ["a.txt: caption file points outside the import folder"]
    [item] = store.list_items()
    assert item["reference"] == "A caption saved with a byte order mark."  # no BOM kept in the text
    assert "private" not in json.dumps(store.list_items())


def test_deep_nesting_and_long_paths_refuse_their_own_record(store, settings, tmp_path):
    """JSON nested past Python's recursion limit and an image path too long for the OS refuse the
    record they are in; they used to end the import with a traceback half-way."""
    root = tmp_path / "d"
    write_image(root / "a.png", seed=61)
    write_image(root / "b.png", seed=62)
    deep = "[" * 100_000 + "]" * 100_000
    good = {"prompt": "p", "chosen": "x", "rejected": "y"}
    lines = [json.dumps({"image": "a.png", **good}),
             '{"image": "b.png", "meta": ' + deep + "}",
             json.dumps({"image": "x" * 5000 + ".png", **good}),
             json.dumps({"image": "b.png", **good, "item_meta": deep}),
             json.dumps({"image": "b.png", **good, "item_meta": "{not json"}),
             json.dumps({"image": "b.png", "prompt": 123}),
             json.dumps({"image": "b.png", **good})]
    (root / "d.jsonl").write_text("\n".join(lines) + "\n")
    report = io.import_path(store, settings, root / "d.jsonl")
    errors = "\n".join(report.errors)
    assert report.imported == 2 and report.skipped == 5, errors
    assert "line 2: invalid JSON (JSON nested too deeply)" in errors
    assert "line 3: " in errors and "cannot read the file (File name too long)" in errors
    assert "x" * 200 not in errors  # the name is shortened in the message
    assert "line 4: 'item_meta' is text that is not valid JSON (JSON nested too deeply)" in errors
    assert "line 5: 'item_meta' is text that is not valid JSON (Expecting property name" in errors
    assert "line 6: a prompt is text or a list of messages, not int" in errors
    # A whole LLaVA file nested too deeply is one clear error, not a crash.
    (root / "llava_dpo.json").write_text(deep)
    report = io.import_path(store, settings, root / "llava_dpo.json", "llava")
    assert report.status == "failed" and report.errors == ["llava_dpo.json: not valid JSON (JSON nested too deeply)"]
    assert_consistent(store, settings)


def test_meta_nested_just_below_the_parsers_limit_refuses_its_own_record(store, settings, tmp_path):
    """A depth json.loads accepts but json.dumps (a few frames deeper) does not used to end the
    import with a RecursionError traceback. Every depth around the limit: imported or refused."""
    root = tmp_path / "nest"
    write_image(root / "a.png", seed=63)
    limit = sys.getrecursionlimit()  # libraries raise it (gradio does): the window moves with it
    depths = range(limit - 400, limit + 1)
    lines = [json.dumps({"image": "a.png", "prompt": f"Q{d}?"})[:-1] + ', "item_meta": {"x": ' + "[" * d + "]" * d + "}}"
             for d in depths]
    (root / "d.jsonl").write_text("\n".join(lines) + "\n")
    report = io.import_path(store, settings, root / "d.jsonl")
    assert report.imported + report.skipped == len(depths) and report.imported > 0 and report.skipped > 0
    assert all("nested too deeply" in e for e in report.errors), report.errors[:3]
    assert_consistent(store, settings)


def test_a_symlink_loop_refuses_its_own_record(store, settings, tmp_path):
    """Path.resolve raises on a link loop (RuntimeError on Python 3.11): it stopped a folder import
    half-way with a traceback, and a JSONL record naming one did the same."""
    root = tmp_path / "loops"
    write_image(root / "a.png", seed=64)
    write_image(root / "z.png", seed=65)
    os.symlink("loop.png", root / "loop.png")
    report = io.import_path(store, settings, root, "folder")
    assert report.imported == 2, report.errors
    assert len(report.errors) == 1 and report.errors == ["loop.png: the link cannot be resolved (a symlink loop)"]
    (root / "d.jsonl").write_text("\n".join(json.dumps({"image": name, "prompt": "Which?"})
                                             for name in ("a.png", "loop.png", "z.png")) + "\n")
    report = io.import_path(store, settings, root / "d.jsonl")
    assert report.imported == 2 and len(report.errors) == 1, report.errors
    assert report.errors == ["d.jsonl line 2: image path 'loop.png' cannot be resolved (a symlink loop)"]
    assert_consistent(store, settings)


def test_an_image_file_removed_by_a_failed_concurrent_import_is_written_again(store, settings, tmp_path,
                                                                              monkeypatch):
    """Process A wrote a picture's file, process B found it there, then A's record failed and A
    removed the file it wrote: B must not commit a row naming a missing file. And a failed import
    removes its own file only while no row names it."""
    from lvlm_studio import media

    source = write_image(tmp_path / "a.png", seed=66)
    first = media.ingest_image(settings, source)  # A's file
    assert first.created
    real_ingest, calls = media.ingest_image, []

    def found_then_removed(*args, **kwargs):
        record = real_ingest(*args, **kwargs)
        calls.append(record.created)
        if len(calls) == 1:  # B found A's file; A's failed record removes it before B's row lands
            media.discard(first)
        return record

    monkeypatch.setattr(io, "ingest_image", found_then_removed)
    with io.stored_image(store, settings, source, name="a.png", source_label="upload") as image_id:
        store.add_item(image_id, "Describe.")
    assert calls == [False, True]  # found, then written again under the write lock
    assert store.integrity()["missing_files"] == []
    monkeypatch.setattr(io, "ingest_image", real_ingest)
    with pytest.raises(RuntimeError, match="body failed"):  # the row is there: the file stays
        with io.stored_image(store, settings, source, name="a.png", source_label="upload"):
            raise RuntimeError("body failed")
    assert store.integrity()["missing_files"] == []
    other = write_image(tmp_path / "b.png", seed=67)
    before = stored_files(settings)
    with pytest.raises(KeyboardInterrupt):  # not only the errors an import expects
        with io.stored_image(store, settings, other, name="b.png", source_label="upload"):
            raise KeyboardInterrupt
    assert stored_files(settings) == before and store.count_items() == 1
    assert_consistent(store, settings)


def test_files_with_a_byte_order_mark_import(store, settings, tmp_path):
    root = tmp_path / "bom"
    write_image(root / "a.png", seed=71)
    turns = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A square."}]
    llava = [{"image": "a.png", "conversations": turns,
              "rejected_conversations": [turns[0], {"from": "gpt", "value": "A star."}]}]
    (root / "llava_dpo.json").write_text("\ufeff" + json.dumps(llava), encoding="utf-8")
    (root / "d.jsonl").write_text("\ufeff" + json.dumps({"image": "a.png", "prompt": "Q?"}) + "\n", encoding="utf-8")
    assert io.detect_format(root / "llava_dpo.json") == "llava"
    assert io.import_path(store, settings, root / "llava_dpo.json").pairs == 1
    assert io.import_path(store, settings, root / "d.jsonl").status == "ok"
    coco = _coco(tmp_path / "coco")
    path = coco / "annotations" / "captions_val2017.json"
    path.write_text("\ufeff" + path.read_text(), encoding="utf-8")
    assert io.import_path(store, settings, coco).imported == 2


def test_one_malformed_coco_entry_refuses_itself_not_the_file(store, settings, tmp_path):
    root = _coco(tmp_path / "coco")
    cap_path = root / "annotations" / "captions_val2017.json"
    captions = json.loads(cap_path.read_text())
    captions["images"].append({"file_name": "000002.jpg"})  # no id
    captions["annotations"] += [{"id": 7, "image_id": 1},  # no caption
                                {"id": 8, "image_id": 1, "caption": None},
                                {"id": 9, "image_id": 2, "caption": "Another kitchen."}]
    cap_path.write_text(json.dumps(captions))
    inst_path = root / "annotations" / "instances_val2017.json"
    instances = json.loads(inst_path.read_text())
    instances["categories"].append({"id": 50, "name": None})
    instances["annotations"].append({"id": 10, "image_id": 2, "category_id": 50})
    inst_path.write_text(json.dumps(instances))
    report = io.import_path(store, settings, root)
    errors = "\n".join(report.errors)
    assert report.imported == 1, errors
    assert "captions_val2017.json images[4]: missing 'id'" in errors
    assert "captions_val2017.json annotations[3]: missing 'caption'" in errors
    assert "captions_val2017.json annotations[4]: missing 'caption'" in errors
    assert "image 2: category_id 50 has no usable name (missing 'name')" in errors
    assert "unknown category_id" not in errors
    [item] = store.list_items()
    assert item["meta"] == {"coco_id": 1, "captions": ["A dog on a couch.", "A brown dog sleeping."]}
    assert_consistent(store, settings)


def test_a_coco_file_name_that_is_not_a_name_refuses_its_image_alone(store, settings, tmp_path):
    """The first image's file_name found the images folder: a number there raised a TypeError out
    of the import (nothing landed), a 5,000-character name an OSError."""
    root = _coco(tmp_path / "coco")
    cap_path = root / "annotations" / "captions_val2017.json"
    captions = json.loads(cap_path.read_text())
    captions["images"] = [{"id": 7, "file_name": 5}, {"id": 8, "file_name": "x" * 5000},
                          {"id": 9, "file_name": ["a.jpg"]}] + captions["images"]
    cap_path.write_text(json.dumps(captions))
    report = io.import_path(store, settings, root / "annotations" / "captions_val2017.json")
    errors = "\n".join(report.errors)
    # the fixture's two good images land; its missing (3) and escaping (4) ones are refused as before
    assert report.imported == 2, errors
    assert "image 7: the image path must be text, not int (5)" in errors
    assert "image 9: the image path must be text, not list" in errors
    assert "image 8: xxxx" in errors and "File name too long" in errors
    assert [e.split(":", 1)[0] for e in report.errors] == [f"captions_val2017.json image {i}" for i in (3, 4, 7, 8, 9)]
    assert_consistent(store, settings)


def test_an_hf_image_whose_bytes_hold_a_path_is_refused_not_opened(store, settings, tmp_path):
    """A struct image's 'bytes' holding a string was opened as a path, past safe_join: any file the
    server could read was imported (and the message told a missing path from a present one)."""
    import datasets

    outside = tmp_path / "outside"
    write_image(outside / "secret.png", seed=91)
    write_image(tmp_path / "hf" / "ok.png", seed=92)
    rows = [{"image": {"bytes": str(outside / "secret.png"), "path": "x.png"}, "prompt": "P"},
            {"image": {"bytes": None, "path": "ok.png"}, "prompt": "P"}]
    ds = datasets.Dataset.from_list(rows)
    assert ds.features["image"]["bytes"] == datasets.Value("string")  # a struct column, not an Image
    ds.save_to_disk(str(tmp_path / "hf"))
    report = io.import_path(store, settings, tmp_path / "hf", "hf")
    assert report.imported == 1 and len(report.errors) == 1, report.errors
    assert "the image's 'bytes' holds str, not bytes" in report.errors[0]
    [item] = store.list_items()
    assert Path(item["image_path"]).read_bytes() != (outside / "secret.png").read_bytes()
    assert_consistent(store, settings)


def test_a_record_that_contradicts_the_stored_item_is_refused_not_dropped(store, settings, tmp_path):
    """Items are one per (image, prompt, dataset): a second record for the same item that says
    another split, reference or ground truth was reported imported while all it said was lost."""
    root = tmp_path / "dup"
    write_image(root / "a.png", seed=93)
    first = {"image": "a.png", "prompt": "Describe.", "reference": "A red square.", "objects": ["red square"],
             "split": "test", "chosen": "A red square.", "rejected": "A blue circle."}
    lines = [first,
             {**first, "split": "train"},
             {**first, "reference": "A blue circle.", "chosen": "A red square here.", "rejected": "A circle."},
             {**first, "objects": ["blue circle"], "chosen": "Red square.", "rejected": "Blue circle."},
             # the same item with another pair, and a record that leaves the reference out: both land
             {**first, "chosen": "A red square in the middle.", "rejected": "A green star."},
             {"image": "a.png", "prompt": "Describe.", "split": "test", "chosen": "Red.", "rejected": "Blue."}]
    (root / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    report = io.import_path(store, settings, root / "d.jsonl")
    assert report.imported == 3 and report.pairs == 3, report.errors
    assert report.errors == [
        "d.jsonl line 2: not stored (the store holds this image and prompt in dataset 'default' as split 'test', "
        "and this record says 'train')",
        "d.jsonl line 3: not stored (the store holds this image and prompt with another reference answer "
        "('A red square.', this record: 'A blue circle.'))",
        "d.jsonl line 4: not stored (the store holds this picture with the ground-truth objects ['red square'], "
        "and this record says ['blue circle'] (a picture has one ground truth, whichever dataset lists it))"]
    [item] = store.list_items()
    assert (item["split"], item["reference"], item["objects"]) == ("test", "A red square.", ["red square"])
    assert store.count_pairs() == 3
    assert_consistent(store, settings)


def test_imported_meta_is_bounded(store, settings, tmp_path):
    """Meta was only checked to be JSON: 30 MB of it landed in a row, and the Review page rendered a
    31-million-character pair_prompt."""
    root = tmp_path / "meta"
    write_image(root / "a.png", seed=94)
    base = {"image": "a.png", "prompt": "Describe.", "chosen": "A square.", "rejected": "A circle."}
    lines = [{**base, "item_meta": {"blob": "y" * 200_001}},
             {**base, "meta": {"blob": "y" * 200_001}},
             {**base, "meta": {"pair_prompt": "x" * 20_001}},
             {**base, "meta": {"pair_prompt": "What is <image>?"}},
             {**base, "meta": {"kind": "k" * 201}},
             {**base, "meta": {"pair_prompt": "Describe it.", "kind": "object", "blob": "y" * 150_000}}]
    (root / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    report = io.import_path(store, settings, root / "d.jsonl")
    assert report.imported == 1, report.errors
    errors = [e.split(": ", 1)[1] for e in report.errors]
    assert errors[0].startswith("item meta is 200,0") and "over the limit of 200,000" in errors[0]
    assert errors[1].startswith("pair meta is 200,0") and "over the limit of 200,000" in errors[1]
    assert errors[2].startswith("pair meta 'pair_prompt' is 20,001 characters long")
    assert errors[3].startswith("pair meta 'pair_prompt' contains the image placeholder")
    assert errors[4].startswith("pair meta 'kind' is 201 characters long")
    [pair] = [store.get_pair(i) for i in store.pair_ids()]
    assert pair["meta"]["pair_prompt"] == "Describe it." and len(pair["meta"]["blob"]) == 150_000


def test_a_stored_image_damaged_on_disk_is_written_again_by_the_next_import(store, settings, tmp_path):
    """A stored file that no longer decodes to its picture was kept as it was ("already stored"),
    and only failed later when generation read it."""
    import io as pyio

    from PIL import Image

    from lvlm_studio.media import load_image

    folder = tmp_path / "f"
    write_image(folder / "a.png", seed=95)
    write_image(folder / "b.jpg", seed=96)
    assert io.import_path(store, settings, folder).imported == 2
    png_item, jpg_item = sorted(store.list_items(), key=lambda it: it["image_path"].endswith(".jpg"))
    png_path, jpg_path = Path(png_item["image_path"]), Path(jpg_item["image_path"])
    png_path.write_bytes(png_path.read_bytes()[:40])  # truncated in place
    assert io.import_path(store, settings, folder).imported == 2
    assert load_image(png_path).size == (32, 24)  # written again, same place
    # The JPEG damaged and the same pixels brought back as a PNG (what an export embeds): the new
    # file is a PNG, and the row follows it.
    png_copy = pyio.BytesIO()
    load_image(jpg_path).save(png_copy, "PNG")
    jpg_path.write_bytes(b"\xff\xd8 damaged")
    # A record refused after the new file was written (here: it names another split) rolls the
    # row back to the damaged file, which must still be there, and leaves no new file behind.
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "b.png").write_bytes(png_copy.getvalue())
    (tmp_path / "h" / "d.jsonl").write_text(json.dumps({"image": "b.png", "prompt": jpg_item["prompt"],
                                                         "split": "test", "dataset": jpg_item["dataset"]}))
    refused = io.import_path(store, settings, tmp_path / "h" / "d.jsonl")
    assert refused.imported == 0 and "as split 'train', and this record says 'test'" in refused.errors[0]
    assert store.get_image(jpg_item["image_id"])["path"] == str(jpg_path) and jpg_path.is_file()
    assert_consistent(store, settings)
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "b-copy.png").write_bytes(png_copy.getvalue())
    assert io.import_path(store, settings, tmp_path / "g").imported == 1
    row = store.get_image(jpg_item["image_id"])
    assert row["path"].endswith(".png") and not jpg_path.exists()
    assert Image.open(row["path"]).tobytes() == Image.open(pyio.BytesIO(png_copy.getvalue())).tobytes()
    assert_consistent(store, settings)


def test_import_limit_must_be_positive(store, settings, tmp_path):
    write_image(tmp_path / "f" / "a.png", seed=81)
    for limit in (0, -1, 1.5, True):
        with pytest.raises(io.DataImportError, match="limit must be a whole number of records, 1 or more"):
            io.import_path(store, settings, tmp_path / "f", limit=limit)
    assert store.count_items() == 0


def test_coco_whole_float_ids_and_empty_captions_import(store, settings, tmp_path):
    """Ids written as 1.0 (pandas) are ids; an empty caption says nothing and is skipped without
    refusing anything; a caption that is not text, or "images": null, is named."""
    root = _coco(tmp_path / "coco")
    cap_path = root / "annotations" / "captions_val2017.json"
    captions = json.loads(cap_path.read_text())
    for entry in captions["images"] + captions["annotations"]:
        entry["id"] = float(entry["id"])
    for ann in captions["annotations"]:
        ann["image_id"] = float(ann["image_id"])
    captions["annotations"] += [{"id": 20, "image_id": 2.0, "caption": "  "}, {"id": 21, "image_id": 2, "caption": 42}]
    cap_path.write_text(json.dumps(captions))
    report = io.import_path(store, settings, root)
    errors = "\n".join(report.errors)
    assert report.imported == 2 and "annotations[4]: 'caption' must be text, not 42" in errors, errors
    assert not any("image 1:" in e or "image 2:" in e for e in report.errors)
    items = {i["meta"]["coco_id"]: i for i in store.list_items()}
    assert items[2]["meta"]["captions"] == ["A kitchen."] and items[1]["reference"] == "A dog on a couch."
    captions["images"] = None
    cap_path.write_text(json.dumps(captions))
    (root / "annotations" / "instances_val2017.json").unlink()
    report = io.import_path(store, settings, root)
    assert report.errors == ["captions_val2017.json: not a readable COCO captions file ('images' must be a list, not NoneType)"]


# ============================================================================ review: guards on every imported text
_PLACEHOLDER = "contains the image placeholder '<image>'"
_REFUSED = f"{_PLACEHOLDER}, which the exports' training tools would read as a second image; remove it"


def test_the_image_placeholder_is_refused_in_item_prompts_and_references_of_every_reader(store, settings, tmp_path):
    """An item_prompt (LLaVA / LLaMA-Factory / HF) and a reference (JSONL, COCO caption, .txt
    caption, a LLaVA-Instruct answer, an export's 'reference') reach the exports; POVID takes a
    reference as its chosen answer, and the export then held two image tokens."""
    import datasets

    root = tmp_path / "ph2"
    write_image(root / "a.png", seed=501)
    write_image(root / "b.png", seed=502)
    bad = "A bird <image> here."
    # JSONL: a reference, an object name, a prompt that keeps a second placeholder after its leading one
    lines = [{"image": "a.png", "prompt": "Describe.", "reference": bad},
             {"image": "a.png", "prompt": "<image>\nWhat is <image>?"},
             {"image": "a.png", "prompt": "Describe.", "objects": ["<image>"]},
             {"image": "b.png", "prompt": "Describe.", "reference": "A bird."}]
    (root / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    report = io.import_path(store, settings, root / "d.jsonl")
    assert report.imported == 1 and report.skipped == 3, report.errors
    assert report.errors[0].startswith(f"d.jsonl line 1: the reference {_PLACEHOLDER}")
    # several placeholders: a multi-image prompt, said as such (dropping them garbled the question)
    assert report.errors[1] == ("d.jsonl line 2: the prompt holds 2 image placeholders '<image>'; an item has one "
                                "image (multi-image prompts are not supported)")
    assert report.errors[2].startswith("d.jsonl line 3: the object name '<image>' contains")
    # LLaVA: an item_prompt, a reference in the info block, and a LLaVA-Instruct answer
    turns = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A square."}]
    rejected = [turns[0], {"from": "gpt", "value": "A circle."}]
    llava = [{"image": "a.png", "conversations": turns, "rejected_conversations": rejected,
              "lvlm_studio": {"item_prompt": "Describe <image>."}},
             {"image": "a.png", "conversations": turns, "rejected_conversations": rejected,
              "lvlm_studio": {"reference": bad}},
             {"image": "a.png", "conversations": [turns[0], {"from": "gpt", "value": bad}]}]
    (root / "llava_dpo.json").write_text(json.dumps(llava))
    report = io.import_path(store, settings, root / "llava_dpo.json", "llava")
    assert report.imported == 0 and [e.split(": ", 1)[1] for e in report.errors] == [
        f"the prompt {_REFUSED}", f"the reference {_REFUSED}", f"the reference {_REFUSED}"], report.errors
    # LLaMA-Factory: an item_prompt
    lf = [{"images": ["a.png"], "conversations": [{"from": "human", "value": "<image>Describe."}],
           "chosen": {"from": "gpt", "value": "A square."}, "rejected": {"from": "gpt", "value": "A star."},
           "lvlm_studio": {"item_prompt": "<image> Describe."}}]
    (root / "lf.json").write_text(json.dumps(lf))
    report = io.import_path(store, settings, root / "lf.json", "llamafactory")
    assert report.imported == 0 and _PLACEHOLDER in report.errors[0] and "the prompt" in report.errors[0]
    # HF: item_prompt and reference columns
    datasets.Dataset.from_dict({"image": ["a.png", "b.png", "a.png"], "prompt": ["P1", "P2", "P3"],
                                "item_prompt": ["<image>\nP1 <image>", None, None],
                                "reference": [None, bad, "fine"]}).save_to_disk(str(root / "hf"))
    write_image(root / "hf" / "a.png", seed=501)
    write_image(root / "hf" / "b.png", seed=502)
    report = io.import_path(store, settings, root / "hf", "hf")
    assert report.imported == 1 and [e.split(": ", 1)[1] for e in report.errors] == [
        f"the prompt {_REFUSED}", f"the reference {_REFUSED}"], report.errors
    # Folder: a .txt caption; COCO: a caption
    folder = tmp_path / "folder"
    write_image(folder / "c.png", seed=503)
    (folder / "c.txt").write_text(bad)
    write_image(folder / "d.png", seed=504)
    report = io.import_path(store, settings, folder, "folder")
    assert report.imported == 1 and report.errors == [f"c.png: the reference {_REFUSED}"]
    coco = tmp_path / "coco"
    write_image(coco / "e.png", seed=505)
    (coco / "captions_train.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "e.png"}], "annotations": [{"image_id": 1, "caption": bad}]}))
    report = io.import_path(store, settings, coco / "captions_train.json", "coco")
    assert report.imported == 0 and f"the reference {_PLACEHOLDER}" in report.errors[0]
    assert not any("<image>" in (it["prompt"] + (it["reference"] or "")) for it in store.list_items())
    assert_consistent(store, settings)


def test_imported_texts_and_names_are_bounded_record_by_record(store, settings, tmp_path):
    """A 20-million character prompt or a 30 MB .txt caption imported whole; now a prompt, an
    answer or a reference over TEXT_MAX_CHARS, or a method / dataset / split / object name over
    NAME_MAX_CHARS, refuses its own record, and the records around it land."""
    from lvlm_studio.service import EDIT_MAX_CHARS

    assert io.TEXT_MAX_CHARS == EDIT_MAX_CHARS  # the app's own bound on an answer
    root = tmp_path / "long"
    for k in range(9):
        write_image(root / f"i{k}.png", seed=520 + k)
    limit, name = io.TEXT_MAX_CHARS, io.NAME_MAX_CHARS
    good = {"prompt": "Q?", "chosen": "a", "rejected": "b"}
    lines = [{"image": "i0.png", **good, "prompt": "p" * (limit + 1)},
             {"image": "i1.png", **good, "chosen": "c" * (limit + 1)},
             {"image": "i2.png", "prompt": "Q?", "reference": "r" * (limit + 1)},
             {"image": "i3.png", **good, "method": "m" * (name + 1)},
             {"image": "i4.png", **good, "dataset": "d" * (name + 1)},
             {"image": "i5.png", **good, "split": "s" * (name + 1)},
             {"image": "i6.png", "prompt": "Q?", "objects": ["o" * (name + 1)]},
             {"image": "i7.png", "prompt": "p" * limit, "reference": "r" * limit, "chosen": "c" * limit,
              "rejected": "b" * limit, "method": "m" * name, "dataset": "d" * name, "objects": ["o" * name]}]
    (root / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    report = io.import_path(store, settings, root / "d.jsonl")
    assert report.imported == 1 and report.pairs == 1 and report.skipped == 7, report.errors
    over = f"{limit + 1:,} characters long, over the limit of {limit:,} for an imported text"
    assert report.errors[:3] == [f"d.jsonl line 1: the prompt is {over}; shorten it",
                                 f"d.jsonl line 2: the chosen answer is {over}; shorten it",
                                 f"d.jsonl line 3: the reference is {over}; shorten it"]
    for line, what in ((4, "'method'"), (5, "'dataset'"), (6, "'split'"), (7, "an object name")):
        assert report.errors[line - 1].startswith(
            f"d.jsonl line {line}: {what} is {name + 1} characters long, over the limit of {name} for a name")
    [item] = store.list_items()
    assert len(item["prompt"]) == limit and len(item["reference"]) == limit
    with pytest.raises(io.DataImportError, match="the dataset name is 201 characters long"):
        io.import_path(store, settings, root / "d.jsonl", dataset="d" * (name + 1))
    with pytest.raises(io.DataImportError, match="the prompt is 20,001 characters long"):
        io.import_path(store, settings, root, "folder", prompt="p" * (limit + 1))
    assert_consistent(store, settings)


def test_a_huge_caption_file_is_refused_without_being_read(store, settings, tmp_path, monkeypatch):
    root = tmp_path / "captions"
    write_image(root / "a.png", seed=540)
    write_image(root / "b.png", seed=541)
    write_image(root / "c.png", seed=542)
    with open(root / "a.txt", "wb") as fh:  # 30 MB, sparse: nothing to write
        fh.truncate(30_000_000)
    (root / "b.txt").write_text("x" * (io.TEXT_MAX_CHARS + 1))  # under the byte bound, over the characters
    (root / "c.txt").write_text("é" * io.TEXT_MAX_CHARS)  # the limit is characters, not bytes
    read_sizes = []
    real_open = Path.open

    def tracked_open(self, *args, **kwargs):
        fh = real_open(self, *args, **kwargs)
        if self.suffix == ".txt":
            real_read = fh.read

            def read(n=-1):
                read_sizes.append(n)
                return real_read(n)
            fh.read = read
        return fh

    monkeypatch.setattr(Path, "read_text", lambda *a, **k: pytest.fail("a caption read whole"))
    monkeypatch.setattr(Path, "open", tracked_open)
    report = io.import_path(store, settings, root, "folder")
    assert report.imported == 1 and report.skipped == 2, report.errors
    assert report.errors == [
        "a.txt: the caption file is 30,000,000 bytes, more than 20,000 characters can take (the limit for an "
        "imported text); shorten it",
        "b.txt: the caption is 20,001 characters long, over the limit of 20,000 for an imported text; shorten it"]
    assert read_sizes and all(0 < n <= io.CAPTION_FILE_MAX_BYTES + 1 for n in read_sizes)
    [item] = store.list_items()
    assert item["reference"] == "é" * io.TEXT_MAX_CHARS


def test_malformed_save_to_disk_folders_are_one_clear_refusal(store, settings, tmp_path):
    """state.json / dataset_dict.json that parse but have the wrong shape escaped as a TypeError or
    KeyError traceback out of the import."""
    import datasets

    made = tmp_path / "made"
    datasets.Dataset.from_dict({"image": ["a.png"], "prompt": ["P"]}).save_to_disk(str(made))
    cases = {"state_int": ("state.json", {"_data_files": 5}), "state_empty": ("state.json", {}),
             "dict_int": ("dataset_dict.json", {"splits": 5})}
    for name, (file, content) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        for f in made.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        if file == "dataset_dict.json":
            (folder / "state.json").unlink()
        (folder / file).write_text(json.dumps(content))
        assert io.detect_format(folder) == "hf"
        report = io.import_path(store, settings, folder)
        assert report.status == "failed" and len(report.errors) == 1, report.errors
        assert report.errors[0].startswith(f"{name}: not a dataset saved with save_to_disk (its state.json or "
                                           "dataset_dict.json is malformed: "), report.errors
    assert report.errors[0].endswith("TypeError: 'int' object is not iterable)")


def test_an_image_whose_file_name_is_not_utf8_imports_with_its_name_escaped(store, settings, tmp_path):
    root = tmp_path / "names"
    root.mkdir()
    raw = os.fsencode(root)
    (Path(os.fsdecode(raw + b"/caf\xe9.png"))).write_bytes(image_bytes(550, "PNG"))
    Path(os.fsdecode(raw + b"/caf\xe9.txt")).write_text("A café.")
    write_image(root / "plain.png", seed=551)
    report = io.import_path(store, settings, root, "folder")
    assert report.status == "ok" and report.imported == 2, report.errors
    files = {it["meta"]["file"]: it for it in store.list_items()}
    assert set(files) == {"caf\\xe9.png", "plain.png"} and files["caf\\xe9.png"]["reference"] == "A café."
    assert io.safe_name("caf\udce9.png") == "caf\\xe9.png" and io.safe_name("x\ud800") == "x\\ud800"
    assert_consistent(store, settings)


def test_missing_fields_and_values_of_the_wrong_type_are_named(store, settings, tmp_path):
    root = tmp_path / "types"
    write_image(root / "a.png", seed=560)
    write_image(root / "b.png", seed=561)
    lf = [{"images": ["a.png"], "conversations": [{"from": "human", "value": "<image>Describe."}],
           "rejected": {"from": "gpt", "value": "A star."}},
          {"images": ["b.png"], "conversations": [{"from": "human", "value": "<image>Describe."}],
           "chosen": {"from": "gpt", "value": "A star."}, "rejected": {"from": "gpt", "value": "A dot."}}]
    (root / "lf.json").write_text(json.dumps(lf))
    report = io.import_path(store, settings, root / "lf.json", "llamafactory")
    assert report.imported == 1 and report.errors == [
        "lf.json record 0: a LLaMA-Factory ranking record needs 'chosen' and 'rejected'; 'chosen' is missing"]
    row = {"image": "a.png", "prompt": "Q?", "chosen": "A.", "rejected": "B.", "status": "accept"}
    lines = [{**row, "reviewer": {"name": "bob"}}, {**row, "reviewer": 7},
             {"image": "a.png", "prompt": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
             {"image": "a.png", "prompt": [{"role": "user"}]}]
    (root / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    report = io.import_path(store, settings, root / "d.jsonl")
    assert report.errors == ["d.jsonl line 1: 'reviewer' must be a name (text), not dict",
                             "d.jsonl line 2: 'reviewer' must be a name (text), not int",
                             "d.jsonl line 3: a message's text part must hold text, not int (5)",
                             "d.jsonl line 4: a message has no 'content' (nor 'value')"]
    assert store.count_pairs() == 1  # the LLaMA-Factory record's only


def test_an_export_onto_a_file_is_refused_even_with_overwrite(store, make_pairs, tmp_path):
    make_pairs([0.5])
    (tmp_path / "afile").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(io.DataExportError, match="afile exists and is a file, not a folder"):
            io.export_pairs(store, "llava", tmp_path / "afile", include_auto=True, overwrite=overwrite)
        assert (tmp_path / "afile").is_file() and (tmp_path / "afile").read_text() == "x"
