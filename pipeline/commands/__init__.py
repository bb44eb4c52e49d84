"""Commands that are one MLflow run each (``train``, ``baseline``) or one file (``predict``): thin
compositions of the stages below, called by the CLI."""
