"""The prefix cache, as a package: block format (`blocks`), and the tiers that store it."""
