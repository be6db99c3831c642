"""Model lifecycle: one handle per model (handle.py) behind a worker seam (port.py), the
supervisor that converges them to the config (supervisor.py) through a pure diff (plan.py),
and the memory budget with its idle reaper (budget.py)."""
