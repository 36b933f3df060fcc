"""Sub-commands of the ``unitscale`` CLI, one module each (see ``unitscale.cli``)."""
