"""The model registry: register the chosen pair (``register``), batch inference through a registered
model (``inference``), and promotion on evidence (``promote``)."""
