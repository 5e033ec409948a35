"""The benchmark's machinery works (its figures are printed by `python -m runner.bench`, not asserted)."""

import pytest

from runner import bench


def test_loop_ratio_measures_both_loops():
    # enough steps that the difference of the two timings is not lost in a loaded machine's noise
    result = bench.loop_ratio(bench.MLP, (10, 410), repeats=1)
    assert result["runner_ms_per_step"]["median"] > 0 and result["baseline_ms_per_step"]["median"] > 0
    # the same quotient, up to the last bit (ms = s * 1e3 on both sides)
    assert result["ratio"]["median"] == pytest.approx(result["runner_ms_per_step"]["median"] / result["baseline_ms_per_step"]["median"], rel=1e-12)


def test_svc_baseline_uses_runners_split():
    svc = bench.svc_baseline()
    assert 0.95 < svc["test_acc"] <= 1.0  # 270 test digits


def test_the_data_figures_measure_what_they_say(tmp_path):
    root = bench._png_folder(tmp_path / "pngs", 120)
    assert len(list(root.rglob("*.png"))) == 120
    folder = bench.folder_throughput(root, repeats=1, workers=0)
    assert folder["runner_images_per_s"]["median"] > 0 and folder["hand_images_per_s"]["median"] > 0
    assert folder["ratio"]["median"] == pytest.approx(folder["runner_images_per_s"]["median"] / folder["hand_images_per_s"]["median"])
    streamed = bench.shards_rss(tmp_path / "shards" if (tmp_path / "shards").mkdir() is None else None, gigabytes=0.005)
    assert streamed["samples"] == int(0.005 * 1024**3 / (3 * 64 * 64 * 4))  # one epoch, every sample once
    assert 0 < streamed["main_rss_gb"] < 2
    # the sums cover the main process and its workers: more than the main process alone, and
    # PSS (shared pages counted once) no more than the RSS sum
    assert streamed["main_rss_gb"] < streamed["peak_rss_gb"]["median"] < 3
    assert 0 < streamed["peak_pss_gb"]["median"] <= streamed["peak_rss_gb"]["median"]


@pytest.mark.slow
def test_the_default_job_is_timed_in_phases_that_add_up(tmp_path):
    job = bench.default_job(repeats=1)
    phases = sum(job[f"{name}_s"]["median"] for name in ("startup", "fit", "end_of_run", "exit"))
    assert phases == pytest.approx(job["wall_s"]["median"], rel=1e-6)
    assert all(job[f"{name}_s"]["median"] >= 0 for name in ("startup", "fit", "end_of_run", "exit"))
    ratio = job["wall_over_import_and_fit"]["median"]
    assert ratio == pytest.approx(job["wall_s"]["median"] / (job["import_torch_s"]["median"] + job["fit_s"]["median"]))
    assert job["test_acc"]["median"] > 0.9
