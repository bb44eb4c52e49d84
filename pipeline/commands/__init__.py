"""Every command's implementation, one module each: ``<command>_command.py`` holds the
``main(preset, options, progress) -> int`` that the CLI's command table names (``data_command``
holds ``synth`` and ``inspect``), a thin composition of the stages the command drives. Commands
that are one MLflow run (``train``, ``baseline``) or one file (``predict``) keep their whole
composition here; ``tune``, ``promote`` and ``bench`` call their stage. ``options`` declares each
command's own options (flags and MLproject parameters derive from them)."""
