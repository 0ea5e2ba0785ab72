"""The CLIs' shared helpers, in process: GPU evidence, durations and the run-time estimate."""

import numpy as np
import pytest

import cli


def test_gpu_evidence(monkeypatch):
    monkeypatch.setattr(cli.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(cli.shutil, "which", lambda name: None)
    for value in (None, "", "-1"):  # unset, or set to hide every GPU
        if value is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
        assert cli.gpu_evidence() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr(cli.glob, "glob", lambda pattern: ["/dev/nvidia1", "/dev/nvidia0"])
    monkeypatch.setattr(cli.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    assert cli.gpu_evidence() == ["CUDA_VISIBLE_DEVICES=0,1", "/dev/nvidia0",
                                  "nvidia-smi on the path"]


@pytest.mark.parametrize("seconds,text", [(5, "5 s"), (95, "2 min"), (7200, "2.0 h"),
                                          (200000, "2.3 days")])
def test_duration(seconds, text):
    assert cli.duration(seconds) == text


def test_estimate_after_the_first_and_second_epochs(monkeypatch, capsys):
    clock = iter([100.0, 130.0, 140.0, 150.0])  # the first epoch takes 30 s, then 10 s each
    monkeypatch.setattr(cli.time, "time", lambda: next(clock))
    monkeypatch.setattr(cli.tf.config, "list_physical_devices", lambda kind=None: [])
    estimate = cli.Estimate(3001, "the pool (20 networks)", later="; more later")
    estimate.on_epoch_begin(0)
    assert capsys.readouterr().out == ""  # nothing before a whole epoch
    estimate.on_epoch_begin(1)
    out, err = capsys.readouterr()
    assert out.strip() == ("estimate: the pool (20 networks) takes about 25.0 h more at the "
                           "pace of its first epoch; more later")
    assert err == ""
    estimate.on_epoch_begin(2)  # the second epoch, 10 s: 2999 x 10 s left
    out, err = capsys.readouterr()
    assert out.strip() == ("estimate: the pool (20 networks) takes about 8.3 h more at the "
                           "pace of its second epoch; more later")
    assert err.startswith("warning: that is GPU-scale work on a CPU (8.3 h)")
    assert "README 'On a CPU'" in err
    estimate.on_epoch_begin(3)
    assert capsys.readouterr() == ("", "")  # said


def test_a_short_estimate_is_said_once_and_not_warned_about(monkeypatch, capsys):
    clock = iter([0.0, 2.0, 4.1])
    monkeypatch.setattr(cli.time, "time", lambda: next(clock))
    estimate = cli.Estimate(10, "the distillation (100 iterations)")
    for epoch in range(3):
        estimate.on_epoch_begin(epoch)
    out, err = capsys.readouterr()
    assert out.count("estimate:") == 1 and "takes about 18 s more" in out and err == ""


def test_a_checkpoint_of_other_random_draws_is_refused(tmp_path, small_fashion_mnist):
    import ncfm_keras as nk
    import runs

    config = nk.DistillConfig(ipc=1, iterations=4)
    meta = runs.run_meta(small_fashion_mnist, config, 2, 32, "float32", False, 1, False)
    old = {k: v for k, v in meta.items() if k != "draws"}  # written before DRAWS existed
    path = str(tmp_path / "checkpoint.npz")
    runs.save_checkpoint(path, old, 1, {"synthetic": np.zeros(2)})
    with pytest.raises(nk.NCFMError, match=r"other settings \(draws=1 there, 2 now\).*"
                                           "--noresume"):
        runs.resume_point(path, meta, 4)
    runs.save_checkpoint(path, meta, 1, {"synthetic": np.zeros(2)})
    assert runs.resume_point(path, meta, 4)["epochs_done"] == 1


def test_pool_members_never_start_as_an_evaluation_network():
    import ncfm_keras as nk

    seeds = {nk.pool_member_seed(seed, member) for seed in range(3) for member in range(20)}
    assert len(seeds) == 60 and min(seeds) >= 1000  # evaluation networks take seeds 0, 1, ...
    assert max(seeds) < 2 ** 31
