"""``reproduce.py paper``: the paper's CIFAR-10 protocol end to end, on the tiny CIFAR folder."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import paper_protocol


def test_the_recipe_is_the_papers():
    argv = paper_protocol.arguments("cifar_resnet110", "L2", Path("out"), "data", 64000, 128, 2)
    joined = " ".join(argv)
    assert "--batch-size 128" in joined and "--iterations 64000" in joined
    assert "--decay-steps 32000 48000" in joined and "--augment cifar" in joined
    assert "--baseline" in argv and "act_layer=relu" in argv
    assert "--warmup-steps 400 --warmup-lr 0.01" in joined  # He et al.'s ResNet-110 start
    ortho = " ".join(paper_protocol.arguments("plain_cnn44", "ortho", Path("out"), "data", 2000, 128, 2))
    assert "--max-grad-ratio 0 --no-modulation" in ortho and "--decay-steps 1000 1500" in ortho
    assert "--warmup" not in ortho and "--baseline" not in ortho


@pytest.mark.timeout(600)
def test_paper_suite_end_to_end_on_a_tiny_cifar(tmp_path, write_cifar):
    write_cifar(tmp_path / "data")
    out = tmp_path / "out"
    record = paper_protocol.run_protocol(
        out, str(tmp_path / "data"), ["plain_cnn44"], ["L2", "ortho"], 2, 4, 0, append=False
    )
    saved = json.loads((out / "paper.json").read_text())
    assert saved == json.loads(json.dumps(record))
    for regime in ("L2", "ortho"):
        run = saved["runs"][f"plain_cnn44-{regime}"]
        assert run["complete"] and run["updates"] == 2 and 0 <= run["error"] <= 100
        assert (out / f"plain_cnn44-{regime}" / "summary.json").is_file()
    text = paper_protocol.table(saved)
    assert "| plain_cnn44 |" in text and "16.3 %" in text and "12.8 %" in text
    # --append keeps finished runs: nothing is trained again.
    again = paper_protocol.run_protocol(
        out, str(tmp_path / "data"), ["plain_cnn44"], ["L2", "ortho"], 2, 4, 0, append=True
    )
    assert again["runs"] == saved["runs"]
