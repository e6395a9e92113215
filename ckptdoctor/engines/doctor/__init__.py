"""check and fix: findings from a plan, and the fix that applies it."""
