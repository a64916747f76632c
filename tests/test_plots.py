"""plot_run: one valid PNG per group of logged metrics, nothing for groups the run did not log; read_metrics errors."""
import json
import math
import struct

import pytest

pytest.importorskip("matplotlib", reason="plots need matplotlib (pip install matplotlib)")

from fastrft.plots import _series, plot_run, read_metrics  # noqa: E402
from fastrft.rundir import RunDir  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _write(run_dir, records, blank_lines=True):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for record in records:
        lines.append(json.dumps(record))
        if blank_lines:
            lines.append("")
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _records(steps, with_eval):
    records = []
    for step in range(1, steps + 1):
        record = {"step": step, "reward_mean": math.sin(step / 3), "reward_std": 0.1 + 0.01 * step,
                  "refine_rate": 1.0 / step, "pg_loss": -0.01 * step, "entropy": 2.0 - 0.05 * step,
                  "tokens_per_s": 1000.0 + step, "step_time_s": 0.5, "custom_metric": step ** 0.5,
                  "note": "strings are ignored"}
        if step % 2 == 0:
            record["sft_loss"] = 0.3 / step  # only on some steps
        if with_eval and step % 5 == 0:
            record["eval_reward"] = 0.5 + 0.01 * step
        records.append(record)
    return records


def test_plot_run_draws_present_groups(tmp_path):
    _write(tmp_path, _records(20, with_eval=True))
    paths = plot_run(tmp_path)
    assert sorted(p.name for p in paths) == ["constraint.png", "losses.png", "other.png", "policy.png", "reward.png",
                                             "throughput.png"]
    for path in paths:
        assert path.parent == tmp_path / "plots"
        width, height = _png_size(path)
        assert width >= 400 and height >= 200
        assert path.stat().st_size > 5_000, path  # axes, curves and labels, not a blank canvas
    assert not list((tmp_path / "plots").glob(".*"))  # no temporary files left


def test_plot_run_skips_absent_groups_and_redraws(tmp_path):
    records = [{"step": s, "reward_mean": 0.1 * s} for s in range(1, 6)]  # no std, no eval, nothing else
    _write(tmp_path, records, blank_lines=False)
    assert [p.name for p in plot_run(tmp_path)] == ["reward.png"]

    first = (tmp_path / "plots" / "reward.png").read_bytes()
    records += [{"step": s, "reward_mean": -0.1 * s, "eval_reward": 1.0} for s in range(6, 30)]
    _write(tmp_path, records)
    assert [p.name for p in plot_run(tmp_path)] == ["reward.png"]  # redrawn in place
    assert (tmp_path / "plots" / "reward.png").read_bytes() != first


def test_panels_follow_logged_metrics(tmp_path):
    # More panels -> a taller figure: throughput with three metrics against one.
    _write(tmp_path / "a", [{"step": s, "tokens_per_s": s, "step_time_s": 1.0, "peak_mem_gb": 2.0} for s in range(5)])
    _write(tmp_path / "b", [{"step": s, "tokens_per_s": s} for s in range(5)])
    (path_a,), (path_b,) = plot_run(tmp_path / "a"), plot_run(tmp_path / "b")
    assert path_a.name == path_b.name == "throughput.png"
    assert _png_size(path_a)[1] > 2 * _png_size(path_b)[1]


def test_series_merges_repeated_steps_and_drops_non_numbers():
    records = [{"step": 2, "a": 1.0}, {"step": 1, "a": 0.0, "b": "x"}, {"step": 2, "a": 5.0, "c": True},
               {"step": 3, "a": None}, {"a": 9.0}]
    with pytest.warns(UserWarning, match="1 metrics record"):
        series = _series(records)
    assert series == {"a": ([1, 2], [0.0, 5.0]), "c": ([2], [1.0])}


def test_empty_file_draws_nothing(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("\n\n")
    assert read_metrics(tmp_path / "metrics.jsonl") == []
    assert plot_run(tmp_path) == []
    assert not (tmp_path / "plots").exists()


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "reward_mean": 0.5}\n\n{"step": 2, "reward_mean": \n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3: malformed JSON"):
        read_metrics(path)
    # As a resume does, plot drops a torn last line (a crash mid-write) with a warning: a crashed run's curves.
    with pytest.warns(UserWarning, match=r"metrics\.jsonl:3: dropped a torn last line"):
        assert [p.name for p in plot_run(tmp_path)] == ["reward.png"]
    path.write_text('{"step": 1, "reward_mean": 0.5}\n{"step": 2, "reward_mean": \n{"step": 3}\n')
    with pytest.raises(ValueError, match=r":2: malformed JSON in the middle of the file"):
        plot_run(tmp_path)
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r":2: expected a JSON object"):
        read_metrics(path)


def test_missing_metrics_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(tmp_path)


def test_a_file_or_a_missing_folder_given_as_the_run_is_named(tmp_path):
    (tmp_path / "a.yaml").write_text("steps: 1\n")
    with pytest.raises(FileNotFoundError, match=r"a\.yaml is not a run directory: it is a file"):
        plot_run(tmp_path / "a.yaml")
    with pytest.raises(FileNotFoundError, match=r"nothing is not a run directory: no such folder"):
        plot_run(tmp_path / "nothing")


def test_clearing_a_run_removes_every_plot_drawn_and_refuses_a_foreign_one(tmp_path):
    _write(tmp_path, _records(20, with_eval=True))
    assert len(plot_run(tmp_path)) == 6   # every group
    (tmp_path / "plots" / ".tmp-reward.png-x1y2").write_bytes(b"")   # what a crash mid-write leaves
    (tmp_path / "plots" / "mine.png").write_bytes(PNG_MAGIC)
    with pytest.raises(ValueError, match=r"plots/mine\.png was not written by fastrft \(not a plot fastrft draws\)"):
        RunDir(tmp_path).clear()
    assert len(list((tmp_path / "plots").iterdir())) == 8   # nothing removed
    (tmp_path / "plots" / "mine.png").unlink()
    RunDir(tmp_path).clear()
    assert not (tmp_path / "plots").exists() and not (tmp_path / "metrics.jsonl").exists()
