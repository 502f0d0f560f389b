"""``chatd bench``: the bundled load tester."""
