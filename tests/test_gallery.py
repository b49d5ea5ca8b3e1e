"""The gallery cannot drift: every committed ``experiments/*/README.md`` equals what its
template and committed records generate, and the check catches a hand edit of a number
(proved on copies, for a synthetic page and for every real page)."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from ntkexp import gallery
from ntkexp.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_run(path, summary, *, config="configs/demo.yaml", preset="cpu", commit="a" * 40):
    os.makedirs(os.path.join(path, "figures"), exist_ok=True)
    with open(os.path.join(path, "summary.json"), "w") as f:
        json.dump(summary, f)
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({"experiment": "demo", "config_source": config, "preset": preset,
                   "git_commit": commit, "git_dirty": False, "wall_time_s": 12.5,
                   "finished": "2026-12-04T01:00:00+0000", "device": "cpu"}, f)
    with open(os.path.join(path, "figures", "demo.png"), "wb") as f:
        f.write(b"\x89PNG fake")
    return path


def _page(root, name="demo", template=None):
    d = os.path.join(root, "experiments", name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, gallery.TEMPLATE), "w") as f:
        f.write(template or "# Demo\n\n| w | acc |\n|---|---|\n"
                "| 64 | {{ demo-cpu.acc.64 :.3f }} |\n| 256 | {{ demo-cpu.acc.256 :.3f }} |\n"
                "loss {{ demo-cpu.losses.1 :.2e }}, runs {{ demo-cpu.n }}, "
                "{{ demo-cpu.wall_s :.0f }} s at {{ demo-cpu.commit }}\n")
    return d


def test_record_and_render_fill_numbers_from_the_summary(tmp_path):
    root = str(tmp_path)
    summary = {"acc": {"64": 0.91234, "256": 0.87654}, "losses": [1.0, 3.14159e-5], "n": 3}
    run = _fake_run(os.path.join(root, "runs", "demo-cpu"), summary,
                    config=os.path.join(root, "configs", "demo.yaml"))
    d = _page(root)
    rec_path = gallery.write_record(run, "demo", root=root)
    assert rec_path == os.path.join(d, "results", "demo-cpu.json")
    rec = json.load(open(rec_path))
    assert set(gallery.RECORD_KEYS) <= set(rec)
    assert rec["config"] == "configs/demo.yaml" and rec["preset"] == "cpu"
    assert rec["commit"] == "a" * 40 and rec["summary"] == summary and rec["wall_s"] == 12.5
    assert os.path.exists(os.path.join(d, "demo-cpu.png"))
    text = gallery.render_page(d)
    assert text.startswith(gallery.HEADER)
    assert "| 64 | 0.912 |" in text and "| 256 | 0.877 |" in text
    assert "loss 3.14e-05, runs 3, 12 s at " + "a" * 40 in text
    assert "`results/demo-cpu.json`" in text  # provenance row
    rec["summary"]["ngd"] = {"0.25": {"rate": 0.75}, "exp(u - 1)": 1.5}
    assert gallery.lookup(rec, "ngd.0.25.rate") == 0.75
    assert gallery.lookup(rec, "ngd.exp(u - 1)") == 1.5
    assert gallery.lookup(rec, "losses.-1") == summary["losses"][-1]
    assert gallery.render_text("{{ demo-cpu.ngd.exp(u - 1) :.2f }}", {"demo-cpu": rec})[0] == "1.50"
    assert gallery.wanted_runs(root) == [("demo", "demo-cpu", "configs/demo.yaml", "cpu")]


def test_check_catches_an_edited_number_and_an_edited_record(tmp_path):
    root = str(tmp_path)
    run = _fake_run(os.path.join(root, "run"), {"acc": {"64": 0.5, "256": 0.25},
                                                "losses": [1, 2], "n": 1})
    d = _page(root)
    gallery.write_record(run, "demo", root=root)
    gallery.render_all(root)
    assert gallery.check_pages(root) == []
    readme = os.path.join(d, "README.md")
    good = open(readme).read()
    open(readme, "w").write(good.replace("0.500", "0.501"))
    assert gallery.check_pages(root) == [d]
    open(readme, "w").write(good)
    rec = os.path.join(d, "results", "demo-cpu.json")
    r = json.load(open(rec))
    r["summary"]["acc"]["256"] = 0.3
    json.dump(r, open(rec, "w"))
    assert gallery.check_pages(root) == [d]
    assert main(["gallery", "check", "--root", root]) == 2
    assert main(["gallery", "render", "--root", root]) == 0
    assert main(["gallery", "check", "--root", root]) == 0


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    root = str(tmp_path)
    d = _page(root, template="x {{ demo-cpu.nope }}\n")
    with pytest.raises(gallery.GalleryError, match="no record 'demo-cpu'"):
        gallery.render_page(d)
    _fake_run(os.path.join(root, "run"), {"acc": 1})
    gallery.write_record(os.path.join(root, "run"), "demo", root=root)
    with pytest.raises(gallery.GalleryError, match=r"README.template.md:1: .*no key 'nope'"):
        gallery.render_page(d)
    _page(root, template="x {{ demo-cpu.acc :.3q }}\n")
    with pytest.raises(gallery.GalleryError, match="cannot format"):
        gallery.render_page(d)
    os.remove(os.path.join(root, "run", "meta.json"))
    assert main(["gallery", "record", os.path.join(root, "run"), "--page", "demo",
                 "--root", root]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did not finish" in err[0]


def test_record_of_a_real_run(tmp_path):
    """A real (tiny) run: the record carries the run's own commit and summary."""
    from ntkexp import config as C
    from ntkexp.experiments import run

    root = str(tmp_path)
    shutil.copytree(os.path.join(ROOT, "configs"), os.path.join(root, "configs"))
    cfg = C.load(os.path.join(root, "configs", "bietti2019_spectrum.yaml"), preset="tiny")
    out = os.path.join(root, "runs", "b")
    res = run(cfg, out, quiet=True)
    _page(root, "bietti", template="mu0 {{ bietti2019_spectrum-tiny.per_dim.3.mu_0 :.4f }}\n")
    gallery.write_record(out, "bietti", root=root)
    rec = json.load(open(os.path.join(root, "experiments", "bietti", "results",
                                      "bietti2019_spectrum-tiny.json")))
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert rec["commit"] == meta["git_commit"] and rec["summary"] == json.load(
        open(os.path.join(out, "summary.json")))
    assert rec["config"] == "configs/bietti2019_spectrum.yaml"
    assert os.path.exists(os.path.join(root, "experiments", "bietti",
                                       "bietti2019_spectrum-tiny.png"))
    # mu_0 of the ReLU NTK on the sphere S^2 is 1/2 (Bietti & Mairal 2019)
    assert "mu0 0.5000" in gallery.render_page(os.path.join(root, "experiments", "bietti"))
    assert res.summary["per_dim"]["3"]["mu_0"] == pytest.approx(0.5)


REAL_PAGES = gallery.pages(ROOT)


def test_committed_pages_match_their_records():
    bad = gallery.check_pages(ROOT)
    assert bad == [], f"pages differ from their records (run `ntkexp gallery render`): {bad}"


@pytest.mark.parametrize("page", REAL_PAGES, ids=os.path.basename)
def test_check_fails_on_a_hand_edited_copy_of_each_page(page, tmp_path):
    root = str(tmp_path)
    shutil.copytree(page, os.path.join(root, "experiments", os.path.basename(page)))
    assert gallery.check_pages(root) == []
    readme = os.path.join(root, "experiments", os.path.basename(page), "README.md")
    text = open(readme).read()
    body = text[len(gallery.HEADER):text.index("## Records behind this page")]
    tpl = open(os.path.join(page, gallery.TEMPLATE)).read()
    # a digit produced by a placeholder: the first number that the template does not contain
    m = next((m for m in re.finditer(r"\d+\.\d+", body) if m.group() not in tpl), None)
    assert m is not None, "page shows no generated number"
    i = len(gallery.HEADER) + m.end() - 1
    edited = text[:i] + ("1" if text[i] != "1" else "2") + text[i + 1:]
    open(readme, "w").write(edited)
    assert gallery.check_pages(root) == [os.path.dirname(readme)]
