"""The run report (``detrkit report``, ``report.html``) and the query statistics training records for it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from test_engine import LISTENERS_ON, final_weights, shapes, tiny_config  # noqa: F401 - shapes is a fixture

import detrkit
from detrkit.cli import main
from detrkit.config import load_run_config
from detrkit.data import CocoDetection, collate
from detrkit.engine import Trainer, build_criterion
from detrkit.report import write_report
from detrkit.transforms import eval_transforms

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


@pytest.fixture(scope="module")
def run(shapes, tmp_path_factory) -> Path:  # noqa: F811 - shapes is a fixture
    out = tmp_path_factory.mktemp("report") / "run"
    Trainer(tiny_config(shapes, out, "train.epochs=2", *LISTENERS_ON)).fit()  # the report and query statistics
    return out


def test_query_stats_record_the_losss_matching(run, shapes):  # noqa: F811
    stats = json.loads((run / "query_stats.json").read_text())
    config = load_run_config(run / "config.yaml")
    q = config.model.num_queries
    # at the start and at the end of each epoch of 4 steps (quarter epochs, but no more often than every 20 steps)
    assert [r["step"] for r in stats["records"]] == [0, 4, 8]
    assert [r["epoch"] for r in stats["records"]] == [0, 1, 2]
    probe = CocoDetection(
        shapes["train_images"], shapes["train_annotations"], transforms=eval_transforms(size=64, max_size=80)
    )
    assert stats["image_ids"] == [probe[i][1]["image_id"] for i in range(len(probe))]  # 8 images: all of them
    assert len(stats["objects"]) == sum(len(probe[i][1]["labels"]) for i in range(len(probe)))
    assert all(-1 <= x < q for r in stats["records"] for x in r["query"])
    # the last record is the final model's Hungarian matching of the probe images
    model = detrkit.load(run / "model").eval()
    criterion = build_criterion(config, config.model.num_classes)
    expected = []
    with torch.no_grad():
        for start in (0, 2, 4, 6):
            batch = collate([probe[i] for i in range(start, start + 2)])
            for target, (pred, tgt) in zip(
                batch.targets,
                criterion.match(model(batch.pixel_values, batch.padding_mask), batch.targets),
                strict=True,
            ):
                assigned = dict(zip(tgt.tolist(), pred.tolist(), strict=True))
                expected += [assigned[j] for j in range(len(target["labels"]))]
    assert stats["records"][-1]["query"] == expected


def test_query_stats_leave_training_unchanged(shapes, tmp_path):  # noqa: F811
    # dropout draws from the run's random stream, and a record falls between the two steps (at epoch 1's end)
    extra = ("train.epochs=2", "train.max_steps_per_epoch=1", "model.dropout=0.1", "train.report=false",
             "data.val_annotations=null")  # fmt: skip
    Trainer(tiny_config(shapes, tmp_path / "on", *extra, "train.query_stats_images=8")).fit()
    Trainer(tiny_config(shapes, tmp_path / "off", *extra, "train.query_stats_images=0")).fit()
    assert (tmp_path / "on" / "query_stats.json").is_file() and not (tmp_path / "off" / "query_stats.json").exists()
    on, off = final_weights(tmp_path / "on"), final_weights(tmp_path / "off")
    assert all(torch.equal(on[k], off[k]) for k in on)


def test_the_report_is_one_self_contained_page(run):
    page = (run / "report.html").read_text()  # written when training completed
    for anchor in ("run", "curves", "metrics", "gallery", "explain", "queries", "matching"):
        assert f'<section id="{anchor}">' in page, anchor
    assert page.count("data:image/png;base64,") >= 6
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing from a network
    assert "AP50" in page and "circle" in page and "resolved config" in page


def test_report_command_per_class_table_and_bad_folders(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics["per_class"] = {
        "circle": {"category_id": 1, "AP": 0.25, "AP50": 0.5},
        "square": {"category_id": 3, "AP": 0.75, "AP50": 0.9},
    }
    (copy / "metrics.json").write_text(json.dumps(metrics))
    (copy / "model").rename(copy / "elsewhere")  # the report then reads best/
    out = tmp_path / "page.html"
    assert main(["report", str(copy), "--out", str(out), "--images", "2", "--device", "cpu"]) == 0
    assert str(out) in capsys.readouterr().out
    page = out.read_text()
    assert '<table class="sortable"><caption>metrics.json: per_class</caption>' in page
    assert page.count('data-v="0.75"') == 1 and "2 validation images" in page
    assert main(["report", str(tmp_path / "nothing")]) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        write_report(tmp_path / "empty")


def _browser() -> str | None:
    return next((b for b in BROWSERS if shutil.which(b)), None)


@pytest.mark.skipif(_browser() is None, reason="no chromium / chrome installed")
def test_the_report_renders_in_a_headless_browser(run, tmp_path):
    browser = _browser()
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    shot = tmp_path / "report.png"
    subprocess.run([*flags, "--window-size=1200,2400", f"--screenshot={shot}", (run / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    from PIL import Image

    pixels = torch.from_numpy(np.array(Image.open(shot).convert("RGB")))
    assert pixels.shape[:2] == (2400, 1200)
    assert float((pixels < 250).any(-1).float().mean()) > 0.05  # text and pictures, not a blank page
    # clicking a header sorts the table (the page's own script, run by the browser)
    page = (run / "report.html").read_text().replace("<table>", '<table class="sortable">', 1)
    click = "<script>document.querySelector('table.sortable th:nth-child(2)').click();</script></body>"
    (tmp_path / "click.html").write_text(page.replace("</body>", click))
    dom = subprocess.run([*flags, "--dump-dom", (tmp_path / "click.html").as_uri()], check=True, capture_output=True,
                         text=True, timeout=120).stdout  # fmt: skip
    assert 'data-order="desc"' in dom


def test_an_evaluation_between_updates_sees_the_new_weights():
    # QueryStats (and per-epoch evaluation) run the model without gradients between training steps; the backbone's
    # folded-BatchNorm cache must not outlive the fused optimizer's in-place updates (they keep version counters).
    from conftest import tiny_model

    model = tiny_model()
    x, mask = torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model.eval()
    with torch.no_grad():
        model(x, mask)  # fills the cache
    model.train()
    model(x, mask)["pred_boxes"].sum().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        seen = model(x, mask)["pred_boxes"]
    fresh = tiny_model()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(seen, fresh.eval()(x, mask)["pred_boxes"])
