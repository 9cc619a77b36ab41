"""Generated backdoor attacks: triggers, poisoning recipes, and backdoored model training."""

from auditor.attacks.base import Attack, AttackConfig, PoisonedTrainSet, load_attack
from auditor.attacks.catalog import ATTACKS, attack_names, build_attack, describe
from auditor.attacks.training import BackdooredModel, train_backdoored_model, train_clean_model

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackConfig",
    "BackdooredModel",
    "PoisonedTrainSet",
    "attack_names",
    "build_attack",
    "describe",
    "load_attack",
    "train_backdoored_model",
    "train_clean_model",
]
