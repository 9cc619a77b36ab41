"""The detection benchmark's zoo labels a poisoned model backdoored only once its backdoor implants."""

from bench.zoo import LADDER, MAX_POISON_RATE, escalated, zoo_specs


def test_every_rung_of_the_implantation_ladder_poisons_more_or_trains_longer_than_the_last():
    for spec in (s for s in zoo_specs() if s.backdoored):
        rungs = [escalated(spec, k) for k in range(LADDER + 1)]
        assert (rungs[0].poison_rate, rungs[0].epochs) == (spec.poison_rate, spec.epochs)
        for low, high in zip(rungs, rungs[1:]):
            assert high.epochs > low.epochs
            if spec.attack != "lc":
                assert high.poison_rate == MAX_POISON_RATE or low.poison_rate < high.poison_rate < MAX_POISON_RATE


def test_lc_climbs_by_a_stronger_perturbation_and_longer_training():
    lc = next(s for s in zoo_specs() if s.attack == "lc")
    rungs = [escalated(lc, k) for k in range(LADDER + 1)]
    assert rungs[0].params == {"steps": 20} and rungs[1].params == {}  # the attack's own 60 PGD steps
    assert rungs[-1].params == {"target_share": 1.0}
    assert [r.epochs for r in rungs] == [lc.epochs + 2 * k for k in range(LADDER + 1)]
    assert all(r.poison_rate is None for r in rungs)
