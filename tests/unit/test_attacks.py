import pytest
import torch

from auditor.attacks import ATTACKS, AttackConfig, build_attack, load_attack, train_backdoored_model
from auditor.attacks.training import ImplantRule
from auditor.evaluation import attack_metrics, model_predictor
from auditor.training import TrainConfig

CPU = torch.device("cpu")
SHAPE = (1, 16, 16)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_trigger_changes_images_and_is_reproducible_after_save(tmp_path, name, tiny_data, tiny_model):
    attack = build_attack(AttackConfig(name, seed=5), SHAPE)
    x = tiny_data[1].x[:8].float() / 255
    triggered = attack.apply(x)
    assert triggered.shape == x.shape
    assert triggered.min() >= 0 and triggered.max() <= 1
    assert (triggered - x).abs().sum() > 0
    attack.save(tmp_path)
    assert torch.equal(load_attack(tmp_path).apply(x), triggered)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_poisoning_recipe_respects_its_budget(name, tiny_data, tiny_model):
    train = tiny_data[0]
    attack = build_attack(AttackConfig(name, target=0, seed=1), SHAPE)
    poisoned = attack.poison(train, tiny_model)
    assert poisoned.x.shape == train.x.shape
    changed_labels = (poisoned.y != train.y).sum().item()
    if name == "lc":
        assert changed_labels == 0  # label-consistent: labels stay correct
        assert (train.y[poisoned.poisoned] == 0).all()
    else:
        assert changed_labels == round(attack.poison_rate * len(train))
        assert (poisoned.y[poisoned.y != train.y] == 0).all()


def test_wanet_warp_field_is_drawn_once_from_the_seed():
    a = build_attack(AttackConfig("wanet", seed=3), SHAPE)
    b = build_attack(AttackConfig("wanet", seed=3), SHAPE)
    c = build_attack(AttackConfig("wanet", seed=4), SHAPE)
    assert torch.equal(a.state["flow"], b.state["flow"])
    assert not torch.equal(a.state["flow"], c.state["flow"])


def test_badnets_model_learns_the_backdoor(tiny_data, tiny_arch):
    train, test = tiny_data
    bd = train_backdoored_model(
        tiny_arch, train, test, AttackConfig("badnets", target=0, poison_rate=0.15, seed=0, params={"size": 4}),
        TrainConfig(epochs=6, batch_size=32, lr=5e-3), device=CPU, seed=0,
    )
    metrics = attack_metrics(model_predictor(bd.model, CPU), test, bd.poisoned_test, 0)
    assert metrics.ba > 0.9
    assert metrics.asr > 0.8


def test_implant_rule_needs_the_backdoor_and_a_clean_accuracy_plateau():
    rule = ImplantRule(check_every=10, min_asr=0.9, ba_tolerance=0.01)
    check = lambda ba, asr: {"step": 0, "ba": ba, "asr": asr}  # noqa: E731
    assert not rule.holds([check(0.9, 1.0)])  # one check cannot show a plateau
    assert not rule.holds([check(0.80, 1.0), check(0.85, 1.0)])  # BA still climbing
    assert not rule.holds([check(0.88, 0.5), check(0.885, 0.89)])  # BA flat, backdoor not implanted
    assert not rule.holds([check(0.90, 0.95), check(0.85, 0.95)])  # BA fell away from its best
    assert rule.holds([check(0.80, 0.2), check(0.885, 0.95), check(0.89, 0.95)])
    assert rule.holds([check(0.80, 0.2), check(0.89, 0.95), check(0.882, 0.95)])  # within 1 point of the best
    with pytest.raises(ValueError):
        ImplantRule(check_every=0)


def test_a_control_stops_once_the_backdoor_implanted_on_held_out_images(tiny_data, tiny_holdout, tiny_arch):
    """Checked every 5 steps; once the rule holds, half as many steps again with a decaying rate, then the end."""
    train, test = tiny_data
    attack = AttackConfig("badnets", target=0, poison_rate=0.15, seed=0, params={"size": 4})
    config = TrainConfig(epochs=8, batch_size=32, lr=5e-3)
    rule = ImplantRule(check_every=5, min_asr=0.9, ba_tolerance=0.02, cooldown_share=0.5)
    stopped = train_backdoored_model(tiny_arch, train, test, attack, config, device=CPU, seed=0,
                                     rule=rule, holdout=tiny_holdout)
    capped = train_backdoored_model(tiny_arch, train, test, attack, config, device=CPU, seed=0)
    assert capped.train_steps == capped.max_steps == 8 * 15 and not capped.checks
    *during, end = stopped.checks
    held = next(i for i in range(len(during)) if rule.holds(during[: i + 1]))
    assert held == len(during) - 1  # no check after the rule held: the cool-down ran to its end
    assert stopped.train_steps == during[held]["step"] + round(0.5 * during[held]["step"]) < stopped.max_steps
    assert end["step"] == stopped.train_steps  # the report's held-out figures are the model it ends with
    assert all(c["step"] % 5 == 0 for c in during)
    metrics = attack_metrics(model_predictor(stopped.model, CPU), test, stopped.poisoned_test, 0)
    assert metrics.asr >= 0.8 and metrics.ba > 0.85  # what held on the held-out images holds on the test images
