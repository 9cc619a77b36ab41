"""refine-audit: backdoor auditing of image classifiers with the REFINE defense."""

__version__ = "0.1.0"
