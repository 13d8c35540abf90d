"""Example jobs, registered with the ``@singleton.job`` decorator: one per mode."""
