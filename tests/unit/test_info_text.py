"""`headscope info` prints per-layer settings as runs of layers, not a 30-item tuple."""

from __future__ import annotations

from headscope.cli import main
from headscope.cli.runs import per_layer_text
from tests.tiny_models import save_tiny


def test_per_layer_settings_read_as_runs_of_layers():
    assert per_layer_text((None,) * 30) == "all 30 layers: full"
    assert per_layer_text([4, 4, None, 4, None]) == (
        "layers 0-1: 4, layer 2: full, layer 3: 4, layer 4: full"
    )
    assert per_layer_text((512,)) == "layer 0: 512"


def test_info_prints_the_window_in_one_short_line(tmp_path, capsys):
    for arch in ("llama", "gemma2"):
        model = save_tiny(arch, tmp_path / arch)
        assert main(["info", "--model", str(model)]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if "sliding_window" in x)
        assert "None" not in line and "layer" in line, line
