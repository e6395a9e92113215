"""The repair planner: candidate rules (text, renumbering, renames), their scoring and the plan."""
