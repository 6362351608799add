"""What runs in the notebook kernel: the `Pool`, running cells and containing their failures,
the magics, the control panel, the dashboard and the run history. Imports no framework."""
