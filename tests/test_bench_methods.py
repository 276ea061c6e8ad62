"""`make bench-methods`: the per-method cost table, run for real on two methods with a few steps."""

import json

from kd_experiments.bench_methods import all_methods, faster, main, markdown_table

# FitNet's hint regressor on stages[2] of resnet56 -> resnet20 (both 32 x 16 x 16, so mdistiller's ConvReg
# is a 1x1 conv): conv 32*32 weights + 32 bias = 1056, BatchNorm2d(32) weight + bias = 64; 1056 + 64 = 1120.
FITNET_REGRESSOR_PARAMS = 32 * 32 + 32 + 2 * 32


def test_kd_and_fitnet_are_measured(tmp_path, capsys):
    arguments = ["--methods", "kd,fitnet", "--steps", "3", "--warmup", "1", "--rounds", "1"]
    main([*arguments, "--output", str(tmp_path)])

    result = json.loads((tmp_path / "methods.json").read_text())
    methods = result["methods"]
    assert list(methods) == ["kd", "fitnet"]
    for name, entry in methods.items():
        assert entry["status"] == "ok", (name, entry)
        assert (entry["teacher"], entry["student"]) == ("resnet56", "resnet20")
        assert entry["ms_per_step"] > 0 and entry["ms_per_step_rounds"] == [entry["ms_per_step"]]
        assert isinstance(entry["peak_mem_mb"], int | float) and entry["peak_mem_mb"] >= 0
    assert methods["kd"]["extra_params"] == 0
    assert methods["fitnet"]["extra_params"] == FITNET_REGRESSOR_PARAMS == 1120
    assert methods["fitnet"]["extra_params_beside_student"] == FITNET_REGRESSOR_PARAMS  # a side branch
    context = result["context"]
    assert (context["steps_timed"], context["warmup_steps"], context["device"]) == (3, 1, "cpu")
    assert context["torch_threads"] >= 1 and context["torch_version"]

    table = (tmp_path / "methods.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "ms/step" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| kd", "| fitnet"]
    assert table in capsys.readouterr().out  # the printed table is the written one


def test_table_marks_other_pairs_and_refusals():
    """A method run on another pair is compared with kd on that pair; a refused one keeps its reason."""
    row = {"status": "ok", "teacher": "resnet56", "student": "resnet20", "extra_params": 0, "peak_mem_mb": 1}
    methods = {
        "kd": row | {"ms_per_step": 100.0},
        "deit": row
        | {"status": "ok (other pair)", "student": "deit_ti", "ms_per_step": 300.0}
        | {"default_pair_error": "needs a two-headed student"},
        "odd": {"status": "not run", "reason": "refuses every pair"},
    }
    references = {"kd@resnet56 -> deit_ti": row | {"student": "deit_ti", "ms_per_step": 200.0}}
    table = markdown_table(methods, references)
    assert "| kd | 100.0 | 1.00 | 0 | 1.0 |" in table
    assert "| deit (resnet56 → deit_ti) | 300.0 | 1.50 | 0 | 1.0 |" in table
    assert "| odd | not run: refuses every pair | | | |" in table
    assert "deit: refuses resnet56 -> resnet20 (needs a two-headed student)" in table


def test_later_rounds_keep_the_faster_run():
    first = {"status": "ok (other pair)", "ms_per_step": 300.0, "ms_per_step_rounds": [300.0]}
    first["peak_mem_mb"] = 9
    again = {"status": "ok", "ms_per_step": 250.0, "ms_per_step_rounds": [250.0], "peak_mem_mb": 8}
    kept = faster(first, again)
    assert (kept["status"], kept["ms_per_step"], kept["peak_mem_mb"]) == ("ok (other pair)", 250.0, 8)
    assert kept["ms_per_step_rounds"] == [300.0, 250.0]
    assert faster(kept, {"error": "crashed", "refused": False})["ms_per_step_rounds"] == [300.0, 250.0, None]
    assert faster(kept, again | {"ms_per_step": 400.0})["ms_per_step"] == 250.0


def test_every_method_config_is_benchmarked():
    assert {"ce", "kd", "fitnet", "deit", "srd+nd"} <= set(all_methods())
