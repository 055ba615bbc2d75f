"""A stand-in for the training program the corpus job scripts run (the linter only checks that it exists)."""
