"""Deploying an audit's outcome: the defended endpoint in front of an audited model API.

``defense`` reads an audit's T, M and API description (from a folder or a service);
``endpoint`` serves ``M ∘ API ∘ T`` in the upstream's own protocol; ``cli`` is
``refine-audit serve-defended``.
"""

from auditor.deploy.defense import ApiShape, DefenseBundle, fetch_defense, load_defense
from auditor.deploy.endpoint import DefendedEndpoint, EndpointLimits

__all__ = ["ApiShape", "DefendedEndpoint", "DefenseBundle", "EndpointLimits", "fetch_defense", "load_defense"]
