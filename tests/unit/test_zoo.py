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


def test_lc_climbs_by_poisoning_the_whole_target_class_and_training_longer():
    lc = next(s for s in zoo_specs() if s.attack == "lc")
    first, second = escalated(lc, 0), escalated(lc, 1)
    assert "target_share" not in first.params and second.params["target_share"] == 1.0
    assert second.epochs == lc.epochs + 2 and second.poison_rate is None

