"""Model lifecycle: one handle per model (handle.py), the supervisor that converges them to the
config (supervisor.py), and the memory budget with its idle reaper (budget.py)."""
