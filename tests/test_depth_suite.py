"""``reproduce.py depth | defaults | deep | bounds``: what ``--append`` plans again."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import depth_suite
import reproduce


def test_append_plans_again_a_cell_a_deadline_cut_short_and_keeps_the_complete_ones(tmp_path, monkeypatch):
    complete, cut = depth_suite.CORE[0], depth_suite.CORE[1]

    def entry(regime: str, seed: int) -> dict:
        return {"dataset": "digits", "regime": regime, "depth": 20, "seed": seed}

    saved = {"results": [entry(complete, 0), entry(complete, 1), entry(cut, 0)]}
    saved["grid"] = [entry(complete, 0), entry(cut, 0)]
    (tmp_path / "depth.json").write_text(json.dumps(saved))
    planned, written = [], {}

    def run_suite(cells, *args, **kwargs):
        planned.extend((c[0], c[1], c[2]) for c in cells)
        return [], []

    def write(results, budget, out, name, grid=None):
        written.update(results=results, grid=grid)
        return []

    monkeypatch.setattr(depth_suite, "run_suite", run_suite)
    monkeypatch.setattr(depth_suite, "write", write)
    argv = ["depth", "--depths", "20", "--datasets", "digits", "--regimes", complete, cut]
    argv += ["--seeds", "0", "1", "--jobs", "1", "--device", "cpu", "--append", "--out", str(tmp_path)]
    reproduce.run_depth(reproduce.build_parser().parse_args(argv))
    assert planned == [("digits", cut, 20)]  # the cut cell again, whole; the complete one not
    assert written["results"] == [entry(complete, 0), entry(complete, 1)]
    assert written["grid"] == [entry(complete, 0)]
