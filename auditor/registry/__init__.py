"""Models read from a model registry (MLflow) instead of an upload, and results written back to it.

``uri`` (the reference's shape, used by the spec) imports nothing heavy; ``mlflow`` is a
small client of MLflow's REST API over ``requests``; ``source`` fetches the checkpoint on
the trusted side before the sandbox and writes the outcome back after it
(``registry_runner``). No mlflow package is needed at run time.
"""
