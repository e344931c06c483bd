"""Plan-time warnings for a method that cannot act within the run's steps (issue 23): GGA's window, IU's first
call, SWAD's convergence, EMA's decay; one mechanism (Component.first_action / schedule_warnings)."""

from conftest import tiny_config
from dgzoo.algorithms import Schedule, resolve_hparams, schedule_warnings
from dgzoo.training.dryrun import dry_run, format_plan
from dgzoo.training.engine import plan_run


def warnings_of(spec, hparams=None, steps=30, eval_every=10, steps_per_epoch=8):
    return schedule_warnings(spec, resolve_hparams(spec, hparams or {}), Schedule(steps, eval_every, steps_per_epoch))


def test_gga_window_beyond_the_run_is_warned():
    (warning,) = warnings_of("sagm+gga")
    assert "gga never acts" in warning and "step 101" in warning and "--steps to at least 101" in warning
    assert warnings_of("sagm+gga", {"gga.start": 10, "gga.end": 20}) == []
    assert warnings_of("erm+gga", steps=101) == []  # the window's first step is the run's last
    # the second window counts too
    assert warnings_of("erm+gga", {"gga.extra_search": True, "gga.extra_start": 5, "gga.extra_end": 9}) == []


def test_iu_first_call_beyond_the_run_is_warned():
    (warning,) = warnings_of("erm+iu", {"iu.every": 40})
    assert "iu never acts" in warning and "step 40" in warning and "lower iu.every" in warning
    # calls start after the first epoch: every=5 with 8-step epochs first calls at step 10
    assert (
        warnings_of("erm+iu", {"iu.every": 5}, steps=9) != [] and warnings_of("erm+iu", {"iu.every": 5}, steps=10) == []
    )
    (warning,) = warnings_of("erm+iue", steps=20, steps_per_epoch=25)  # per epoch: the first epoch ends at 25
    assert "iue never acts" in warning and "step 25" in warning and "iue.every" in warning
    assert warnings_of("erm+iu", {"iu.start_step": 31}, steps=30) != []
    assert warnings_of("erm+iu", {"iu.every": 15}, steps=45) == []  # the README's job calls at 15, 30, 45


def test_swad_that_cannot_converge_is_warned():
    (warning,) = warnings_of("erm+swad", steps=20, eval_every=10)  # two evaluations, n_converge 3
    assert "swad never acts" in warning and "last 10 steps" in warning and "--eval-every to 6" in warning
    assert warnings_of("erm+swad", steps=30, eval_every=10) == []
    assert warnings_of("erm+swad", {"swad.n_converge": 2}, steps=20, eval_every=10) == []


def test_ema_too_short_for_its_decay_is_warned_without_warm_up():
    (warning,) = warnings_of("erm+ema", {"ema.warmup": False}, steps=30)
    assert "97% of the initial weights" in warning and "ema.warmup=true" in warning
    assert warnings_of("erm+ema", steps=30) == []  # the warm-up's first update copies the weights
    assert warnings_of("erm+ema", {"ema.warmup": False}, steps=3000) == []


def test_the_plan_and_the_dry_run_say_it(tmp_path):
    cfg = tiny_config(tmp_path, algorithm="sagm+gga", steps=30)
    plan = plan_run(cfg)
    assert any("gga never acts" in w for w in plan.warnings)
    assert "warning: gga never acts" in format_plan(dry_run(cfg, timed_steps=0))
