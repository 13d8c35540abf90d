"""Test support that ships with the package, so a third-party backend can run our suite."""
