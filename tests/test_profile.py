"""`splitserve profile` on a tiny model (the real grid, a few seconds), and the autoscale flags' errors."""

import pytest
import yaml

from helpers import make_tiny_model
from splitserve.autoscaler.catalog import Catalog
from splitserve.platform.cli import main


def test_profile_writes_a_catalog_entry_fitted_to_its_measurements(tmp_path, capsys):
    model = tmp_path / "model"
    make_tiny_model(str(model), "llama", max_position_embeddings=1024)
    out = tmp_path / "catalog.yaml"
    args = ["profile", "--model", str(model), "--cost-per-hour", "0.2", "--out", str(out), "--max-seconds", "30",
            "--kv-cache-memory-mb", "16", "--dtype", "float32"]
    assert main(args + ["--name", "tiny"]) == 0
    err = capsys.readouterr().err
    assert "profile [1/" in err and "wrote tiny" in err  # progress, then the result
    t = Catalog.from_yaml(str(out)).get("tiny")
    assert t.cost_per_hour == 0.2 and t.kv_tokens > 0 and t.max_batch >= 1
    m = t.measured
    assert len(m["prefill_samples"]) >= 3 and len(m["decode_samples"]) >= 3
    worst = {"prefill": 0.0, "decode": 0.0}
    for kind, model_ in (("prefill", t.prefill), ("decode", t.decode)):
        for x, y, seconds in m[f"{kind}_samples"]:
            worst[kind] = max(worst[kind], abs(model_(x, y) - seconds) / seconds)
    assert worst == pytest.approx({k: v for k, v in m["worst_fit_error"].items()}, abs=1e-3)  # reported honestly
    assert t.prefill.seconds(1000) > t.prefill.seconds(10) and t.decode(32, 32 * 500) > t.decode(1, 10)
    # a second type goes beside the first
    assert main(args + ["--name", "tiny-b", "--append", "--max-seconds", "1"]) == 0
    assert sorted(Catalog.from_yaml(str(out)).types) == ["tiny", "tiny-b"]
    assert main(["profile", "--cost-per-hour", "-1", "--out", str(out)]) == 2
    assert "--cost-per-hour must be >= 0" in capsys.readouterr().err


def test_autoscale_flags_say_what_is_missing(tmp_path, capsys):
    assert main(["serve", "--autoscale"]) == 2
    assert "--autoscale needs an instance catalog: --catalog FILE" in capsys.readouterr().err
    assert main(["serve", "--catalog", "x.yaml"]) == 2
    assert "go with --autoscale" in capsys.readouterr().err
    assert main(["serve", "--autoscale", "--catalog", str(tmp_path / "none.yaml")]) == 2
    assert "no file" in capsys.readouterr().err
    catalog = tmp_path / "c.yaml"
    catalog.write_text(yaml.safe_dump({"instance_types": [{"name": "a", "cost_per_hour": 1,
                                                           "prefill": {"a": 0, "b": 0.001},
                                                           "decode": {"a": 0.02, "b": 0.001}}]}))
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"autoscale": {"catalog": str(catalog), "objectives": {"ttft": 2}}}))
    assert main(["serve", "--config", str(config), "--autoscale"]) == 2
    assert "unknown keys ['ttft']" in capsys.readouterr().err
    assert main(["serve", "--autoscale", "--catalog", str(catalog), "--tpot-objective", "-1"]) == 2
    assert "objective tpot_s must be a number of seconds > 0" in capsys.readouterr().err
